"""``ae``: the report's convolutional autoencoder (:mod:`lymph.encoder.model`), trained by
MSE reconstruction of an augmented view; features are the encoder's output."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lymph.encoder.fastcpu.layers import mse_loss
from lymph.encoder.model import AEConfig, ConvAutoencoder
from lymph.encoder.preprocess import Preprocess


@dataclass(frozen=True)
class AutoencoderMethod:
    config_cls: type = AEConfig

    def build(self, config: AEConfig) -> nn.Module:
        return ConvAutoencoder(config)

    def loss(self, model: nn.Module, batch: torch.Tensor, normalise: Preprocess) -> torch.Tensor:
        x = normalise(normalise.augment(batch))
        return mse_loss(model(x), x)  # fp32 MSE, whatever the decoder's dtype

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.encode(x)  # type: ignore[operator]


METHOD = AutoencoderMethod()
