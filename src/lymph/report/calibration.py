"""Calibration of the out-of-fold probabilities: do 30% predictions come true 30% of the time?

- reliability diagram: ``sklearn.calibration.calibration_curve`` (quantile bins, so every
  bin holds about the same number of patients), repeat 1;
- Brier score: ``sklearn.metrics.brier_score_loss`` (mean squared error of the probability;
  0 is perfect, the prevalence-only model scores ``prevalence * (1 - prevalence)``);
- calibration slope: the coefficient of a logistic regression of the label on the logit of
  the probability (1 is ideal; below 1 the probabilities are too extreme, above 1 too timid);
- calibration intercept (calibration-in-the-large): the intercept of that regression with
  the slope fixed at 1, i.e. the shift ``a`` with ``mean(expit(a + logit p)) = mean(y)``
  (0 is ideal; positive means the model under-predicts malignancy), solved with
  ``scipy.optimize.brentq``.

Recalibration is fitted inside the training folds: for fold ``k`` of repeat ``r`` a Platt
scaling (``sklearn.linear_model.LogisticRegression`` on the logit of the probability) is fitted
on the training patients' out-of-fold probabilities and applied to fold ``k``'s patients.
Figures are per repeat, averaged over repeats.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lymph.figures import STYLES, new_figure, save_png


EPS = 1e-6
#: the probabilities are called "off" when the slope is outside this range or |intercept| above
SLOPE_OK, INTERCEPT_OK = (0.8, 1.25), 0.25


def logit(p: np.ndarray) -> np.ndarray:
    from scipy.special import logit as _logit

    return _logit(np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS))


def slope_intercept(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Calibration slope and calibration-in-the-large (see the module docstring)."""
    from scipy.optimize import brentq
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=np.int64)
    if np.unique(y).size < 2:
        return float("nan"), float("nan")
    lp = logit(p)
    slope = float(LogisticRegression(C=np.inf).fit(lp[:, None], y).coef_[0, 0])
    target = y.mean()
    f = lambda a: float(np.mean(expit(a + lp)) - target)  # monotone in a
    intercept = float(brentq(f, -30.0, 30.0))
    return slope, intercept


def summary(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import brier_score_loss

    s, i = slope_intercept(y, p)
    return {"brier": float(brier_score_loss(y, p)), "slope": s, "intercept": i}


def recalibrated(cv: Any) -> np.ndarray:
    """``(repeats, n)``: Platt-scaled out-of-fold probabilities, each fitted on its fold's
    training patients (their out-of-fold probabilities of the same repeat)."""
    from sklearn.linear_model import LogisticRegression

    out = np.full(cv.oof.shape, np.nan)
    y = np.asarray(cv.labels, dtype=np.int64)
    for f in cv.folds:
        tr = np.asarray(f.train_rows)
        tr = tr[np.isfinite(cv.oof[f.repeat, tr])]
        if np.unique(y[tr]).size < 2:
            out[f.repeat, f.test_rows] = cv.oof[f.repeat, f.test_rows]
            continue
        lr = LogisticRegression(C=np.inf).fit(logit(cv.oof[f.repeat, tr])[:, None], y[tr])
        out[f.repeat, f.test_rows] = lr.predict_proba(
            logit(cv.oof[f.repeat, f.test_rows])[:, None])[:, 1]
    return out


def calibration(cv: Any) -> dict[str, Any]:
    """Before/after figures (mean over repeats), whether the probabilities are off, and the
    recalibrated probabilities (``"recalibrated"``, ``(repeats, n)``)."""
    y_all = np.asarray(cv.labels, dtype=np.int64)
    after_p = recalibrated(cv)
    res: dict[str, Any] = {}
    for name, P in (("before", cv.oof), ("after", after_p)):
        per = []
        for r in range(P.shape[0]):
            rows = np.flatnonzero(cv.oof_fold[r] >= 0)
            per.append(summary(y_all[rows], P[r, rows]))
        res[name] = {k: float(np.nanmean([q[k] for q in per])) for k in per[0]}
        res[name]["per_repeat"] = per
    b = res["before"]
    res["off"] = bool(not SLOPE_OK[0] <= b["slope"] <= SLOPE_OK[1] or abs(b["intercept"]) > INTERCEPT_OK)
    res["recalibrated"] = after_p
    return res


def reliability_png(path: str | os.PathLike[str], y: np.ndarray,
                    curves: dict[str, np.ndarray], title: str, n_bins: int = 10) -> Path:
    """Reliability diagram (observed fraction malignant against mean predicted probability
    per quantile bin), one line per entry of ``curves`` (probabilities of the patients ``y``)."""
    from sklearn.calibration import calibration_curve

    path = Path(path)
    fig, ax = new_figure((7.6, 4.6), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8, label="perfect calibration")
    for k, (name, p) in enumerate(curves.items()):
        frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="quantile")
        st = STYLES[k % len(STYLES)]
        ax.plot(mean, frac, marker=st["marker"], color=st["color"], ls=st["ls"], lw=1.4,
                ms=4, label=name)
    ax.set_xlabel("mean predicted P(malignant) in the bin")
    ax.set_ylabel("observed fraction malignant")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    save_png(fig, path)
    return path
