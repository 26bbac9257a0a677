"""From a store's CSR arrays to padded, masked tensors; standardisation fitted on training data.

A set of patients becomes a few *buckets*: patients sorted by bag size and grouped so that
the longest bag of a bucket is at most ``max_ratio`` times its shortest (bags of 16 to 198
instances make about four buckets; bags of one size make one). Each bucket is one padded
tensor ``x (B, N_max, D)`` float32 with a bool ``mask (B, N_max)``, built with vectorised
numpy indexing (no loop over bags). Training draws mini-batches inside a bucket and trims
them to their own longest bag, so padding wastes little even when sizes vary from 1 to
thousands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lymph.errors import LymphError
from lymph.store import bag_rows


@dataclass
class Scaler:
    """Per-column standardisation ``(x - mean) / std`` (std < 1e-6 counts as 1).

    Stored as JSON numbers in a model directory (:meth:`to_json`), never pickled.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, block: int = 1 << 16) -> Scaler:
        """Mean and (population) std in float64, in blocks of rows: a million float32
        instances never become a float64 copy (cohort scale, issue 17)."""
        x = np.asarray(x)
        if x.shape[0] == 0:
            return cls(np.zeros(x.shape[1]), np.ones(x.shape[1]))
        mean = x.mean(axis=0, dtype=np.float64)
        ss = np.zeros(x.shape[1])
        for s in range(0, x.shape[0], block):  # blocks of rows, not a loop over bags
            d = x[s : s + block].astype(np.float64) - mean
            ss += np.einsum("ij,ij->j", d, d)
        std = np.sqrt(ss / x.shape[0])
        return cls(mean, np.where(std < 1e-6, 1.0, std))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Scaler:
        return cls(np.asarray(obj["mean"], dtype=np.float64), np.asarray(obj["std"], dtype=np.float64))


def pad(emb: np.ndarray, ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad the bags of ``rows`` into ``x (B, N_max, D)`` and ``mask (B, N_max)`` (vectorised)."""
    rows = np.asarray(rows, dtype=np.int64)
    sizes = ptr[rows + 1] - ptr[rows]
    n_max = int(sizes.max()) if sizes.size else 0
    x = np.zeros((rows.size, n_max, emb.shape[1]), dtype=np.float32)
    mask = np.zeros((rows.size, n_max), dtype=bool)
    if sizes.sum():
        b = np.repeat(np.arange(rows.size), sizes)  # bag of each instance
        src, pos = bag_rows(ptr, rows)  # row in the store, index in bag
        x[b, pos] = emb[src]
        mask[b, pos] = True
    return x, mask


def bucket_rows(sizes: np.ndarray, max_ratio: float = 2.0, min_bucket: int = 16) -> list[np.ndarray]:
    """Group positions ``0..len(sizes)-1`` by size: in a bucket, longest <= ``max_ratio`` x
    shortest, unless that would leave fewer than ``min_bucket`` bags in it."""
    order = np.argsort(sizes, kind="stable")
    s = sizes[order]
    out: list[np.ndarray] = []
    i, n = 0, len(s)
    while i < n:
        j = i + 1
        while j < n and (s[j] <= max_ratio * max(s[i], 1) or j - i < min_bucket):
            j += 1
        if n - j < min_bucket:  # too few left for a bucket of their own
            j = n
        out.append(order[i:j])
        i = j
    return out


@dataclass
class Bucket:
    """Padded bags of some patients. ``pos`` are their positions in the caller's row list."""

    pos: np.ndarray
    x: torch.Tensor  # (B, N_max, D) float32, standardised, 0 at padding
    mask: torch.Tensor  # (B, N_max) bool
    lengths: np.ndarray  # (B,) int


def make_buckets(emb: np.ndarray, ptr: np.ndarray, rows: np.ndarray, scaler: Scaler | None,
                 max_ratio: float = 2.0, min_bucket: int = 16) -> list[Bucket]:
    """Buckets of standardised, padded bags for store rows ``rows`` (positions index ``rows``)."""
    rows = np.asarray(rows, dtype=np.int64)
    sizes = ptr[rows + 1] - ptr[rows]
    out = []
    for pos in bucket_rows(sizes, max_ratio, min_bucket):
        x, mask = pad(emb, ptr, rows[pos])
        if scaler is not None:  # in place: no padded-size temporaries (cohort scale)
            x -= scaler.mean.astype(np.float32)
            x /= scaler.std.astype(np.float32)
            x *= mask[..., None]
        out.append(Bucket(pos, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                          torch.from_numpy(mask), sizes[pos]))
    return out


def instances_of(emb: np.ndarray, ptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """All instance rows of the given patients, concatenated (for fitting the scaler)."""
    return emb[bag_rows(ptr, rows)[0]]


def check_bags(store: Any, rows: np.ndarray) -> None:
    """Refuse patients with no images (a MIL head cannot score an empty bag)."""
    sizes = store.bag_sizes[rows]
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        where = store.path if store.path is not None else "store"
        ids = ", ".join(str(store.ids[rows[k]]) for k in empty[:5])
        raise LymphError(f"{where}: /patient_ptr: patient(s) {ids} have no images; "
                         "expected at least one image per patient for an image model")
