"""The MIL head: pooling over a patient's instances, concatenated with the standardised
clinical features, then an MLP (default 256 -> 128, ReLU, dropout) ending in one logit.

``HeadConfig`` holds everything needed to rebuild the network (it is saved in a model
directory's JSON), so inference needs no other source of settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lymph.configdict import config_from_dict, config_to_dict
from lymph.errors import LymphError
from lymph.head.pooling import make_pooling
from lymph.head.registry import check_pooling


@dataclass
class HeadConfig:
    dim: int  # instance feature size (0 when images are not used)
    n_clinical: int  # clinical features fed to the MLP (0 when not used)
    pooling: str = "attention"
    attention_hidden: int = 128
    mlp: tuple[int, ...] = field(default=(256, 128))
    dropout: float = 0.25
    members: int = 1  # > 1: an inner-CV ensemble of that many heads (lymph.head.ensemble)

    @property
    def images(self) -> bool:
        return self.dim > 0

    def to_json(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HeadConfig:
        return config_from_dict(cls, d)


class MILHead(nn.Module):
    """``forward(x (B, N, D), mask (B, N), clin (B, C)) -> (logits (B,), weights (B, N))``.

    With ``dim == 0`` (clinical only) ``x`` and ``mask`` are ignored and weights are None.
    """

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        check_pooling(cfg.pooling)
        if cfg.dim == 0 and cfg.n_clinical == 0:
            raise LymphError("head: no input left (images off and no clinical features); "
                             "expected images, clinical features or both")
        self.cfg = cfg
        self.pool = make_pooling(cfg.pooling, cfg.dim, cfg.attention_hidden) if cfg.images else None
        layers: list[nn.Module] = []
        width = (getattr(self.pool, "out_dim", cfg.dim) if self.pool is not None else 0) + cfg.n_clinical
        for h in cfg.mlp:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor | None, mask: torch.Tensor | None,
                clin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pool is None:
            return self.mlp(clin).squeeze(-1), None
        pooled, a = self.pool(x, mask)  # (B, D), (B, N)
        z = torch.cat([pooled, clin], dim=1) if clin.shape[1] else pooled
        return self.mlp(z).squeeze(-1), a
