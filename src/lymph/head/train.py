"""Vectorised training of the MIL head: whole padded mini-batch tensors, no loop over bags.

One optimisation step takes a mini-batch ``(b, L, D)`` cut from a bucket (see
:mod:`lymph.head.bags`) and trimmed to its longest bag. The loss is binary cross-entropy with
class-balanced weights (each class carries half the total weight, ``n / (2 n_c)``), the
optimiser Adam with (L2) weight decay, the network uses dropout. After every epoch the
model is scored on the inner validation patients (weighted BCE, one no-grad forward per
bucket); the weights of the best epoch are kept and training stops ``patience`` epochs
after the last improvement.

Threshold rule (:func:`choose_threshold`, used through :func:`choose_threshold_guarded`): the threshold maximising balanced accuracy on
the inner-validation probabilities, over the midpoints between consecutive distinct
probabilities; ties go to the candidate closest to 0.5 (the natural cut of a
class-balanced loss). ``threshold=0.5`` (or any number) skips the choice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lymph.finite import check_epoch
from lymph.head.bags import Bucket

#: Inference cuts a bucket into chunks of at most this many padded instances x width.
_EVAL_ELEMENTS = 1 << 24


@dataclass
class Group:
    """Patients ready for the network: one bucket of padded bags (or none, clinical only)
    plus their clinical features, labels and loss weights, in bucket order."""

    pos: np.ndarray  # positions in the caller's row list
    x: torch.Tensor | None  # (B, N_max, D)
    mask: torch.Tensor | None  # (B, N_max)
    lengths: np.ndarray | None  # (B,)
    clin: torch.Tensor  # (B, C) standardised
    y: torch.Tensor | None = None  # (B,) float 0/1
    w: torch.Tensor | None = None  # (B,) class-balance weights


def make_groups(buckets: list[Bucket] | None, clin: np.ndarray, y: np.ndarray | None = None
                ) -> list[Group]:
    """Attach clinical features (and labels + class weights when ``y`` is given) to buckets.

    ``clin`` and ``y`` are indexed by position (the order of the rows the buckets were made
    from). Without buckets (clinical-only model) all patients form one group.
    """
    n = clin.shape[0]
    w = None
    if y is not None:
        counts = np.bincount(y.astype(np.int64), minlength=2).astype(np.float64)
        w = (n / (2.0 * np.maximum(counts, 1.0)))[y.astype(np.int64)].astype(np.float32)
    if buckets is None:
        buckets_: list[tuple[np.ndarray, Bucket | None]] = [(np.arange(n), None)]
    else:
        buckets_ = [(b.pos, b) for b in buckets]
    out = []
    for pos, b in buckets_:
        out.append(Group(
            pos=pos, x=None if b is None else b.x, mask=None if b is None else b.mask,
            lengths=None if b is None else b.lengths,
            clin=torch.from_numpy(np.ascontiguousarray(clin[pos], dtype=np.float32)),
            y=None if y is None else torch.from_numpy(y[pos].astype(np.float32)),
            w=None if w is None else torch.from_numpy(w[pos]),
        ))
    return out


def _slice(g: Group, idx: np.ndarray) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if g.x is None or g.mask is None or g.lengths is None:
        return None, None
    t = torch.from_numpy(idx)
    n = int(g.lengths[idx].max())
    return g.x[t, :n], g.mask[t, :n]  # (b, n, D), (b, n): trimmed to the longest bag


@torch.no_grad()
def forward_groups(model: nn.Module, groups: list[Group], n: int,
                   want_weights: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """Logits (n,) by position and, when asked, each patient's instance weights."""
    model.eval()
    logits = np.zeros(n, dtype=np.float32)
    weights: list[np.ndarray] | None = [np.zeros(0, np.float32)] * n if want_weights else None
    for g in groups:
        size = g.x.shape[1] * max(g.x.shape[2], 128) if g.x is not None else 1
        step = max(1, _EVAL_ELEMENTS // max(size, 1))
        for s in range(0, len(g.pos), step):
            idx = np.arange(s, min(s + step, len(g.pos)))
            x, m = _slice(g, idx)
            z, a = model(x, m, g.clin[s : s + len(idx)])
            logits[g.pos[idx]] = z.numpy()
            if weights is not None and a is not None and g.lengths is not None:
                a_np = a.numpy()
                for k, p in enumerate(g.pos[idx]):  # unpadding for output only, not compute
                    weights[p] = a_np[k, : g.lengths[idx[k]]].copy()
    return logits, weights


def weighted_bce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()


@dataclass
class TrainResult:
    best_epoch: int  # 1-based epoch whose weights are kept
    epochs_run: int
    val_loss: list[float] = field(default_factory=list)


#: ``batch_loss(model, x, mask, clin, y, w) -> scalar``: the training loss of one mini-batch.
BatchLoss = Callable[[nn.Module, "torch.Tensor | None", "torch.Tensor | None", torch.Tensor,
                      torch.Tensor, torch.Tensor], torch.Tensor]


def head_bce(model: nn.Module, x: torch.Tensor | None, m: torch.Tensor | None,
             clin: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The default batch loss: class-weighted BCE of the model's logit."""
    z, _ = model(x, m, clin)
    return weighted_bce(z, y, w)


def train(model: nn.Module, train_groups: list[Group], val_groups: list[Group] | None,
          n_val: int, *, lr: float, weight_decay: float, max_epochs: int, patience: int,
          batch_size: int, rng: np.random.Generator, batch_loss: BatchLoss = head_bce,
          fused: bool = True) -> TrainResult:
    """Train ``model`` in place (ending with the best epoch's weights) and report epochs.

    Without validation groups it trains ``max_epochs`` epochs and keeps the last weights.
    ``batch_loss`` replaces the training loss (the mixture of experts adds its experts'
    terms); early stopping always scores the model's own logit by weighted BCE.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay,
                           **({"fused": True} if fused else {"foreach": True}))
    best_loss, best_epoch, best_state = float("inf"), max_epochs, None
    val_y = val_w = None
    if val_groups:
        val_y = torch.cat([g.y for g in val_groups if g.y is not None])
        val_w = torch.cat([g.w for g in val_groups if g.w is not None])
        val_order = np.concatenate([g.pos for g in val_groups])
    history: list[float] = []
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        batches = [(g, chunk) for g in train_groups
                   for chunk in np.array_split(rng.permutation(len(g.pos)),
                                               max(1, round(len(g.pos) / batch_size)))]
        for k in rng.permutation(len(batches)):
            g, idx = batches[k]
            x, m = _slice(g, idx)
            t = torch.from_numpy(idx)
            loss = batch_loss(model, x, m, g.clin[t], g.y[t], g.w[t])  # type: ignore[index]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        check_epoch(float(loss.detach()), epoch, model)  # lymph.finite: diverged = an error
        if val_groups:
            logits, _ = forward_groups(model, val_groups, n_val)
            z = torch.from_numpy(logits[val_order])
            vl = float(weighted_bce(z, val_y, val_w))  # type: ignore[arg-type]
            history.append(vl)
            if vl < best_loss - 1e-6:
                best_loss, best_epoch = vl, epoch
                best_state = copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch=best_epoch, epochs_run=epoch, val_loss=history)


def choose_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The cut maximising balanced accuracy of ``p >= t`` (see the module docstring)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    if y.all() or not y.any():
        return 0.5
    u = np.unique(p)
    cand = np.concatenate([[0.5], (u[:-1] + u[1:]) / 2.0, [u[0] - 1e-9 if u[0] > 0 else 0.0]])
    # recalls of p >= t for every candidate t by counting in the sorted scores: O(n log n),
    # not an (n_cand, n) matrix (64 M cells at 8,000 patients); the same numbers to the bit
    # (count / n as np.mean computes it; a NaN score is never >= t)
    n1, n0 = int(y.sum()), int((~y).sum())
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    tp = pos.size - np.searchsorted(pos, cand, side="left")
    fp = neg.size - np.searchsorted(neg, cand, side="left")
    bacc = 0.5 * (tp / n1 + (n0 - fp) / n0)
    best = np.flatnonzero(bacc >= bacc.max() - 1e-12)
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


def _bacc(y: np.ndarray, pred: np.ndarray) -> float:
    return 0.5 * (pred[y].mean() + (~pred[~y]).mean())


def choose_threshold_guarded(y: np.ndarray, p: np.ndarray, z: float = 2.0) -> float:
    """The bag-count-aware threshold rule: 0.5 unless the tuned cut earns its place.

    The head's loss is class-balanced, so 0.5 is its natural cut. The tuned cut
    (:func:`choose_threshold`) is taken only when its balanced accuracy on these
    probabilities exceeds that of 0.5 by more than ``z`` standard errors of a balanced
    accuracy measured on this many patients, ``0.5 * sqrt(r1 (1 - r1) / n1 + r0 (1 - r0) / n0)``
    (``r_c``: recall of class ``c`` at 0.5, floored at ``1 / n_c`` so that it never vanishes).
    With a few dozen patients a tuned cut must gain about 0.1 to be used; with thousands, a
    real shift of a point or two is.
    """
    yb = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    if yb.all() or not yb.any():
        return 0.5
    t = choose_threshold(yb, p)
    half = p >= 0.5
    gain = _bacc(yb, p >= t) - _bacc(yb, half)
    n1, n0 = int(yb.sum()), int((~yb).sum())
    r1 = float(np.clip(half[yb].mean(), 1.0 / n1, 1.0 - 1.0 / n1)) if n1 > 1 else 0.5
    r0 = float(np.clip((~half[~yb]).mean(), 1.0 / n0, 1.0 - 1.0 / n0)) if n0 > 1 else 0.5
    se = 0.5 * np.sqrt(r1 * (1 - r1) / n1 + r0 * (1 - r0) / n0)
    return t if gain > z * se else 0.5
