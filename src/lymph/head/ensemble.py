"""An inner-cross-validation ensemble of MIL heads, trained as one vectorised network.

With few bags, one inner validation split (20% of ~80 bags = 16 bags) makes early stopping
and the decision threshold hinge on a dozen patients. Instead the fit patients are cut into
``K`` stratified inner folds and ``K`` heads (*members*) of the same architecture are
trained together: member ``k`` learns from the patients outside fold ``k`` (class-balanced
weights over those) and is early-stopped on fold ``k``. Every fit patient is then scored
once out of fold (by the member that did not train on it): the threshold rule sees all fit
patients, not a fifth of them. The prediction is the mean of the members' probabilities.

Vectorised: the members' parameters are stacked on a leading axis ``(K, ...)`` (initialised
as ``K`` :class:`~lymph.head.model.MILHead` would be) and all ``K`` heads run on the same
padded mini-batch ``(b, L, D)`` at once: the attention projection of the real instances is
one ``(n_real, D) @ (D, K * H)`` matmul, the MLP a batched matmul ``(K, b, .)``; a member
ignores the bags of its own fold through a zero loss weight. No loop over
bags, nor over members. The Adam update is elementwise, so stacked members train exactly as
``K`` separate ones would on these batches.

Cost (issue 17): after each epoch member ``k`` is scored on fold ``k`` only, from padded
chunks built once per fit (:func:`fold_chunks`), not all members on all patients; a
member that has stalled (``patience`` epochs without improvement; its best weights are
kept aside) leaves the stacked parameters and the Adam state (:func:`_drop_members`), so
it costs no compute, gradient or optimiser step. Neither changes any number.

``MILEnsemble.forward`` has the :class:`~lymph.head.model.MILHead` signature: the logit of
the mean member probability (computed in log space, always finite) and the mean member
instance weights (still summing to 1 over a bag).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state

from lymph.head.bags import bucket_rows
from lymph.head.model import HeadConfig, MILHead
from lymph.head.pooling import masked_softmax
from lymph.head.train import _EVAL_ELEMENTS, Group, _slice


def build_head(cfg: HeadConfig) -> nn.Module:
    """The network of ``cfg``: one :class:`~lymph.head.model.MILHead`, or with
    ``members > 1`` the vectorised ensemble :class:`MILEnsemble` (same forward signature)."""
    if cfg.members > 1:
        return MILEnsemble(cfg)
    return MILHead(cfg)


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names may not contain dots


class MILEnsemble(nn.Module):
    """``cfg.members`` heads of configuration ``cfg`` (``members >= 2``), parameters stacked."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        heads = [MILHead(replace(cfg, members=1)) for _ in range(cfg.members)]
        params, _ = stack_module_state(heads)  # type: ignore[arg-type]
        self.names = list(params)
        self.stacked = nn.ParameterDict({_key(n): nn.Parameter(p.detach().clone())
                                         for n, p in params.items()})
        self._base = [copy.deepcopy(heads[0]).to("meta")]  # a list: not a registered submodule
        #: members computed by :meth:`members` (None: all); training drops stalled members
        self.active: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.cfg.members

    def _k(self) -> int:
        """Members computed: :attr:`active`, else all stacked (fewer than ``k`` while
        :func:`train_members` holds only the members still training)."""
        if self.active is not None:
            return int(self.active.numel())
        return int(self.stacked[_key(self.names[0])].shape[0])

    def _p(self, name: str) -> torch.Tensor:
        p = self.stacked[_key(name)]
        return p if self.active is None else p.index_select(0, self.active)

    def _pool(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``(K, B, D)`` and weights ``(K, B, N)``: one matmul for all members."""
        k, (b, n, d) = self._k(), x.shape
        name = self.cfg.pooling
        if not any(p.startswith("pool.") for p in self.names):  # no parameters (mean, max,
            # any such registered pooling): the same for every member
            pooled, a = self._base[0].pool(x, mask)  # (B, D), (B, N)
            return pooled.expand(k, b, pooled.shape[-1]), a.expand(k, b, n)
        if name not in ("attention", "gated", "dsmil"):  # others: vmap over the members
            return self._pool_vmap(x, mask)
        flat = mask.reshape(-1).nonzero().squeeze(1)  # (n_real,)
        real = x.reshape(-1, d).index_select(0, flat)  # (n_real, D)

        def proj(layer: str) -> torch.Tensor:  # (n_real, K, H)
            w, bias = self._p(f"pool.{layer}.weight"), self._p(f"pool.{layer}.bias")  # (K, H, D)
            return (real @ w.reshape(-1, d).T + bias.reshape(-1)).view(real.shape[0], k, -1)

        if name == "dsmil":
            return self._dsmil(x, mask, flat, proj)

        t = torch.tanh(proj("V"))
        if name == "gated":
            t = t * torch.sigmoid(proj("U"))
        sc = torch.einsum("rkh,kh->kr", t, self._p("pool.w.weight")[:, 0, :])  # (K, n_real)
        s = torch.zeros(k, b * n, dtype=sc.dtype).index_add(1, flat, sc).view(k * b, n)
        a = masked_softmax(s, mask.repeat(k, 1)).view(k, b, n)
        pooled = torch.matmul(a.transpose(0, 1), x).transpose(0, 1)  # (B,K,N)@(B,N,D) -> (K,B,D)
        return pooled, a

    def _dsmil(self, x: torch.Tensor, mask: torch.Tensor, flat: torch.Tensor, proj: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """:class:`~lymph.head.pooling.DSMILPool` for all members at once."""
        k, (b, n, _) = self._k(), x.shape
        neg = torch.finfo(x.dtype).min
        c_real = proj("c")[:, :, 0].T  # (K, n_real) instance scores
        c = torch.zeros(k, b * n, dtype=x.dtype).index_add(1, flat, c_real).view(k, b, n)
        c = c.masked_fill(~mask, neg)
        c_max, m = c.max(dim=2)  # (K, B): the critical instance of each bag, per member
        q = torch.tanh(proj("Q")).transpose(0, 1)  # (K, n_real, H)
        inv = torch.zeros(b * n, dtype=torch.long).index_put((flat,), torch.arange(flat.numel()))
        crit = inv[(torch.arange(b) * n).unsqueeze(0) + m]  # (K, B) index among real instances
        qm = q.gather(1, crit.unsqueeze(-1).expand(-1, -1, q.shape[2]))  # (K, B, H)
        bag_of = flat // n  # (n_real,)
        s_real = (q * qm[:, bag_of]).sum(-1) / q.shape[2] ** 0.5  # (K, n_real)
        s = torch.zeros(k, b * n, dtype=x.dtype).index_add(1, flat, s_real).view(k * b, n)
        a = masked_softmax(s, mask.repeat(k, 1)).view(k, b, n)
        pooled = torch.matmul(a.transpose(0, 1), x).transpose(0, 1)  # (K, B, D)
        c_max = torch.where(mask.any(dim=1), c_max, torch.zeros_like(c_max))
        return torch.cat([pooled, c_max.unsqueeze(-1)], dim=2), a

    def _pool_vmap(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Any pooling module, all members at once through ``torch.func.vmap``."""
        from torch.func import functional_call, vmap

        pool = self._base[0].pool
        p = {n[len("pool."):]: self._p(n) for n in self.names if n.startswith("pool.")}
        return vmap(lambda p_, x_, m_: functional_call(pool, p_, (x_, m_)),
                    in_dims=(0, None, None))(p, x, mask)

    def members(self, x: torch.Tensor | None, mask: torch.Tensor | None,
                clin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every member's logits ``(K, B)`` and instance weights ``(K, B, N)`` (None without
        images). With :attr:`active` set, only those members (in that order)."""
        k = self._k()
        c = clin.expand(k, *clin.shape)  # (K, B, C)
        a = None
        if x is None or mask is None:
            z = c
        else:
            pooled, a = self._pool(x, mask)
            z = torch.cat([pooled, c], dim=2) if clin.shape[1] else pooled
        n_layers = len(self.cfg.mlp)
        for i in range(n_layers + 1):  # Linear, ReLU, Dropout triples, then the output layer
            w, bias = self._p(f"mlp.{3 * i}.weight"), self._p(f"mlp.{3 * i}.bias")
            z = torch.baddbmm(bias.unsqueeze(1), z, w.transpose(1, 2))  # (K, B, out)
            if i < n_layers:
                z = F.dropout(torch.relu(z), self.cfg.dropout, self.training)
        return z.squeeze(-1), a

    def forward(self, x: torch.Tensor | None, mask: torch.Tensor | None,
                clin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z, a = self.members(x, mask, clin)  # (K, B), (K, B, N)
        log_k = math.log(self.k)
        log_p = torch.logsumexp(F.logsigmoid(z), dim=0) - log_k  # log mean p
        log_q = torch.logsumexp(F.logsigmoid(-z), dim=0) - log_k  # log mean (1 - p)
        return log_p - log_q, None if a is None else a.mean(dim=0)


@torch.no_grad()
def member_logits(model: MILEnsemble, groups: list[Group], n: int) -> torch.Tensor:
    """Every (active) member's logit for every patient, ``(K, n)`` by position (eval mode)."""
    model.eval()
    out = torch.zeros(model._k(), n)
    for g in groups:
        size = g.x.shape[1] * max(g.x.shape[2], 128) * model.k if g.x is not None else 1
        step = max(1, _EVAL_ELEMENTS // max(size, 1))
        for s in range(0, len(g.pos), step):
            idx = np.arange(s, min(s + step, len(g.pos)))
            x, m = _slice(g, idx)
            z, _ = model.members(x, m, g.clin[s : s + len(idx)])
            out[:, torch.from_numpy(g.pos[idx])] = z
    return out


@dataclass
class FoldChunk:
    """Validation patients of one member (its inner fold), padded once before training."""

    member: int
    pos: torch.Tensor  # (b,) positions of these patients
    x: torch.Tensor | None  # (b, n, D), trimmed to the chunk's longest bag
    mask: torch.Tensor | None  # (b, n)
    clin: torch.Tensor  # (b, C)


def fold_chunks(groups: list[Group], fold_of: np.ndarray, k: int) -> list[FoldChunk]:
    """Each member's fold, gathered from all buckets into padded chunks of bags of similar
    size (:func:`~lymph.head.bags.bucket_rows`), at most ``_EVAL_ELEMENTS`` elements each.

    Built once per fit: the validation after every epoch then copies nothing, and runs
    each member on its own patients only. Vectorised per bucket (loops over the ``K``
    members and the few buckets, never over bags).
    """
    out: list[FoldChunk] = []
    for j in range(k):
        parts = [(g, np.flatnonzero(fold_of[g.pos] == j)) for g in groups]
        parts = [(g, i) for g, i in parts if i.size]
        if not parts:
            continue
        src_g = np.concatenate([np.full(i.size, q) for q, (_, i) in enumerate(parts)])
        src_i = np.concatenate([i for _, i in parts])
        pos = np.concatenate([g.pos[i] for g, i in parts])
        clin = torch.cat([g.clin[torch.from_numpy(i)] for g, i in parts])
        first = parts[0][0]
        if first.x is None or first.lengths is None:  # clinical only: one chunk
            out.append(FoldChunk(j, torch.from_numpy(pos), None, None, clin))
            continue
        lengths = np.concatenate([g.lengths[i] for g, i in parts])  # type: ignore[index]
        d = first.x.shape[2]
        for sel in bucket_rows(lengths):
            n_max = int(lengths[sel].max())
            step = max(1, _EVAL_ELEMENTS // (n_max * max(d, 128)))
            for s in range(0, sel.size, step):
                part = sel[s : s + step]
                n_part = int(lengths[part].max())  # trimmed to this chunk's longest bag
                x = torch.zeros(part.size, n_part, d)
                m = torch.zeros(part.size, n_part, dtype=torch.bool)
                for q, (g, _) in enumerate(parts):  # a handful of buckets
                    h = np.flatnonzero(src_g[part] == q)
                    if h.size:
                        t, w = torch.from_numpy(src_i[part[h]]), min(n_part, g.x.shape[1])
                        th = torch.from_numpy(h)
                        x[th, :w] = g.x[t, :w]  # type: ignore[index]
                        m[th, :w] = g.mask[t, :w]  # type: ignore[index]
                out.append(FoldChunk(j, torch.from_numpy(pos[part]), x, m,
                                     clin[torch.from_numpy(part)]))
    return out


@torch.no_grad()
def chunk_logits(model: MILEnsemble, chunks: list[FoldChunk], n: int,
                 members: np.ndarray | None = None) -> torch.Tensor:
    """Logits ``(n,)`` by position: each chunk's patients scored by its member only (eval
    mode). ``members``: the members held by the model, in its stacked order (during
    training, those still training); the other members' patients stay 0."""
    model.eval()
    out = torch.zeros(n)
    at = {j: i for i, j in enumerate(range(model._k()) if members is None else members.tolist())}
    saved = model.active
    try:
        for c in chunks:
            if c.member not in at:
                continue
            model.active = torch.tensor([at[c.member]])
            z, _ = model.members(c.x, c.mask, c.clin)  # (1, b)
            out[c.pos] = z[0]
    finally:
        model.active = saved
    return out


def fold_logits(model: MILEnsemble, groups: list[Group], fold_of: np.ndarray) -> torch.Tensor:
    """Each patient's logit by the member that validates it, ``(n,)`` by position: patient
    ``i`` scored by member ``fold_of[i]``. The same numbers as
    ``member_logits(...)[fold_of, arange(n)]`` at ``1 / K`` of the cost."""
    return chunk_logits(model, fold_chunks(groups, fold_of, model.k), fold_of.size)


def member_weights(fold_of: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Loss weights ``(K, n)``: member ``k`` trains on positions outside fold ``k`` and is
    validated on fold ``k``, each with class-balanced weights (each class half the total)."""
    y = y.astype(np.int64)
    tr = np.zeros((k, y.size), np.float32)
    va = np.zeros((k, y.size), np.float32)
    for j in range(k):  # K is a handful of members, never a loop over bags
        for dst, sel in ((tr, fold_of != j), (va, fold_of == j)):
            counts = np.bincount(y[sel], minlength=2).astype(np.float64)
            w = sel.sum() / (2.0 * np.maximum(counts, 1.0))
            dst[j] = np.where(sel, w[y], 0.0)
    return tr, va


def _member_bce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per member weighted BCE ``(K,)`` of logits ``z (K, b)``; 0 for a member without weight."""
    loss = F.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none") * w
    return loss.sum(dim=1) / w.sum(dim=1).clamp_min(1e-12)


def _drop_members(model: MILEnsemble, opt: torch.optim.Optimizer, held: np.ndarray,
                  keep: np.ndarray) -> np.ndarray:
    """Keep only members ``held[keep]`` in the model's stacked parameters and in the Adam
    state (moments sliced, step kept), so that stalled members cost no compute, no
    gradient and no optimiser step. Adam is elementwise: the kept members' updates are
    unchanged. Returns the new ``held``."""
    sel = torch.from_numpy(np.flatnonzero(keep))
    new_params = []
    with torch.no_grad():
        for name in list(model.stacked):
            old = model.stacked[name]
            new = nn.Parameter(old.index_select(0, sel))
            state = opt.state.pop(old, None)
            if state:
                opt.state[new] = {key: (v.index_select(0, sel) if key != "step" else v.clone())
                                  for key, v in state.items()}
            model.stacked[name] = new
            new_params.append(new)
    opt.param_groups[0]["params"] = new_params
    return held[keep]


def train_members(model: MILEnsemble, groups: list[Group], n: int, y: np.ndarray,
                  fold_of: np.ndarray, *, lr: float, weight_decay: float, max_epochs: int,
                  patience: int, batch_size: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, int, np.ndarray]:
    """Train all members (see the module docstring); each ends at its own best epoch.

    Returns each member's best epoch (1-based), the epochs run, and the out-of-fold logits
    ``(n,)``: patient ``i`` scored by member ``fold_of[i]``.
    """
    k = model.k
    w_tr, w_va = member_weights(fold_of, y, k)
    w_tr_t, w_va_t = torch.from_numpy(w_tr), torch.from_numpy(w_va)
    y_t = torch.from_numpy(y.astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    best = torch.full((k,), float("inf"))
    best_epoch = np.full(k, max_epochs)
    best_state = {n_: p.detach().clone() for n_, p in model.stacked.items()}
    chunks = fold_chunks(groups, fold_of, k)  # validation: member k on fold k only
    held = np.arange(k)  # the members whose parameters the model holds, in stacked order
    ran = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        stalled = (epoch - 1 - best_epoch >= patience) & np.isfinite(best.numpy())
        if stalled.all():
            break
        if stalled[held].any():  # stalled members leave the model and the optimiser
            held = _drop_members(model, opt, held, ~stalled[held])
        act = torch.from_numpy(held)
        w_act = w_tr_t.index_select(0, act)
        batches = [(g, chunk) for g in groups
                   for chunk in np.array_split(rng.permutation(len(g.pos)),
                                               max(1, round(len(g.pos) / batch_size)))]
        for j in rng.permutation(len(batches)):
            g, idx = batches[j]
            x, m = _slice(g, idx)
            pos = torch.from_numpy(g.pos[idx])
            z, _ = model.members(x, m, g.clin[torch.from_numpy(idx)])  # (K, b)
            loss = _member_bce(z, y_t[pos], w_act[:, pos]).sum()  # members are independent
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ran = epoch
        vl = best.clone()
        z_va = chunk_logits(model, chunks, n, held).expand(held.size, n)
        vl[act] = _member_bce(z_va, y_t, w_va_t.index_select(0, act))  # fold k's weights only
        improved = vl < best - 1e-6
        if bool(improved.any()):
            best = torch.where(improved, vl, best)
            best_epoch[improved.numpy()] = epoch
            imp = improved.numpy()[held]  # among the held members
            with torch.no_grad():
                for name, p in model.stacked.items():
                    best_state[name][torch.from_numpy(held[imp])] = p[torch.from_numpy(imp)]
    with torch.no_grad():  # every member's best weights, all K held again
        for name in list(model.stacked):
            model.stacked[name] = nn.Parameter(best_state[name])
    model.active = None
    model.eval()
    oof = chunk_logits(model, chunks, n).numpy()
    return best_epoch, ran, oof
