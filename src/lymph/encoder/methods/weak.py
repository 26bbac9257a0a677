"""``weak``: the cell scorer trained from patient labels (the model and its loss).

Every cell is labelled with its patient's label (1 malignant, 0 reactive) and a small CNN
learns P(malignant | cell) on the centre crop of the image, with class-balanced BCE and
random rotations / flips. Training K fold scorers and the final one, and writing the
fold-safe store: :mod:`lymph.encoder.weak_folds`; the fold-safety check and diagnostics:
:mod:`lymph.encoder.weak_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lymph.encoder.registry import METHODS
from lymph.configdict import config_from_dict, config_to_dict
from lymph.errors import LymphError

FEATURE_COLUMNS: tuple[str, ...] = METHODS["weak"].feature_columns or ()


# ---- the model -----------------------------------------------------------------------------
@dataclass
class WeakConfig:
    """Architecture of :class:`CellScorer` (stored whole in the checkpoint).

    ``dim`` is the number of per-cell features written (``logit``, ``prob``): always 2.
    Four 3x3 conv blocks (conv, batch norm, ReLU, halving the side), global average
    pooling, dropout, one linear unit. The first block halves the side with a stride-2
    convolution (``stem_stride`` 2), the others with 2x2 max pooling. Cost at 64 px:
    12 M multiply-adds per image forward (0.4 + 4.7 + 4.7 + 2.4 M). Measured on the
    shared 2-core CPU (bf16, batch 128, one thread): 236 training images/s against 132
    with a stride-1 first convolution followed by pooling (``stem_stride`` 1): the
    full-resolution first block is memory-bound and dominated the step.
    """

    dim: int = 2
    size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)
    dropout: float = 0.2
    stem_stride: int = 2  # 1: conv at full resolution then max pool (1.8x slower)
    #: test-time dihedral averaging: a cell's logit is the mean over its 8 rotations / flips
    #: (8x the embedding cost, none in training); kept in the checkpoint, so calibration,
    #: the store and new patients all use it
    tta: bool = False

    def check(self) -> None:
        if self.dim != len(FEATURE_COLUMNS):
            raise LymphError(f"dim: the weak scorer writes {len(FEATURE_COLUMNS)} features "
                             f"({', '.join(FEATURE_COLUMNS)}), got {self.dim}")
        f = 2 ** len(self.channels)
        if self.size % f or self.size < f:
            raise LymphError(f"image size {self.size}: the weak scorer needs a side divisible by "
                             f"{f} (e.g. 32, 64, 112); re-ingest at another `size`")
        if self.stem_stride not in (1, 2):
            raise LymphError(f"stem_stride: expected 1 or 2, got {self.stem_stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise LymphError(f"dropout: expected a number in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeakConfig:
        return config_from_dict(cls, d)


class CellScorer(nn.Module):
    """``forward(x)``: ``(B, 3, S, S)`` normalised images -> ``(B,)`` cell logits."""

    def __init__(self, config: WeakConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        layers: list[nn.Module] = []
        chans = (3, *config.channels)
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            stride = config.stem_stride if i == 0 else 1
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if stride == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)  # (B, C, S/16, S/16)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout),
                                  nn.Linear(chans[-1], 1))
        # the calibration a * logit + b fitted after training (:func:`calibrate`); identity
        # until then. Buffers, so the checkpoint that scores new patients carries it.
        self.register_buffer("cal_scale", torch.tensor(1.0))
        self.register_buffer("cal_shift", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The raw (uncalibrated) cell logit, ``(B,)``: what the loss trains."""
        h = self.features(x).mean(dim=(2, 3))  # global average pooling: (B, C)
        return self.head(h).squeeze(1)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, v in (("cal_scale", 1.0), ("cal_shift", 0.0)):  # checkpoints from before
            state_dict.setdefault(prefix + name, torch.tensor(v))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass(frozen=True)
class WeakMethod:
    """The method: class-balanced BCE of an augmented view against the per-image
    ``targets[:, 0]`` (the patient's label) weighted by ``targets[:, 1]``."""

    config_cls: type = WeakConfig

    def build(self, config: WeakConfig) -> nn.Module:
        return CellScorer(config)

    def loss(self, model: nn.Module, batch: torch.Tensor, normalise: Any,
             targets: torch.Tensor) -> torch.Tensor:
        x = normalise(normalise.augment(batch))
        logit = model(x).float()
        y, w = targets[:, 0].float(), targets[:, 1].float()
        bce = nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
        return (w * bce).mean()

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raw = dihedral_mean(model, x) if getattr(model.config, "tta", False) else model(x).float()
        logit = raw * model.cal_scale + model.cal_shift  # calibrated
        return torch.stack([logit, torch.sigmoid(logit)], dim=1)  # (B, 2): logit, prob


def dihedral_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean raw logit over the 8 rotations by 90 degrees and flips of ``x (B, C, S, S)``."""
    total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    for flip in (False, True):
        v = torch.flip(x, dims=(3,)) if flip else x
        for k in range(4):  # a rotated view is strided: copied back to x's layout, or the
            # convolutions take a path 2x slower (measured on the CPU)
            total += model(torch.rot90(v, k, dims=(2, 3)).contiguous(memory_format=fmt)
                           if k else v).float()
    return total / 8.0


METHOD = WeakMethod()
