"""Benchmark of ``fit-head``: vectorised training against reference-style MIL training.

:func:`bench_fit_head` times a 5-fold cross-validation of :class:`MILClassifier` (compute
only: the store is already in memory, imports and torch's lazy set-up are warmed by one
untimed fit), the median over ``repeats`` runs. Then, in the same run and on the same
folds, it trains the same model the way reference MIL code does (Ilse et al.'s
``AttentionDeepMIL``: one bag per optimisation step, batch size 1, a Python loop over the
bags; the validation pass also one bag at a time) for exactly the epochs each fold's
vectorised model ran, keeping the best inner-validation epoch the same way. Same network,
scalers, inner split, learning rate, loss weights and threshold rule: only the batching
differs.

    python -c "from lymph.head.bench import main; main()" [STORE.h5]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from lymph.head.estimator import MILClassifier
from lymph.head.evaluate import cross_validate, make_folds, summarise
from lymph.head.train import TrainResult, weighted_bce


def fake_store(n_patients: int = 135, dim: int = 60, sizes: tuple[int, int] = (16, 198),
               n_labelled: int = 123, signal: float = 0.7, seed: int = 0) -> Any:
    """An in-memory store shaped like the dev set (135 patients, 16-198 images, dim 60) with
    a planted signal: in malignant bags about half the instances have feature 0 shifted."""
    from lymph.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    labels = (rng.random(n_patients) < 0.69).astype(np.int8)
    labels[n_labelled:] = -1
    # skewed like the dev set (median ~66, about 10,000 images in all), clipped to ``sizes``
    sz = np.clip(np.round(rng.lognormal(np.log(66), 0.5, n_patients)), *sizes).astype(np.int64)
    ptr = np.concatenate([[0], np.cumsum(sz)]).astype(np.int64)
    emb = rng.normal(0, 1, (int(ptr[-1]), dim)).astype(np.float32)
    for i in np.flatnonzero(labels == 1):
        rows = np.arange(ptr[i], ptr[i + 1])
        emb[rows[rng.random(rows.size) < 0.5], 0] += signal
    clinical = rng.normal(0, 1, (n_patients, 3)).astype(np.float32)
    clinical[:, 1] += 0.8 * (labels == 1)
    return EmbeddingStore(path=None, embeddings=emb, patient_ptr=ptr,
                          ids=np.array([f"P{i}" for i in range(n_patients)], dtype=object),
                          labels=labels, clinical=clinical,
                          clinical_columns=["age", "log_lymph_count", "gender_male"],
                          fingerprint="fake")


class ReferenceMILClassifier(MILClassifier):
    """The same head trained reference-style: one bag per step, a Python loop over bags,
    for a fixed number of epochs (``max_epochs``), keeping the best inner-validation epoch."""

    def _train(self, store: Any, rows: np.ndarray, tr: np.ndarray, va: np.ndarray,
               zc: np.ndarray, y: np.ndarray) -> tuple[TrainResult, np.ndarray]:
        sc = self.instance_scaler_
        mean = torch.tensor(sc.mean, dtype=torch.float32) if sc is not None else None
        std = torch.tensor(sc.std, dtype=torch.float32) if sc is not None else None

        def bag(pos: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
            c = torch.from_numpy(zc[pos : pos + 1])
            if not self.images:
                return None, None, c
            x = (torch.from_numpy(store.bag(int(rows[pos]))) - mean) / std  # (n, D)
            return x[None], torch.ones(1, x.shape[0], dtype=torch.bool), c

        def weights(pos: np.ndarray) -> np.ndarray:
            yy = y[pos]
            cnt = np.maximum(np.bincount(yy, minlength=2), 1)
            return (len(yy) / (2.0 * cnt))[yy].astype(np.float32)

        w_tr, w_va = weights(tr), weights(va)
        model = self.model_
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)
        best, best_epoch, best_state, hist = float("inf"), self.max_epochs, None, []
        val_logits = np.zeros(va.size, np.float32)
        for epoch in range(1, self.max_epochs + 1):
            model.train()
            for k in rng.permutation(tr.size):  # one bag per step
                x, m, c = bag(int(tr[k]))
                z, _ = model(x, m, c)
                loss = weighted_bce(z, torch.tensor([float(y[tr[k]])]),
                                    torch.tensor([w_tr[k]])) * (w_tr[k] / w_tr.mean())
                opt.zero_grad()
                loss.backward()
                opt.step()
            if va.size:
                model.eval()
                with torch.no_grad():
                    zs = np.array([float(model(*bag(int(p)))[0]) for p in va], np.float32)
                vl = float(weighted_bce(torch.from_numpy(zs), torch.from_numpy(y[va].astype(np.float32)),
                                        torch.from_numpy(w_va)))
                hist.append(vl)
                if vl < best - 1e-6:
                    best, best_epoch, best_state, val_logits = vl, epoch, copy.deepcopy(model.state_dict()), zs
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        return TrainResult(best_epoch, self.max_epochs, hist), val_logits


def bench_fit_head(store: Any, folds: int = 5, seed: int = 0, repeats: int = 3,
                   pooling: str = "attention", reference: bool = True) -> dict[str, Any]:
    """Time ``folds``-fold CV of the vectorised head (median of ``repeats``) and of the
    reference-style training on the same folds and epochs; return times, ratio, accuracies."""
    fl = make_folds(store.labels, folds, 1, seed)
    MILClassifier(pooling=pooling, seed=seed, max_epochs=2, members=1).fit(store.subset(fl[0][2]))  # warm-up
    times, cv = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        cv = cross_validate(lambda: MILClassifier(pooling=pooling, seed=seed, members=1), store, fl)
        times.append(time.perf_counter() - t0)
    assert cv is not None
    epochs = [int(f.info["epochs_run"]) for f in cv.folds]
    out: dict[str, Any] = {
        "pooling": pooling, "folds": folds, "n_patients": int(store.labelled().size),
        "n_instances": int(store.bag_sizes[store.labelled()].sum()), "dim": store.dim,
        "torch_threads": 1, "epochs_per_fold": epochs,
        "vectorised_seconds": statistics.median(times), "vectorised_seconds_all": times,
        "vectorised": {k: v["mean"] for k, v in summarise(cv).items()},
    }
    if reference:
        it = iter(epochs)
        t0 = time.perf_counter()
        ref = cross_validate(
            lambda: ReferenceMILClassifier(pooling=pooling, seed=seed, max_epochs=next(it),
                                                 members=1),
            store, fl)
        out["reference_seconds"] = time.perf_counter() - t0
        out["reference"] = {k: v["mean"] for k, v in summarise(ref).items()}
        out["speedup"] = out["reference_seconds"] / out["vectorised_seconds"]
    return out


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a manual benchmark
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        from lymph.store import open_store

        store = open_store(argv[0])
    else:
        store = fake_store()
    print(json.dumps(bench_fit_head(store), indent=2))
