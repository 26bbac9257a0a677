"""The method registry: what the training loop and the embedding pass know of a method.

A method is an object with

- ``name`` and ``config_cls`` (a dataclass with at least ``dim`` and ``size`` fields and
  ``to_dict`` / ``from_dict``);
- ``trainable``: whether :func:`lymph.encoder.train.train` applies (``False`` for methods
  that compute features without a network, which do not go through this registry's loop);
- ``build(config) -> nn.Module``;
- ``loss(model, batch, normalise) -> scalar tensor``: ``batch`` is the uint8 ``(B, 3, S, S)``
  batch already on the device; ``normalise`` is a :class:`Preprocess` (call it to get the
  normalised float batch, ``normalise.augment(batch)`` for a random view). ``model`` may be
  wrapped by DistributedDataParallel: call it, do not reach into it;
- ``features(model, x) -> (B, D)``: ``x`` normalised (``normalise(batch)``), ``model`` the
  bare module in eval mode, under ``torch.no_grad``;
- optionally ``min_batch`` (default 1): the smallest batch ``loss`` accepts; a shorter last
  batch of an epoch joins the one before it.

Adding a method: write a class like :class:`AutoencoderMethod` and call :func:`register`
at import time of its module (listed in ``_BUILTIN_MODULES`` to be found by name).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lymph.encoder.augment import random_dihedral
from lymph.encoder.layers import mse_loss, normalise_channels
from lymph.encoder.model import AEConfig, ConvAutoencoder
from lymph.errors import LymphError


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


class Method(Protocol):
    name: str
    config_cls: type
    trainable: bool

    def build(self, config: Any) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: torch.Tensor, normalise: Preprocess) -> torch.Tensor: ...

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class AutoencoderMethod:
    """The report's convolutional autoencoder: MSE reconstruction of an augmented view."""

    name: str = "ae"
    config_cls: type = AEConfig
    trainable: bool = True

    def build(self, config: AEConfig) -> nn.Module:
        return ConvAutoencoder(config)

    def loss(self, model: nn.Module, batch: torch.Tensor, normalise: Preprocess) -> torch.Tensor:
        x = normalise(normalise.augment(batch))
        return mse_loss(model(x), x)  # fp32 MSE, whatever the decoder's dtype

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.encode(x)  # type: ignore[operator]


_REGISTRY: dict[str, Method] = {}
# modules that register further methods when imported (added by their authors)
_BUILTIN_MODULES: tuple[str, ...] = ("lymph.encoder.contrastive", "lymph.encoder.weak")


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


register(AutoencoderMethod())


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)
    if name not in _REGISTRY:
        raise LymphError(
            f"--method: expected one of {', '.join(sorted(_REGISTRY))}, got {name!r}"
        )
    return _REGISTRY[name]


def method_names() -> list[str]:
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    return sorted(_REGISTRY)
