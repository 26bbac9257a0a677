"""Masked pooling: a padded bag pools exactly like the same bag alone; no NaN, ever."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lymph.head.bags import Scaler, bucket_rows, make_buckets, pad
from lymph.head.pooling import make_pooling, masked_softmax
from lymph.head.registry import pooling_names

POOLINGS = pooling_names()

torch.set_num_threads(1)
SIZES = [1, 2, 7, 1, 40, 1100]  # bags of 1 and one bag well over 1,000 instances


def _bags(dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ptr = np.concatenate([[0], np.cumsum(SIZES)]).astype(np.int64)
    return rng.normal(0, 2, (int(ptr[-1]), dim)).astype(np.float32), ptr


@pytest.mark.parametrize("name", POOLINGS)
def test_padded_pooling_equals_unpadded_per_bag(name: str) -> None:
    torch.manual_seed(0)
    emb, ptr = _bags()
    pool = make_pooling(name, emb.shape[1], hidden=16).eval()
    x, mask = pad(emb, ptr, np.arange(len(SIZES)))
    assert x.shape == (len(SIZES), max(SIZES), emb.shape[1])
    with torch.no_grad():
        pooled, a = pool(torch.from_numpy(x), torch.from_numpy(mask))
        for i, n in enumerate(SIZES):
            alone = torch.from_numpy(emb[ptr[i] : ptr[i + 1]])[None]  # (1, n, D), unpadded
            p1, a1 = pool(alone, torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(pooled[i], p1[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a[i, :n], a1[0], rtol=1e-5, atol=1e-6)
            assert float(a[i, n:].abs().sum()) == 0.0  # padding gets no weight
            assert abs(float(a[i].sum()) - 1.0) < 1e-5
            if n == 1:
                torch.testing.assert_close(p1[0, : emb.shape[1]], alone[0, 0])  # dsmil: + score
    if name == "mean":
        torch.testing.assert_close(pooled[5], torch.from_numpy(emb[ptr[5]:ptr[6]].mean(0)),
                                   rtol=1e-5, atol=1e-5)
    if name == "max":
        torch.testing.assert_close(pooled[4], torch.from_numpy(emb[ptr[4]:ptr[5]].max(0)),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("name", POOLINGS)
def test_gradients_are_finite_for_short_bags_and_extreme_values(name: str) -> None:
    torch.manual_seed(0)
    pool = make_pooling(name, 3, hidden=8)
    x = torch.tensor([[[1e4, -1e4, 0.0], [0, 0, 0]], [[5.0, 1, 2], [-3, 0, 1e3]]],
                     requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    pooled, a = pool(x, mask)
    pooled.sum().backward()
    assert torch.isfinite(pooled).all() and torch.isfinite(a).all()
    assert torch.isfinite(x.grad).all()


def test_masked_softmax_never_nan() -> None:
    s = torch.tensor([[3.0, 1e30, -1e30], [0.0, 0.0, 0.0], [float("-inf"), 2.0, 1.0]])
    m = torch.tensor([[True, False, False], [False, False, False], [False, True, True]])
    a = masked_softmax(s, m)
    assert torch.isfinite(a).all()
    assert a[0].tolist() == [1.0, 0.0, 0.0]  # a bag of one
    assert a[1].tolist() == [0.0, 0.0, 0.0]  # an empty row: zeros, not NaN
    assert a[2, 0] == 0 and abs(float(a[2].sum()) - 1) < 1e-6


def test_buckets_cover_every_bag_once_and_bound_padding() -> None:
    rng = np.random.default_rng(1)
    sizes = np.concatenate([rng.integers(1, 30, 200), rng.integers(500, 3000, 20)])
    groups = bucket_rows(sizes, max_ratio=2.0, min_bucket=16)
    allpos = np.sort(np.concatenate(groups))
    np.testing.assert_array_equal(allpos, np.arange(sizes.size))
    assert len(groups) > 2
    padded = sum(len(g) * sizes[g].max() for g in groups)
    assert padded < 2.5 * sizes.sum()  # one (B, N_max) tensor would waste far more
    assert sizes.size * sizes.max() > 10 * sizes.sum()  # what a single tensor would cost
    # one size: one bucket
    assert len(bucket_rows(np.full(50, 7))) == 1


def test_make_buckets_standardises_and_keeps_padding_zero() -> None:
    emb, ptr = _bags(dim=4)
    sc = Scaler.fit(emb)
    buckets = make_buckets(emb, ptr, np.arange(len(SIZES)), sc, min_bucket=1)
    seen = 0
    for b in buckets:
        for k, p in enumerate(b.pos):
            n = SIZES[p]
            want = (emb[ptr[p]:ptr[p + 1]] - sc.mean) / sc.std
            np.testing.assert_allclose(b.x[k, :n].numpy(), want, rtol=1e-5, atol=1e-5)
            assert float(b.x[k, n:].abs().sum()) == 0.0 and int(b.mask[k].sum()) == n
            seen += 1
    assert seen == len(SIZES)
