"""Self-supervised contrastive stage one (``lymph embed --method contrastive``): SimCLR.

Two random views of every cell of a batch go through a small CNN and an MLP projection
head; the NT-Xent loss (Chen et al., 2020) pulls the two views of a cell together and
pushes them away from the other ``2B - 2`` views of the batch. No labels. The projection
head is dropped when embedding: the store holds the backbone's pooled output (``dim``).

Augmentations suit centred blood-cell images and run on the batch's device, vectorised
over the batch (one ``grid_sample``, one colour matrix, one grouped blur convolution),
with every random draw taken from the loop's CPU generator, so they are reproducible:

- geometry: rotation by any angle, mirror flip, a mild zoom (area ``scale`` of the view,
  default 0.7-1.0) and a few pixels of shift around the centre. Reflection padding fills
  the corners, which hold red blood cells or background anyway. The zoom range is kept
  narrow on purpose: nucleus and cell size separate reactive from malignant cells, so the
  encoder must not become blind to size;
- colour: brightness, contrast, saturation and a small hue rotation (YIQ), mild, since
  stain differences between smears are small next to the cell's own colours;
- blur: a Gaussian of random width on half of the views.

Cost at 64 px with the default widths: 18 M multiply-adds per view forward, so training
costs about 0.22 GFLOP per cell (two views, forward + backward ~3x forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lymph.encoder.preprocess import Preprocess
from lymph.configdict import config_from_dict, config_to_dict
from lymph.errors import LymphError


@dataclass
class ContrastiveConfig:
    """Architecture, loss and augmentation settings (stored whole in the checkpoint)."""

    dim: int = 128  # embedding size: channels of the last conv block, globally pooled
    size: int = 64  # input side in pixels (the cache's); any side >= 16 works
    # conv blocks before the last, each followed by a 2x2 max-pool: 64 -> 32 -> 16 -> 8 -> 4 px.
    # Twice these widths trains 2-3x slower on the CPU (measured), beyond the budget.
    channels: tuple[int, ...] = (16, 32, 64, 128)
    proj_hidden: int = 256  # projection head: dim -> proj_hidden -> proj_dim (dropped when embedding)
    proj_dim: int = 64
    temperature: float = 0.2  # NT-Xent; 0.1-0.5 is SimCLR's useful range for small batches
    # augmentation strengths
    scale: tuple[float, float] = (0.7, 1.0)  # area of the view, as a fraction of the image
    shift: float = 0.06  # largest shift of the view centre, as a fraction of the image side
    brightness: float = 0.15  # factor in [1 - b, 1 + b]
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.03  # rotation of the chroma plane, in turns (0.03 = 11 degrees)
    blur_p: float = 0.5  # share of views blurred
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # Gaussian width in pixels at ``size``

    def check(self) -> None:
        if self.dim < 1:
            raise LymphError(f"dim: expected a positive embedding size, got {self.dim}")
        if self.size < 16 or self.size >> len(self.channels) < 2:
            raise LymphError(
                f"image size {self.size}: the contrastive encoder pools {len(self.channels)} "
                f"times and needs at least {2 << len(self.channels)} px; re-ingest at `size` 64"
            )
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise LymphError(f"scale: expected 0 < low <= high <= 1, got {self.scale}")
        if not self.temperature > 0:
            raise LymphError(f"temperature: expected a positive value, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContrastiveConfig:
        return config_from_dict(cls, d)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ContrastiveNet(nn.Module):
    """``encode(x)``: ``(B, dim)`` embedding; ``forward(x)``: ``(B, proj_dim)`` projection."""

    def __init__(self, config: ContrastiveConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        layers: list[nn.Module] = []
        cin = 3
        for cout in config.channels:
            layers += [*_block(cin, cout), nn.MaxPool2d(2)]
            cin = cout
        layers += [*_block(cin, config.dim), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.backbone = nn.Sequential(*layers)  # (B, 3, S, S) -> (B, dim)
        self.head = nn.Sequential(
            nn.Linear(config.dim, config.proj_hidden), nn.BatchNorm1d(config.proj_hidden),
            nn.ReLU(inplace=True), nn.Linear(config.proj_hidden, config.proj_dim),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# ---- augmentations -----------------------------------------------------------------------
# RGB <-> YIQ: hue is a rotation of the (I, Q) chroma plane, saturation its scaling
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_views(batch: torch.Tensor, config: ContrastiveConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """One random view of every image: float32 ``(B, 3, S, S)`` on [0, 1], on the batch's
    device. ``batch``: uint8 (or float on [0, 255]) ``(B, 3, S, S)``. All random numbers
    come from ``generator`` (CPU), so a seed fixes the views on any device."""
    if batch.ndim != 4 or batch.shape[1] != 3 or batch.shape[-1] != batch.shape[-2]:
        raise ValueError(f"expected (B, 3, S, S) square images, got {tuple(batch.shape)}")
    c, g = config, generator
    b, s, dev = batch.shape[0], batch.shape[-1], batch.device
    with torch.autocast(dev.type, enabled=False):  # exact fp32 pixels under bf16 training
        x = batch.to(torch.float32).contiguous() / 255.0

        # geometry: output coords (normalised to [-1, 1]) -> input coords, theta = (B, 2, 3)
        angle = _uniform(b, 0.0, 2 * math.pi, g)
        flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        side = _uniform(b, c.scale[0], c.scale[1], g).sqrt()  # view side / image side
        shift = _uniform(2 * b, -2 * c.shift, 2 * c.shift, g).view(b, 2)
        cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                             torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(dev), [b, 3, s, s], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        # colour: one 3x3 matrix per image (hue rotation + saturation in YIQ), then
        # contrast around the image's mean grey, then brightness
        hue = _uniform(b, -c.hue, c.hue, g) * 2 * math.pi
        sat = _uniform(b, 1 - c.saturation, 1 + c.saturation, g)
        con = _uniform(b, 1 - c.contrast, 1 + c.contrast, g)
        bri = _uniform(b, 1 - c.brightness, 1 + c.brightness, g)
        rot = torch.zeros(b, 3, 3)
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1] = rot[:, 2, 2] = torch.cos(hue) * sat
        rot[:, 1, 2] = -torch.sin(hue) * sat
        rot[:, 2, 1] = torch.sin(hue) * sat
        m = (_YIQ2RGB @ rot @ _RGB2YIQ).to(dev)  # (B, 3, 3)
        x = torch.einsum("bij,bjhw->bihw", m, x)
        grey = (x * _RGB2YIQ[0].to(dev).view(1, 3, 1, 1)).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (x - grey) * con.to(dev).view(b, 1, 1, 1) + grey
        x = x * bri.to(dev).view(b, 1, 1, 1)

        # blur: separable Gaussian (5 taps), one kernel per image, identity when not drawn
        sigma = _uniform(b, c.blur_sigma[0], c.blur_sigma[1], g)
        blurred = torch.rand(b, generator=g) < c.blur_p
        taps = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-0.5 * (taps.view(1, 5) / sigma.view(b, 1)) ** 2)
        k = torch.where(blurred.view(b, 1), k, (taps == 0).float().view(1, 5))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0).to(dev)  # (3B, 5)
        y = F.pad(x.reshape(1, 3 * b, s, s), (2, 2, 2, 2), mode="reflect")
        y = F.conv2d(y, k.view(3 * b, 1, 5, 1), groups=3 * b)
        y = F.conv2d(y, k.view(3 * b, 1, 1, 5), groups=3 * b)
        return y.view(b, 3, s, s).clamp_(0.0, 1.0)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``z = (2B, P)``: rows ``i`` and ``i + B`` are the two views of one image.

    Each of the 2B views must pick its partner among the other 2B - 1 (cosine similarity
    / temperature, cross-entropy); ``log(2B - 1)`` at chance. Computed in fp32, also
    inside the training step's bf16 autocast (a bf16 similarity matrix keeps 8 bits of
    mantissa: the logits at temperature 0.2 would be off by up to 0.02).
    """
    n = z.shape[0]
    if n % 2 or n < 4:
        raise ValueError(f"nt_xent: expected an even number (>= 4) of views, got {n}")
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.float(), dim=1)
        sim = z @ z.T / temperature  # (2B, 2B), fp32
        sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
        b = n // 2
        target = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
        return F.cross_entropy(sim, target)


# ---- the registry entry --------------------------------------------------------------------
@dataclass(frozen=True)
class ContrastiveMethod:
    """SimCLR on single cells; see the module docstring (its defaults: the registry)."""

    config_cls: type = ContrastiveConfig

    def build(self, config: ContrastiveConfig) -> nn.Module:
        return ContrastiveNet(config)

    def loss(self, model: nn.Module, batch: torch.Tensor, normalise: Preprocess) -> torch.Tensor:
        cfg = _config_of(model)
        v1 = augment_views(batch, cfg, normalise.generator)
        v2 = augment_views(batch, cfg, normalise.generator)
        x = normalise(torch.cat([v1, v2]) * 255.0)  # (2B, 3, S, S), one forward (DDP-safe)
        return nt_xent(model(x), cfg.temperature)

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.encode(x)  # type: ignore[operator]


def _config_of(model: nn.Module) -> ContrastiveConfig:
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the net
    return inner.config  # type: ignore[return-value]


METHOD = ContrastiveMethod()
