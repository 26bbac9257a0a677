"""On-the-fly augmentation of batched tensors: the 8 symmetries of the square.

A blood-smear cell has no preferred orientation, so every image is rotated by a random
multiple of 90 degrees and flipped with probability 1/2. The draws come from a CPU
``torch.Generator`` (reproducible on every device); the pixels are moved on whatever
device the batch lives on, uint8 or float. Nothing is written to disk.
"""

from __future__ import annotations

import torch


def random_dihedral(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply a random rot90 x k (k in 0..3) and horizontal flip to each image.

    ``batch``: ``(B, C, H, W)`` with ``H == W``; returns a new tensor of the same shape,
    dtype, device and memory format. Eight index-selects at most, whatever B.
    """
    if batch.ndim != 4 or batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"expected (B, C, S, S) square images, got {tuple(batch.shape)}")
    b = batch.shape[0]
    code = torch.randint(0, 8, (b,), generator=generator)  # CPU: k = code % 4, flip = code >= 4
    out = torch.empty_like(batch)
    for c in range(8):
        idx = torch.nonzero(code == c).flatten()
        if idx.numel() == 0:
            continue
        idx = idx.to(batch.device, non_blocking=True)
        x = batch.index_select(0, idx)
        if c >= 4:
            x = x.flip(-1)
        if c % 4:
            x = torch.rot90(x, c % 4, dims=(-2, -1))
        out.index_copy_(0, idx, x)
    return out
