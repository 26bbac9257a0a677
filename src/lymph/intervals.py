"""Intervals for paired per-fold differences of repeated k-fold CV (issue 18).

The folds of repeated cross-validation share training patients, so their differences are
correlated and the naive ``t`` interval ``mean +- t * sd / sqrt(J)`` is too narrow.
:func:`corrected_interval` is the corrected resampled t-test of Nadeau and Bengio (2003),
``var * (1 / J + n_test / n_train)``, with ``J - 1`` degrees of freedom: the interval
lymph reports for "images add measurably" claims. :func:`naive_interval` is kept beside
it for comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _t(df: int, level: float) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2.0, df))


def naive_interval(d: Any, level: float = 0.95) -> tuple[float, float]:
    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return float("nan"), float("nan")
    h = _t(d.size - 1, level) * d.std(ddof=1) / np.sqrt(d.size)
    return float(d.mean() - h), float(d.mean() + h)


def corrected_interval(d: Any, test_over_train: float, level: float = 0.95) -> tuple[float, float]:
    """Nadeau-Bengio corrected interval of the mean of ``d`` (one value per fold);
    ``test_over_train`` is the folds' test-to-training size ratio (1/4 for 5 folds)."""
    d = np.asarray(d, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return float("nan"), float("nan")
    h = _t(d.size - 1, level) * np.sqrt(d.var(ddof=1) * (1.0 / d.size + test_over_train))
    return float(d.mean() - h), float(d.mean() + h)
