"""Clinical-only estimators: AdaBoost (the report's baseline) and logistic regression."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.baselines.common import (
    _check_threshold,
    _inner_folds,
    _need_clinical,
    _oof,
    _proba,
    _threshold,
    native_threads,
)
from lymph.errors import LymphError
from lymph.head.base import clinical_matrix, labelled_rows


# ---- clinical-only ---------------------------------------------------------------------------
class _ClinicalSK(BaseEstimator, ClassifierMixin):
    """Base of the scikit-learn clinical-only models (subclasses define ``_make``)."""

    inputs = "clinical"

    def _make(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, store: Any) -> Any:
        with native_threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> Any:
        _check_threshold(self.threshold)
        rows, y = labelled_rows(store)
        self.clinical_columns_ = _need_clinical(store, type(self).__name__)
        x = clinical_matrix(store, self.clinical_columns_)[rows].astype(np.float64)
        folds = _inner_folds(y, self.inner_folds, self.seed) if self.threshold == "inner" else []
        p_oof = _oof(self._make, x, y, folds) if folds else None
        self.threshold_ = _threshold(self.threshold, y, p_oof)
        self.model_ = self._make().fit(x, y)
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, store: Any) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise LymphError(f"{type(self).__name__}: not fitted (call fit first)")
        x = clinical_matrix(store, self.clinical_columns_).astype(np.float64)
        with native_threads(self.n_threads):
            return _proba(self.model_.predict_proba(x)[:, 1])

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)


class AdaBoostClinical(_ClinicalSK):
    """AdaBoost (depth-1 trees) on the raw clinical features: the seed report's baseline."""

    def __init__(self, n_estimators: int = 50, learning_rate: float = 1.0,
                 threshold: str | float = "inner", inner_folds: int = 3, seed: int = 0,
                 n_threads: int | None = 1) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.threshold = threshold
        self.inner_folds = inner_folds
        self.seed = seed
        self.n_threads = n_threads

    def _make(self) -> Any:
        from sklearn.ensemble import AdaBoostClassifier

        return AdaBoostClassifier(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                                  random_state=self.seed)


class LogisticClinical(_ClinicalSK):
    """L2 logistic regression on standardised clinical features, class-balanced."""

    def __init__(self, C: float = 1.0, threshold: str | float = "inner", inner_folds: int = 3,
                 seed: int = 0, n_threads: int | None = 1) -> None:
        self.C = C
        self.threshold = threshold
        self.inner_folds = inner_folds
        self.seed = seed
        self.n_threads = n_threads

    def _make(self) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(),
                             LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000))
