"""Diagnostics of a fold-safe weak store (out-of-fold AUC, comparability of the scorers)
and :func:`check_fold_safety`, which refuses a store that leaks labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lymph.errors import LymphError


# ---- diagnostics ---------------------------------------------------------------------------
def oof_metrics(emb: np.ndarray, ptr: np.ndarray, labels: np.ndarray,
                scorer: np.ndarray) -> dict[str, Any]:
    """Out-of-fold patient ROC AUC of the mean cell logit and mean cell probability, pooled
    over all labelled patients and per fold (pooled ~ per fold when scales agree)."""
    from sklearn.metrics import roc_auc_score

    lab = np.flatnonzero(labels >= 0)
    mean_logit = np.array([emb[ptr[p] : ptr[p + 1], 0].mean() for p in range(len(labels))])
    mean_prob = np.array([emb[ptr[p] : ptr[p + 1], 1].mean() for p in range(len(labels))])

    def auc(rows: np.ndarray, v: np.ndarray) -> float | None:
        y = labels[rows]
        return float(roc_auc_score(y, v[rows])) if np.unique(y).size == 2 else None

    per_fold = {}
    for k in sorted(set(scorer[lab].tolist())):
        r = lab[scorer[lab] == k]
        per_fold[str(k)] = {"n": int(r.size), "auc_mean_logit": auc(r, mean_logit),
                            "auc_mean_prob": auc(r, mean_prob)}
    return {"auc_mean_logit": auc(lab, mean_logit), "auc_mean_prob": auc(lab, mean_prob),
            "per_fold": per_fold}


def comparability(feats: dict[int, np.ndarray], ptr: np.ndarray, labels: np.ndarray,
                  order: list[int]) -> dict[str, Any] | None:
    """Do the scorers put cells on one scale? Measured on the cells of the unlabelled
    patients, which no scorer trained on: per scorer the mean and standard deviation of
    the logit and the mean probability, and the smallest pairwise Pearson correlation of
    the logits. None when there are no unlabelled patients."""
    unl = np.flatnonzero(labels < 0)
    if unl.size == 0:
        return None
    rows = np.concatenate([np.arange(ptr[p], ptr[p + 1]) for p in unl])
    per = {}
    for k in order:
        lg = feats[k][rows, 0].astype(np.float64)
        per[str(k)] = {"logit_mean": float(lg.mean()), "logit_std": float(lg.std()),
                       "prob_mean": float(feats[k][rows, 1].mean())}
    corr = np.corrcoef(np.stack([feats[k][rows, 0] for k in order]).astype(np.float64))
    off = corr[~np.eye(len(order), dtype=bool)]
    return {"n_cells": int(rows.size), "per_scorer": per,
            "min_logit_corr": float(off.min()) if off.size else None,
            "mean_logit_corr": float(off.mean()) if off.size else None}


# ---- fold safety ---------------------------------------------------------------------------
def check_fold_safety(store: Any, checkpoints: bool = True) -> None:
    """Raise :class:`LymphError` unless every labelled patient's rows come from a scorer
    that did not train on it.

    From the store: ``/patients/scorer`` and provenance ``weak_folds`` (fold ``k``'s test
    patients; scorer ``k`` trained on the other labelled patients, the final scorer ``-1``
    on all of them). With ``checkpoints`` (when the files recorded in the provenance
    exist), also each checkpoint's sha256 and its own record of the patients it trained on.
    """
    where = str(store.path or "store")
    wf = (store.provenance or {}).get("weak_folds")
    if not wf:
        raise LymphError(f"{where}: provenance has no 'weak_folds' (not a fold-safe weak store)")
    if store.patient_scorer is None:
        raise LymphError(f"{where}: /patients/scorer is missing (not a fold-safe weak store)")
    k_total = int(wf["k"])
    test_ids = [set(t) for t in wf["test_ids"]]
    if len(test_ids) != k_total:
        raise LymphError(f"{where}: provenance 'weak_folds': expected {k_total} folds, got "
                         f"{len(test_ids)}")
    all_labelled = {str(i) for i, y in zip(store.ids, store.labels) if y >= 0}
    trained: dict[int, set[str]] = {-1: set(all_labelled)}  # the final scorer: all of them
    for k in range(k_total):
        trained[k] = all_labelled - test_ids[k]
    if checkpoints:
        recorded = [(int(c["fold"]), c) for c in wf.get("checkpoints", [])]
        recorded.append((-1, wf.get("final") or {}))
        for k, c in recorded:
            p = Path(c.get("path", ""))
            if not c.get("path") or not p.is_file():
                continue
            from lymph.atomic import sha256_file
            from lymph.encoder.checkpoint import load_checkpoint

            if c.get("sha256") and sha256_file(p) != c["sha256"]:
                raise LymphError(f"{where}: scorer {k} checkpoint {p} changed since the store "
                                 "was written (sha256 mismatch)")
            ids_ck = set((load_checkpoint(p).get("weak") or {}).get("train_ids", []))
            trained[k] |= ids_ck
    for pid, y, s in zip(store.ids, store.labels, store.patient_scorer):
        pid, s = str(pid), int(s)
        if s != -1 and not 0 <= s < k_total:
            raise LymphError(f"{where}: /patients/scorer: patient {pid} has scorer {s}, "
                             f"expected -1 or 0..{k_total - 1}")
        if y < 0:
            continue
        if pid in trained[s]:
            who = "the final scorer" if s == -1 else f"fold scorer {s}"
            raise LymphError(f"{where}: labelled patient {pid} was scored by {who}, which "
                             "trained on it: the store leaks labels into every later "
                             "cross-validation")
