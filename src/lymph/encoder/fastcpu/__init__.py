"""The CPU fast paths of the autoencoder: ``layers`` (faster layers and loss, same results
as PyTorch's; ``FAST`` switches) and ``allocator`` (glibc malloc kept from handing freed
memory back). :mod:`lymph.encoder.model` is plain PyTorch apart from calling these."""
