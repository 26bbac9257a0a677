"""Stage one: image encoders (the convolutional autoencoder and the method registry),
their training loop and the embedding pass that writes the store.

Modules (import them directly; this package imports nothing heavy)::

    model        AEConfig, ConvAutoencoder
    layers       its faster CPU layers and loss (same results as PyTorch's; FAST switches)
    allocator    keep_freed_memory: glibc malloc kept from handing memory back
    augment      random_dihedral: rot90 x k and flips on batched tensors
    methods      the method registry (get_method, register, Preprocess)
    train        TrainConfig, train(), ChunkFeeder
    checkpoint   save_checkpoint, load_checkpoint (weights_only)
    embed        embed_cache, embed_dataset, run_embed (`lymph embed`)
    distributed  torchrun / DDP helpers
    bench        bench_stage_one, bench_step_ablation
"""
