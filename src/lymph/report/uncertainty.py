"""95% intervals by a patient-level bootstrap of the out-of-fold predictions.

Each bootstrap sample draws the scored patients with replacement (``n_boot`` samples, a
seeded ``numpy`` generator; a sample is a vector of multiplicities, so every figure is a
weighted count). The predictions and the thresholds stay as the folds made them: the
interval measures how much the figures move with the patients sampled, not how much the
models would move if refitted. With several repeats each figure is computed per repeat and
averaged over repeats, inside each sample. The interval is the 2.5th to 97.5th percentile.

A paired difference (chosen model minus clinical-only) uses the same samples for both
models, so the patients that are hard for both cancel out. The point estimate of ROC AUC is
``sklearn.metrics.roc_auc_score``; inside the bootstrap the same weighted AUC is computed for
all samples at once (the multiplicity-weighted share of malignant-reactive pairs ranked the
right way, ties counting half; a test checks it equals ``roc_auc_score`` with the
multiplicities as sample weights), because a thousand calls per repeat took minutes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from lymph.report.triage import RATE_KEYS

#: the figures with intervals: threshold-free ones, then ``<operating point>.<rate>``
FREE = ("roc_auc", "brier")


def _rates_weighted(W: np.ndarray, y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Rates (as in :func:`lymph.report.triage.rates`) for each row of multiplicities ``W``."""
    tp, fn = W @ (y * pred), W @ (y * (1 - pred))
    fp, tn = W @ ((1 - y) * pred), W @ ((1 - y) * (1 - pred))
    n = tp + fn + fp + tn
    with np.errstate(divide="ignore", invalid="ignore"):
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        return {"sensitivity": sens, "specificity": spec, "ppv": tp / (tp + fp),
                "npv": tn / (tn + fn), "balanced_accuracy": (sens + spec) / 2,
                "avoided_per_100": 100 * (tn + fn) / n, "missed_per_100": 100 * fn / n}


#: above this many malignant x reactive pairs, the bootstrap AUC loops over sklearn instead
MAX_PAIRS = 4_000_000


def weighted_auc(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ROC AUC of ``p`` for each row of multiplicities ``W`` (``(B, n)``), equal to
    ``roc_auc_score(y, p, sample_weight=w)``; NaN where a sample lacks a class."""
    from sklearn.metrics import roc_auc_score

    pos, neg = y == 1, y == 0
    if pos.sum() * neg.sum() > MAX_PAIRS:
        return np.array([roc_auc_score(y, p, sample_weight=w) if (w * pos).sum() and (w * neg).sum()
                         else np.nan for w in W])
    pp, pn = p[pos][:, None], p[neg][None, :]
    C = (pp > pn) + 0.5 * (pp == pn)  # (malignant, reactive): 1 right order, 0.5 tie
    Wp, Wn = W[:, pos], W[:, neg]
    den = Wp.sum(axis=1) * Wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, ((Wp @ C) * Wn).sum(axis=1) / den, np.nan)


def figures(W: np.ndarray, y: np.ndarray, oof: np.ndarray, thresholds: dict[str, np.ndarray]
            ) -> dict[str, np.ndarray]:
    """Every figure for each row of ``W`` (``(B, n)`` multiplicities of the ``n`` patients);
    ``oof`` ``(repeats, n)``, ``thresholds[op]`` ``(repeats, n)``. Mean over repeats."""
    R = oof.shape[0]
    acc: dict[str, list[np.ndarray]] = {}
    for r in range(R):
        p = oof[r]
        acc.setdefault("roc_auc", []).append(weighted_auc(W, y, p))
        acc.setdefault("brier", []).append(W @ (p - y) ** 2 / W.sum(axis=1))
        for op, thr in thresholds.items():
            pred = (p >= thr[r]).astype(np.float64)
            for k, v in _rates_weighted(W, y.astype(np.float64), pred).items():
                acc.setdefault(f"{op}.{k}", []).append(v)
    with warnings.catch_warnings():  # all-NaN columns (e.g. no predicted malignant) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: np.nanmean(np.stack(v), axis=0) for k, v in acc.items()}


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if np.unique(y).size == 2 else float("nan")


def _interval(est: float, boot: np.ndarray) -> dict[str, float]:
    b = boot[np.isfinite(boot)]
    lo, hi = (np.percentile(b, [2.5, 97.5]) if b.size else (np.nan, np.nan))
    return {"estimate": float(est), "low": float(lo), "high": float(hi)}


def bootstrap(y: np.ndarray, models: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]],
              pair: tuple[str, str] | None = None, n_boot: int = 1000, seed: int = 0
              ) -> dict[str, Any]:
    """Intervals for every figure of every model in ``models`` (name -> ``(oof, thresholds)``
    restricted to the scored patients, all on the same patients ``y``), and for the paired
    difference ``pair[0] - pair[1]``."""
    y = np.asarray(y, dtype=np.int64)
    n = y.size
    rng = np.random.default_rng(seed)
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    one = np.ones((1, n))
    point = {m: figures(one, y, o, t) for m, (o, t) in models.items()}
    for m, (o, _) in models.items():  # the point estimate from sklearn itself
        point[m]["roc_auc"] = np.array([np.mean([_auc(y, o[r]) for r in range(o.shape[0])])])
    boot = {m: figures(W, y, o, t) for m, (o, t) in models.items()}
    out: dict[str, Any] = {"method": "patient-level bootstrap of the out-of-fold predictions",
                           "n_boot": n_boot, "seed": seed, "n_patients": n, "models": {}}
    for m in models:
        out["models"][m] = {k: _interval(point[m][k][0], boot[m][k]) for k in point[m]}
    if pair is not None:
        a, b = pair
        out["difference"] = {"model": a, "baseline": b, "figures": {
            k: _interval(point[a][k][0] - point[b][k][0], boot[a][k] - boot[b][k])
            for k in point[a]}}
    return out


def plain_sentence(diff: dict[str, Any], chosen_uses_images: bool) -> str:
    """Images add / do not add measurably to the clinical data, with the interval (on the
    paired ROC AUC difference: threshold-free, so it does not depend on the operating point)."""
    a, b = diff["model"], diff["baseline"]
    d = diff["figures"]["roc_auc"]
    iv = f"ROC AUC {a} minus {b} {d['estimate']:+.3f}, 95% interval {d['low']:+.3f} to {d['high']:+.3f}"
    if not chosen_uses_images:
        return f"The chosen model {a} uses no images, so this report cannot say what images add ({iv})."
    # "measurably": the whole interval on one side of zero at the precision shown
    if round(d["low"], 3) > 0:
        return f"On this cohort the images add measurably to the clinical data ({iv})."
    if round(d["high"], 3) < 0:
        return (f"On this cohort the chosen model with images does measurably worse than the "
                f"clinical data alone ({iv}).")
    return (f"On this cohort the images do not add measurably to the clinical data ({iv}; "
            "the interval includes no difference).")


__all__ = ["FREE", "RATE_KEYS", "bootstrap", "figures", "plain_sentence"]
