"""Triage operating points from out-of-fold probabilities.

The question a haematologist asks: at a threshold that misses almost no malignant patient,
how many flow cytometries would the model save? Two operating points per model:

- **target sensitivity** (``--target-sensitivity``, default 0.95): for fold ``k`` of repeat
  ``r`` the threshold is the highest one that reaches the target sensitivity on the
  *training* patients of that fold (moved halfway to the next lower score, see
  :func:`sensitivity_threshold`), using their out-of-fold probabilities of the same repeat
  (each scored by a fold model that did not see it). Fold ``k``'s own patients never enter
  the choice; they are then scored at that threshold. This is what a user does with a
  model trained on the whole cohort: set the threshold on its out-of-fold predictions, apply
  it to new patients. (The other folds' models had fold ``k`` among their training
  patients, so the choice is not fully nested; no probability or label of fold ``k`` enters
  it directly. A nested choice would cost ``k`` inner fits per fold.)
- **balanced**: the estimator's own threshold (maximum balanced accuracy on its inner
  validation split, chosen inside each training fold by the model itself).

A patient predicted reactive skips cytometry ("cytometry avoided"); a malignant patient
predicted reactive is a missed malignant case. Counts come from
``sklearn.metrics.confusion_matrix``; rates are per repeat, then averaged over repeats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lymph.errors import LymphError
from lymph.figures import STYLES, legend_outside, new_figure, save_png

#: operating point names, in report order
TARGET, BALANCED = "target_sensitivity", "balanced"


def check_target(target: Any, name: str = "--target-sensitivity") -> float:
    """``--target-sensitivity``: a number in (0, 1]."""
    try:
        t = float(target)
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(target, bool) or not np.isfinite(t) or not 0.0 < t <= 1.0:
        raise LymphError(f"{name}: expected a number in (0, 1], got {target!r}")
    return t


def sensitivity_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """A threshold ``t`` whose sensitivity of ``p >= t`` on ``(y, p)`` is at least ``target``,
    calling as few patients malignant as possible: the highest such score
    (``sklearn.metrics.roc_curve`` with every threshold kept), moved halfway down to the next
    lower score, so that it splits these patients the same way with a margin on each side
    (new patients scoring just below the last one sent are sent too)."""
    from sklearn.metrics import roc_curve

    y, p = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.float64)
    if not np.all(np.isfinite(p)):
        raise LymphError("triage: non-finite out-of-fold probability (cannot choose a threshold)")
    if y.sum() == 0:
        return 1.0
    _, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    k = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    t = float(min(thr[k], 1.0))
    return t if k + 1 >= thr.size else float((t + thr[k + 1]) / 2)


def fold_thresholds(cv: Any, target: float) -> np.ndarray:
    """``(repeats, n_patients)``: each scored patient's target-sensitivity threshold,
    chosen on its fold's training patients (their out-of-fold probabilities, same repeat).
    NaN where unscored."""
    out = np.full(cv.oof.shape, np.nan)
    y = np.asarray(cv.labels)
    for f in cv.folds:
        tr = np.asarray(f.train_rows)
        tr = tr[np.isfinite(cv.oof[f.repeat, tr])]  # stage-one folds: all scored; else skip
        out[f.repeat, f.test_rows] = sensitivity_threshold(y[tr], cv.oof[f.repeat, tr], target)
    return out


def counts(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """``tn, fp, fn, tp`` of predicted malignant (1) vs truth."""
    from sklearn.metrics import confusion_matrix

    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def rates(c: dict[str, float]) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, balanced accuracy and the per-100 figures of
    counts ``c`` (NaN where a denominator is zero)."""
    def div(a: float, b: float) -> float:
        return float(a / b) if b > 0 else float("nan")

    n = c["tn"] + c["fp"] + c["fn"] + c["tp"]
    sens, spec = div(c["tp"], c["tp"] + c["fn"]), div(c["tn"], c["tn"] + c["fp"])
    return {"sensitivity": sens, "specificity": spec,
            "ppv": div(c["tp"], c["tp"] + c["fp"]), "npv": div(c["tn"], c["tn"] + c["fn"]),
            "balanced_accuracy": (sens + spec) / 2,
            "avoided_per_100": 100 * div(c["tn"] + c["fn"], n),
            "missed_per_100": 100 * div(c["fn"], n)}


RATE_KEYS = ("sensitivity", "specificity", "ppv", "npv", "balanced_accuracy",
             "avoided_per_100", "missed_per_100")


def operating_point(cv: Any, thresholds: np.ndarray) -> dict[str, Any]:
    """Figures of ``oof >= thresholds`` per repeat and their mean over repeats; the
    confusion matrix of repeat 1 (whole patients)."""
    y_all = np.asarray(cv.labels)
    per_repeat = []
    for r in range(cv.oof.shape[0]):
        rows = np.flatnonzero(cv.oof_fold[r] >= 0)
        pred = (cv.oof[r, rows] >= thresholds[r, rows]).astype(np.int64)
        c = counts(y_all[rows].astype(np.int64), pred)
        per_repeat.append({"repeat": r, **c, **rates(c)})  # files count from 0
    mean = {k: float(np.nanmean([q[k] for q in per_repeat])) for k in RATE_KEYS}
    thr = thresholds[np.isfinite(thresholds)]
    return {**mean, "confusion_repeat_1": {k: per_repeat[0][k] for k in ("tn", "fp", "fn", "tp")},
            "n_patients": int(sum(per_repeat[0][k] for k in ("tn", "fp", "fn", "tp"))),
            "threshold_mean": float(thr.mean()) if thr.size else float("nan"),
            "threshold_range": [float(thr.min()), float(thr.max())] if thr.size else [],
            "per_repeat": per_repeat}


def triage(cv: Any, target: float) -> dict[str, Any]:
    """Both operating points of one model: ``{"target_sensitivity": {...}, "balanced": {...}}``
    plus the thresholds used (``"thresholds"``: per operating point, ``(repeats, n)``)."""
    t_target = fold_thresholds(cv, target)
    t_bal = np.where(cv.oof_fold >= 0, cv.oof_threshold, np.nan)
    return {TARGET: operating_point(cv, t_target), BALANCED: operating_point(cv, t_bal),
            "target": target, "thresholds": {TARGET: t_target, BALANCED: t_bal}}


def cohort_threshold(cv: Any, target: float) -> float:
    """The threshold for new patients: the highest reaching ``target`` sensitivity on the
    whole cohort's out-of-fold probabilities (every repeat pooled)."""
    scored = cv.oof_fold >= 0
    y = np.broadcast_to(np.asarray(cv.labels), cv.oof.shape)[scored]
    return sensitivity_threshold(y, cv.oof[scored], target)


def trade_png(path: Any, y: np.ndarray, curves: dict[str, np.ndarray],
              points: dict[str, dict[str, tuple[float, float]]], title: str) -> Any:
    """The trade in the clinic's units: malignant cases missed against cytometries avoided
    (per 100 patients) as the threshold moves, one line per model (``curves``: out-of-fold
    probabilities of the patients ``y``, from ``sklearn.metrics.roc_curve``), with the
    operating points (``points[model][name] = (avoided, missed)``) marked."""

    from sklearn.metrics import roc_curve

    y = np.asarray(y, dtype=np.int64)
    n, n_pos, n_neg = y.size, int(y.sum()), int((1 - y).sum())
    fig, ax = new_figure((7.6, 4.6), dpi=110)
    marks = {TARGET: "*", BALANCED: "o"}
    for k, (name, p) in enumerate(curves.items()):
        st = STYLES[k % len(STYLES)]
        fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
        avoided = 100 * ((1 - fpr) * n_neg + (1 - tpr) * n_pos) / n
        missed = 100 * (1 - tpr) * n_pos / n
        ax.plot(avoided, missed, color=st["color"], ls=st["ls"], lw=1.4, label=name)
        for op, (av, mi) in points.get(name, {}).items():
            ax.plot([av], [mi], marker=marks.get(op, "o"), ms=11 if op == TARGET else 7,
                    color=st["color"], ls="none",
                    label=f"{name}: {'target sensitivity' if op == TARGET else 'balanced'}")
    ax.set_xlabel("cytometries avoided per 100 patients")
    ax.set_ylabel("malignant cases missed per 100 patients")
    ax.set_xlim(0, 100 * n_neg / n + 15)
    ax.set_ylim(0, 20)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    legend_outside(ax)
    fig.tight_layout()
    return save_png(fig, path)
