"""Masked MIL pooling over padded bags: attention, gated attention, mean, max, dsmil (each
registered by name in :mod:`lymph.head.registry`).

Every pooling takes a padded batch ``x`` of shape ``(B, N, D)`` and a boolean ``mask``
``(B, N)`` (True = a real instance) and returns ``(pooled (B, D), weights (B, N))``. Padded
positions get weight 0 and never influence the result, so a padded bag pools exactly as the
same bag alone (``(1, n, D)``, all True): the tests check this for bags of 1 to > 1000.

- ``attention`` (Ilse et al. 2018, eq. 8): ``a_k = softmax_k(w^T tanh(V h_k))``.
- ``gated`` (Ilse et al. 2018, eq. 9): ``a_k = softmax_k(w^T (tanh(V h_k) * sigm(U h_k)))``.
- ``mean``: weights ``1 / n``.
- ``max``: per-feature maximum; the reported weight of an instance is the share of the ``D``
  features in which it is the bag's maximum (sums to 1 over the bag, for explanation views).
- ``dsmil`` (dual stream, after Li et al. 2021, DSMIL): an instance classifier scores every
  instance, ``c_k = w_c^T h_k``; the critical instance ``m = argmax_k c_k`` anchors the
  attention ``a_k = softmax_k(<q_k, q_m> / sqrt(H))`` with queries ``q = tanh(Q h)``; the
  pooled vector is ``[sum_k a_k h_k, c_m]`` (``D + 1``: the max-instance stream's score
  joins the attention stream's embedding in the MLP).

Poolings whose output is wider than ``D`` say so in ``out_dim``.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 of ``scores (B, N)`` restricted to ``mask``; never NaN.

    Masked positions get exactly 0. A row with no True entry (an empty bag, refused
    upstream) gives all zeros instead of NaN.
    """
    neg = torch.finfo(scores.dtype).min
    s = scores.masked_fill(~mask, neg)
    s = s - s.amax(dim=1, keepdim=True).detach()  # (B, N), max 0 on each non-empty row
    e = torch.exp(s) * mask  # exp(neg - max) underflows to 0 anyway; the product makes it exact
    return e / e.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


class AttentionPool(nn.Module):
    """Ilse et al. attention: ``softmax(w^T tanh(V h))``; ``hidden`` is the size of ``V h``."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1, bias=False)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(x))).squeeze(-1)  # (..., N) from (..., N, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(mask.all()):
            s = self.scores(x)  # (B, N)
        else:  # score real instances only: the (n, hidden) projection is the dominant cost
            flat = mask.reshape(-1).nonzero().squeeze(1)  # (n_real,) positions in B * N
            sr = self.scores(x.reshape(-1, x.shape[-1]).index_select(0, flat))  # (n_real,)
            # out of place (index_add, not masked_scatter): fast under vmap (lymph.head.ensemble)
            s = torch.zeros(mask.numel(), dtype=sr.dtype, device=x.device).index_add(
                0, flat, sr).reshape(mask.shape)
        a = masked_softmax(s, mask)  # (B, N)
        return torch.bmm(a.unsqueeze(1), x).squeeze(1), a  # (B, D), (B, N)


class GatedAttentionPool(AttentionPool):
    """Ilse et al. gated attention: ``softmax(w^T (tanh(V h) * sigmoid(U h)))``."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__(dim, hidden)
        self.U = nn.Linear(dim, hidden)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.V(x)) * torch.sigmoid(self.U(x))).squeeze(-1)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(x.dtype)
        a = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, N)
        return torch.bmm(a.unsqueeze(1), x).squeeze(1), a


class MaxPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        neg = torch.finfo(x.dtype).min
        xm = x.masked_fill(~mask.unsqueeze(-1), neg)  # (B, N, D)
        pooled, arg = xm.max(dim=1)  # (B, D) each
        pooled = torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
        # weight of instance k: share of the D features whose maximum it holds (no gradient)
        a = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        a.scatter_add_(1, arg, torch.full(arg.shape, 1.0 / x.shape[2], dtype=x.dtype,
                                          device=x.device))
        return pooled, a * mask


class DSMILPool(nn.Module):
    """Dual-stream pooling (see the module docstring); ``out_dim = dim + 1``."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.c = nn.Linear(dim, 1)
        self.Q = nn.Linear(dim, hidden)
        self.out_dim = dim + 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        neg = torch.finfo(x.dtype).min
        c = self.c(x).squeeze(-1).masked_fill(~mask, neg)  # (B, N) instance scores
        c_max, m = c.max(dim=1)  # (B,), (B,): the critical instance
        q = torch.tanh(self.Q(x))  # (B, N, H)
        qm = q.gather(1, m.view(-1, 1, 1).expand(-1, 1, q.shape[2]))  # (B, 1, H)
        s = (q * qm).sum(-1) / q.shape[2] ** 0.5  # (B, N)
        a = masked_softmax(s, mask)
        pooled = torch.bmm(a.unsqueeze(1), x).squeeze(1)  # (B, D)
        c_max = torch.where(mask.any(dim=1), c_max, torch.zeros_like(c_max))
        return torch.cat([pooled, c_max.unsqueeze(1)], dim=1), a


def mean_pool(dim: int, hidden: int = 128) -> nn.Module:
    return MeanPool()


def max_pool(dim: int, hidden: int = 128) -> nn.Module:
    return MaxPool()


def make_pooling(name: str, dim: int, hidden: int = 128) -> nn.Module:
    """The pooling ``name`` of the registry (:mod:`lymph.head.registry`) for ``dim``-wide
    instances."""
    from lymph.head.registry import build_pooling

    return build_pooling(name, dim, hidden)
