"""Bag-statistics baselines: a tree ensemble on each bag's per-feature mean, max and min.

The plain baseline every MIL method must beat (issue 17): summarise a bag by the
concatenated per-feature ``[mean, max, min]`` of its instances (``3 * dim`` numbers, computed
with ``np.add/maximum/minimum.reduceat``, no loop over bags), append the store's clinical
columns when it has them, and fit

- :class:`BagStatsForest`: a random forest (500 trees, class-balanced bootstrap weights).
  Threshold: the guarded rule (:func:`lymph.head.train.choose_threshold_guarded`) on the
  forest's out-of-bag probabilities, which score every fit patient at no extra cost;
- :class:`BagStatsBoosting`: histogram gradient boosting (class-balanced). Threshold: the
  guarded rule on the out-of-fold probabilities of an inner ``inner_folds``-fold CV.

Both follow the stage-two estimator contract of :mod:`lymph.head.estimator`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.baselines.common import _check_threshold, _inner_folds, _oof, _proba, native_threads
from lymph.errors import LymphError
from lymph.head.bags import check_bags
from lymph.head.base import clinical_matrix, labelled_rows
from lymph.head.train import choose_threshold_guarded


def bag_stats(emb: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Per bag, the per-feature ``[mean, max, min]``: ``(n_bags, 3 * dim)`` float64.

    Bags must be non-empty (checked by the callers with :func:`check_bags`).
    """
    sizes = np.diff(ptr)
    if (sizes == 0).any():
        raise LymphError("bag_stats: a bag without instances (expected at least one)")
    start = ptr[:-1]
    x = np.asarray(emb)
    if x.dtype != np.float32:  # float32 (the stores') is summed in float64 without a copy
        x = np.asarray(x, dtype=np.float64)
    mean = np.add.reduceat(x, start, axis=0, dtype=np.float64) / sizes[:, None]
    return np.concatenate([mean, np.maximum.reduceat(x, start, axis=0),
                           np.minimum.reduceat(x, start, axis=0)], axis=1, dtype=np.float64)


class _BagStats(BaseEstimator, ClassifierMixin):
    """Shared fit/predict of the bag-statistics models (subclasses define ``_make``)."""

    inputs = "images+clinical"

    def _make(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _features(self, store: Any, rows: np.ndarray) -> np.ndarray:
        check_bags(store, rows)
        sub = store.subset(rows)
        x = bag_stats(sub.embeddings, sub.patient_ptr)
        if self.clinical_columns_:
            x = np.concatenate([x, clinical_matrix(sub, self.clinical_columns_)], axis=1)
        return x

    def _oof_proba(self, model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        folds = _inner_folds(y, self.inner_folds, self.seed)
        return _oof(self._make, x, y, folds) if folds else None

    def fit(self, store: Any) -> Any:
        with native_threads(1):
            _check_threshold(self.threshold)
            rows, y = labelled_rows(store)
            self.clinical_columns_ = list(store.clinical_columns) if self.clinical else []
            self.dim_ = store.dim
            x = self._features(store, rows)
            self.model_ = self._make().fit(x, y)
            self.classes_ = np.array([0, 1])
            if self.threshold == "inner":
                p = self._oof_proba(self.model_, x, y)
                ok = p is not None and np.isfinite(p).all()
                self.threshold_ = choose_threshold_guarded(y, p) if ok else 0.5
            else:
                self.threshold_ = float(self.threshold)
        return self

    def predict_proba(self, store: Any) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise LymphError(f"{type(self).__name__}: not fitted (call fit first)")
        if store.dim != self.dim_:
            raise LymphError(f"{store.path or 'store'}: /embeddings: expected {self.dim_} "
                             f"features per instance, got {store.dim}")
        x = self._features(store, np.arange(store.n_patients))
        with native_threads(1):
            return _proba(self.model_.predict_proba(x)[:, 1])

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)


class BagStatsForest(_BagStats):
    """Random forest on per-bag ``[mean, max, min]`` (+ clinical columns)."""

    def __init__(self, n_estimators: int = 500, clinical: bool = True,
                 threshold: str | float = "inner", seed: int = 0, n_jobs: int = 1) -> None:
        self.n_estimators = n_estimators
        self.clinical = clinical
        self.threshold = threshold
        self.seed = seed
        self.n_jobs = n_jobs

    def _make(self) -> Any:
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=self.n_estimators, oob_score=True,
                                      class_weight="balanced_subsample",
                                      random_state=self.seed, n_jobs=self.n_jobs)

    def _oof_proba(self, model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        return np.asarray(model.oob_decision_function_)[:, 1]  # NaN if never out of bag


class BagStatsBoosting(_BagStats):
    """Histogram gradient boosting on per-bag ``[mean, max, min]`` (+ clinical columns)."""

    def __init__(self, max_iter: int = 200, learning_rate: float = 0.05,
                 clinical: bool = True, threshold: str | float = "inner", inner_folds: int = 3,
                 seed: int = 0) -> None:
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.clinical = clinical
        self.threshold = threshold
        self.inner_folds = inner_folds
        self.seed = seed

    def _make(self) -> Any:
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=self.max_iter,
                                              learning_rate=self.learning_rate,
                                              class_weight="balanced", early_stopping=False,
                                              random_state=self.seed)
