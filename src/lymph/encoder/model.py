"""The convolutional autoencoder of stage one (after the seed report).

Input ``(B, 3, S, S)`` normalised images (S = 112 by default, any multiple of 8 works).
The encoder is three strided 3x3 convolutions (16/32/64 channels, each halving the side)
and a linear layer to ``dim`` (the report's ``d_enc``, default 60); the decoder mirrors it
with a linear layer and three transposed convolutions. Trained with mean squared error on
the normalised pixels, so the decoder ends without an activation.

Cost per 112 px image (multiply-adds, forward): encoder 9.3 M, decoder 9.3 M; a training
step (forward + backward) is about 3x the forward: 112 MFLOP per image. See
:func:`train_flops_per_image`.

On the CPU, channels-last, the same function runs through the faster paths of
:mod:`lymph.encoder.fastcpu.layers` (conv+ReLU fused, the transposed convolutions' weight
gradients as convolutions) and the linear layers read and write channels-last activations
as they lie; the parameters and state-dict keys are those of the plain PyTorch modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lymph.encoder.fastcpu.layers import FAST, ConvTranspose2d, run_sequential
from lymph.configdict import config_from_dict, config_to_dict
from lymph.errors import LymphError


@dataclass
class AEConfig:
    """Architecture of :class:`ConvAutoencoder` (stored whole in the checkpoint)."""

    dim: int = 60  # d_enc: the embedding size (the report tried 45, 60, 75, 100, 125)
    size: int = 112  # input side in pixels; must be divisible by 2 ** len(channels)
    channels: tuple[int, ...] = (16, 32, 64)  # encoder conv widths (the report's)
    kernel: int = 3

    def check(self) -> None:
        if self.dim < 1:
            raise LymphError(f"dim: expected a positive embedding size, got {self.dim}")
        f = 2 ** len(self.channels)
        if self.size % f or self.size < f:
            raise LymphError(
                f"image size {self.size}: the autoencoder needs a side divisible by {f} "
                f"(e.g. 32, 64, 112); re-ingest at another `size`"
            )

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AEConfig:
        return config_from_dict(cls, d)


class ConvAutoencoder(nn.Module):
    """``forward(x)`` returns the reconstruction; ``encode(x)`` the ``(B, dim)`` embedding."""

    def __init__(self, config: AEConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        k, pad = config.kernel, config.kernel // 2
        chans = (3, *config.channels)
        enc: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv2d(cin, cout, k, stride=2, padding=pad), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*enc)  # (B, 3, S, S) -> (B, C, S/8, S/8)
        self.side = config.size // 2 ** len(config.channels)
        flat = chans[-1] * self.side * self.side  # 64 * 14 * 14 = 12,544 at 112 px
        self.to_code = nn.Linear(flat, config.dim)
        self.from_code = nn.Linear(config.dim, flat)
        dec: list[nn.Module] = []
        rev = chans[::-1]
        for i, (cin, cout) in enumerate(zip(rev[:-1], rev[1:])):
            dec.append(ConvTranspose2d(cin, cout, k, stride=2, padding=pad, output_padding=1))
            if i < len(rev) - 2:
                dec.append(nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(*dec)  # (B, C, S/8, S/8) -> (B, 3, S, S)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised -> ``(B, dim)``."""
        f = run_sequential(self.features, x)
        if not _channels_last(f):
            return self.to_code(f.flatten(1))
        # the same linear map on the channels-last activations as they lie in memory: the
        # weight's columns are reordered (C, H, W) -> (H, W, C) instead of the activations
        c = f.shape[1]
        w = self.to_code.weight.unflatten(1, (c, self.side, self.side))
        w = w.permute(0, 2, 3, 1).flatten(1)
        return F.linear(f.permute(0, 2, 3, 1).flatten(1), w, self.to_code.bias)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, dim)`` -> ``(B, 3, S, S)`` reconstruction (normalised space)."""
        s = self.side
        if not _channels_last(self.decoder[0].weight):
            return run_sequential(self.decoder,
                                  torch.relu(self.from_code(z)).unflatten(1, (-1, s, s)))
        # channels-last decoder: the linear layer writes (H, W, C) order directly (its rows
        # reordered), so the first transposed convolution gets channels-last input
        c = self.from_code.out_features // (s * s)
        w = self.from_code.weight.unflatten(0, (c, s, s)).permute(1, 2, 0, 3).flatten(0, 2)
        b = self.from_code.bias.view(c, s, s).permute(1, 2, 0).flatten()
        h = torch.relu(F.linear(z, w, b)).view(-1, s, s, c).permute(0, 3, 1, 2)
        return run_sequential(self.decoder, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _channels_last(t: torch.Tensor) -> bool:
    """Whether to run the linear layers on channels-last activations as they lie."""
    return (FAST["channels_last_linear"] and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def forward_flops_per_image(model: nn.Module, size: int) -> float:
    """FLOPs (2 x multiply-adds) of one forward pass over one image, conv and linear
    layers only (activations and the loss are negligible), counted with forward hooks."""
    total = [0.0]

    def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            total[0] += 2.0 * mod.in_features * mod.out_features
        elif isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += 2.0 * out[0].numel() * mod.in_channels // mod.groups * k
        elif isinstance(mod, nn.ConvTranspose2d):
            # every input pixel scatters in_channels x out_channels x k x k products
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += 2.0 * inp[0][0].numel() * mod.out_channels // mod.groups * k

    # a contiguous-layout CPU copy: a channels-last model applies its linear layers'
    # weights directly (reordered), so their modules would not be called
    model = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return total[0]


def train_flops_per_image(model: nn.Module, size: int) -> float:
    """Training FLOPs per image: forward x 3 (backward is about twice the forward)."""
    return 3.0 * forward_flops_per_image(model, size)
