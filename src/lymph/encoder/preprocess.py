"""Normalisation and augmentation of uint8 batches on the device: what every method's
``loss`` and ``features`` receive (see :mod:`lymph.encoder.registry`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lymph.encoder.augment import random_dihedral
from lymph.encoder.fastcpu.layers import normalise_channels


class Preprocess:
    """uint8 batches on the device -> normalised float32, plus random augmentation.

    ``x = (batch / 255 - mean) / std`` per channel (the training cache's statistics, on
    [0, 1]), in channels-last layout when ``channels_last``.
    """

    def __init__(self, mean: Any, std: Any, device: torch.device, *, channels_last: bool = False,
                 generator: torch.Generator | None = None) -> None:
        m = torch.as_tensor(np.asarray(mean, dtype=np.float32)).view(3)
        s = torch.as_tensor(np.asarray(std, dtype=np.float32)).view(3)
        self.mean = [float(v) for v in np.ravel(mean)]
        self.std = [float(v) for v in np.ravel(std)]
        self.scale = (1.0 / (255.0 * s)).to(device)
        self.shift = (m / s).to(device)
        self.channels_last = channels_last
        self.generator = generator or torch.Generator().manual_seed(0)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # change the layout while the pixels are still 1 byte each
            batch = batch.contiguous(memory_format=torch.channels_last)
        return normalise_channels(batch, self.scale, self.shift)  # (B, 3, S, S) float32

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        """A random rot90/flip of every image (uint8 or float, on the batch's device)."""
        return random_dihedral(batch, self.generator)
