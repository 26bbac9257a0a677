"""Stage one: image encoders, their training loop and the embedding pass that writes the
store. Three things, three places:

- **the methods**: ``registry`` (torch-free: every method's name and what the rest of the
  code reads of it), ``methods/`` (one module per method: ``ae``, ``contrastive``, ``weak``,
  ``morphometry``), ``model`` (the autoencoder), ``augment``, ``preprocess``;
- **the training loop**: ``train`` (TrainConfig, train(): DDP, resume, bf16), ``feed``
  (epoch plan and chunk reader), ``checkpoint``, ``distributed`` (torchrun helpers);
- **the CPU fast paths**: ``fastcpu/`` (``layers``: faster layers and loss with PyTorch's
  results; ``allocator``).

Embedding and orchestration: ``embed`` (embed_cache, the store writer), ``run``
(run_embed: `lymph embed`; embed_dataset: `lymph predict --data`), ``combine`` (``A+B``),
``weak_folds`` / ``weak_checks`` (fold-safe label-trained scorers), ``bench``.
Import the modules directly; this package imports nothing heavy.
"""
