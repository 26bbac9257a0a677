"""Helpers shared by the comparison estimators: labelled rows, inner folds, thresholds,
BLAS threads and per-bag statistics without a loop over bags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from lymph.errors import LymphError
from lymph.head.base import check_threshold as _check_threshold  # noqa: F401 (one rule for all)
from lymph.head.base import where as _where
from lymph.head.train import choose_threshold


# ---- shared helpers ------------------------------------------------------------------------
def _need_clinical(store: Any, name: str) -> list[str]:
    cols = list(store.clinical_columns)
    if not cols:
        raise LymphError(f"{_where(store)}: /patients/clinical: no clinical columns, but "
                         f"{name} needs clinical features")
    return cols


def _inner_folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified inner folds over positions ``0..len(y)-1``; [] when a class is too small."""
    from sklearn.model_selection import StratifiedKFold

    k = min(k, int(np.bincount(y, minlength=2).min()))
    if k < 2:
        return []
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _oof(make: Any, x: np.ndarray, y: np.ndarray, folds: list) -> np.ndarray:
    """Out-of-fold P(class 1) of ``make()`` (an sklearn classifier factory) over ``folds``."""
    p = np.full(len(y), np.nan)
    for tr, va in folds:
        p[va] = make().fit(x[tr], y[tr]).predict_proba(x[va])[:, 1]
    return p


@contextlib.contextmanager
def native_threads(n: int | None = 1) -> Iterator[None]:
    """Limit the native thread pools (BLAS and OpenMP) while fitting small scikit-learn
    models: on a shared 2-core machine scipy's L-BFGS on a few thousand rows is ~15x faster
    with one thread than with two (thread spinning), and k-means (OpenMP) is faster with one
    and gives the same centres whatever the machine's core count (with two threads its
    centres differ in the last bits, issue 17). ``None`` keeps the process setting."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield


def _threshold(param: str | float, y: np.ndarray, p_oof: np.ndarray | None) -> float:
    if param != "inner":
        return float(param)
    if p_oof is None or not np.isfinite(p_oof).all():
        return 0.5
    return choose_threshold(y, p_oof)


def check_fusion_params(est: Any) -> None:
    """The settings the late-fusion family shares: ``threshold``, ``quantile``, ``Cs``."""
    _check_threshold(est.threshold)
    if not 0.0 <= est.quantile <= 1.0:
        raise LymphError(f"quantile: expected a number in [0, 1], got {est.quantile!r}")
    if not est.Cs or any(float(c) <= 0 for c in est.Cs):
        raise LymphError(f"Cs: expected positive numbers, got {est.Cs!r}")


def check_predict_store(est: Any, store: Any) -> np.ndarray:
    """Before predicting with a fitted fusion model: fitted, some patients, the training
    dimension, valid bags. The rows to predict (every patient)."""
    from lymph.head.bags import check_bags

    if not hasattr(est, "coef_"):
        raise LymphError(f"{type(est).__name__}: not fitted (call fit first)")
    if store.n_patients == 0:
        raise LymphError(f"{_where(store)}: no patients to predict (empty selection)")
    if store.dim != est.dim_:
        raise LymphError(f"{_where(store)}: /embeddings: expected {est.dim_} features per "
                         f"image (the model's encoder), got {store.dim}")
    rows = np.arange(store.n_patients)
    check_bags(store, rows)
    return rows


def fit_fusion_logistic(z: np.ndarray, y: np.ndarray, Cs: Any, inner: list,
                        threshold: str | float) -> tuple[float, float, np.ndarray, float]:
    """The fusion regression of the late-fusion family on standardised features ``z``: ``C``
    chosen among ``Cs`` by inner-CV log loss (the last when there are no inner folds, or one
    ``C`` and a fixed threshold), the threshold from that ``C``'s out-of-fold probabilities,
    then the fit on all rows: ``(C, threshold, coef, intercept)``."""
    c, _, oof = search_fusion_C(z, y, Cs, inner, force=threshold == "inner")
    return finish_fusion_logistic(z, y, c, oof, threshold)


def _fusion_lr(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight="balanced", max_iter=1000)


def search_fusion_C(z: np.ndarray, y: np.ndarray, Cs: Any, inner: list, force: bool = True
                    ) -> tuple[float, float, np.ndarray | None]:
    """``C`` of the fusion regression chosen among ``Cs`` by inner-CV log loss:
    ``(C, loss, out-of-fold P(class 1) at that C)``. Without inner folds, or with one ``C``
    and not ``force`` (nothing to choose, no threshold to fit), the last ``C``, loss inf and
    no out-of-fold probabilities. Ties go to the earlier ``C``."""
    from sklearn.metrics import log_loss

    best_c, best_loss, best_oof = float(Cs[-1]), np.inf, None
    if inner and (len(Cs) > 1 or force):
        for c in Cs:
            p = _oof(lambda c=float(c): _fusion_lr(c), z, y, inner)
            loss = log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])
            if loss < best_loss - 1e-12:
                best_c, best_loss, best_oof = float(c), float(loss), p
    return best_c, best_loss, best_oof


def finish_fusion_logistic(z: np.ndarray, y: np.ndarray, c: float, oof: np.ndarray | None,
                           threshold: str | float) -> tuple[float, float, np.ndarray, float]:
    """The threshold from ``oof`` (the chosen ``C``'s out-of-fold probabilities) and the
    fusion regression at ``C = c`` on all rows: ``(C, threshold, coef, intercept)``."""
    lr = _fusion_lr(c).fit(z, y)
    return (c, _threshold(threshold, y, oof), lr.coef_[0].astype(np.float64),
            float(lr.intercept_[0]))


def fusion_state(est: Any) -> dict[str, Any]:
    """The JSON state every fusion-regression estimator shares (model directory; no
    pickles): its input columns, the fusion scaler and the regression."""
    return {
        "clinical_columns": list(est.clinical_columns_),
        "feature_columns": est.feature_columns_,
        "dim": int(est.dim_),
        "fusion_scaler": est.fusion_scaler_.to_json(),
        "coef": [float(v) for v in est.coef_],
        "intercept": float(est.intercept_),
        "C": float(est.C_),
        "threshold": float(est.threshold_),
        "coefficients": est.coefficients(),
    }


def restore_fusion_state(est: Any, d: dict[str, Any]) -> None:
    """Set on ``est`` what :func:`fusion_state` saved."""
    from lymph.head.bags import Scaler

    est.classes_ = np.array([0, 1])
    est.clinical_columns_ = list(d["clinical_columns"])
    est.feature_columns_ = d["feature_columns"]
    est.dim_ = int(d["dim"])
    est.fusion_scaler_ = Scaler.from_json(d["fusion_scaler"])
    est.coef_ = np.asarray(d["coef"], dtype=np.float64)
    est.intercept_ = float(d["intercept"])
    est.C_ = float(d["C"])
    est.threshold_ = float(d["threshold"])


def _proba(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


def bag_mean_quantile(values: np.ndarray, ptr: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Per bag (CSR ``ptr``), the mean and the ``q`` quantile (linear interpolation, as
    ``np.quantile``) of the instance ``values``. Vectorised: one sort, no loop over bags."""
    sizes = np.diff(ptr)
    if (sizes == 0).any():
        raise LymphError("bag_mean_quantile: a bag without instances (expected at least one)")
    bag = np.repeat(np.arange(sizes.size), sizes)
    v = np.asarray(values, dtype=np.float64)
    mean = np.bincount(bag, weights=v, minlength=sizes.size) / sizes
    order = np.lexsort((v, bag))  # sorted by bag, then value
    s = v[order]
    pos = q * (sizes - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, sizes - 1)
    frac = pos - lo
    start = ptr[:-1]
    quant = s[start + lo] * (1.0 - frac) + s[start + hi] * frac
    return mean, quant
