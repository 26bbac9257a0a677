"""Cell composition (issue 18): unsupervised cell prototypes and each patient's proportions
of them, fused with the clinical features in a regularised logistic regression.

Malignant lymphocytosis changes *which* cells a smear holds (smudge cells, small mature
lymphocytes, ...) more than how one average cell looks. :class:`CompositionFusion`:

1. standardises the fit patients' cells (any store: morphometry, autoencoder, ...);
2. clusters them with k-means into ``n_prototypes`` prototypes (no labels: fitting it on
   the training fold's cells is already nested, nothing of a test patient is seen);
3. gives each patient the share of its cells nearest to each prototype (vectorised: one
   ``bincount`` over ``patient * K + prototype``), as ``log((count + 0.5) / (n + 0.5 K))``
   (smoothed log proportions: a rare prototype going from 1 % to 3 % is a large change);
4. fits a class-balanced L2 logistic regression on the standardised clinical features and
   those ``K`` composition features, ``C`` chosen from ``Cs`` by inner stratified CV (log
   loss) on the fit patients, the threshold from that CV's out-of-fold probabilities.

``clinical=False`` gives the images-only variant (composition alone).
:meth:`prototype_of` says which prototype each cell falls in (montages of prototypes);
:meth:`coefficients` names them ``proto<k>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.baselines.common import (
    check_predict_store,
    fit_fusion_logistic,
    _check_threshold,
    _inner_folds,
    _need_clinical,
    _proba,
    blas_threads,
)
from lymph.errors import LymphError
from lymph.head.bags import Scaler, check_bags, instances_of
from lymph.head.estimator import _where, clinical_matrix, labelled_rows


def bag_proportions(assign: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """Per bag (``sizes`` consecutive cells each), the count of cells assigned to each of
    ``k`` prototypes: ``(n_bags, k)`` float64. No loop over bags."""
    bag = np.repeat(np.arange(sizes.size), sizes)
    counts = np.bincount(bag * k + assign, minlength=sizes.size * k)
    return counts.reshape(sizes.size, k).astype(np.float64)


class CompositionFusion(BaseEstimator, ClassifierMixin):
    """Clinical features + per-patient log proportions of ``n_prototypes`` k-means cell
    prototypes -> regularised logistic regression (see the module docstring)."""

    images = True

    def __init__(self, n_prototypes: int = 8, clinical: bool = True,
                 Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), inner_folds: int = 5,
                 max_cells: int = 20000, n_init: int = 3, threshold: str | float = "inner",
                 seed: int = 0, n_threads: int | None = 1) -> None:
        self.n_prototypes = n_prototypes
        self.clinical = clinical
        self.Cs = Cs
        self.inner_folds = inner_folds
        self.max_cells = max_cells
        self.n_init = n_init
        self.threshold = threshold
        self.seed = seed
        self.n_threads = n_threads

    @property
    def inputs(self) -> str:
        return "images+clinical" if self.clinical else "images"

    # ---- prototypes ------------------------------------------------------------------------
    def _assign(self, store: Any, rows: np.ndarray) -> np.ndarray:
        x = self.instance_scaler_.transform(instances_of(store.embeddings, store.patient_ptr, rows))
        x = np.asarray(x, dtype=np.float64)
        c = self.centres_
        d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
        return np.argmin(d, axis=1).astype(np.int64)

    def _composition(self, store: Any, rows: np.ndarray) -> np.ndarray:
        sizes = store.bag_sizes[rows]
        k = self.centres_.shape[0]
        counts = bag_proportions(self._assign(store, rows), sizes, k)
        return np.log((counts + 0.5) / (sizes[:, None] + 0.5 * k))

    def _features(self, store: Any, rows: np.ndarray) -> np.ndarray:
        comp = self._composition(store, rows)
        if not self.clinical:
            return comp
        clin = clinical_matrix(store, self.clinical_columns_)[rows].astype(np.float64)
        return np.concatenate([clin, comp], axis=1)

    # ---- fit -----------------------------------------------------------------------------------
    def fit(self, store: Any) -> CompositionFusion:
        with blas_threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> CompositionFusion:
        from sklearn.cluster import KMeans

        _check_threshold(self.threshold)
        if not isinstance(self.n_prototypes, (int, np.integer)) or self.n_prototypes < 2:
            raise LymphError(f"n_prototypes: expected an integer >= 2, got {self.n_prototypes!r}")
        if not self.Cs or any(float(c) <= 0 for c in self.Cs):
            raise LymphError(f"Cs: expected positive numbers, got {self.Cs!r}")
        rows, y = labelled_rows(store)
        self.clinical_columns_ = _need_clinical(store, "CompositionFusion") if self.clinical else []
        check_bags(store, rows)
        self.classes_ = np.array([0, 1])
        self.dim_ = store.dim
        cells = instances_of(store.embeddings, store.patient_ptr, rows)
        if cells.shape[0] < self.n_prototypes:
            raise LymphError(f"{_where(store)}: {cells.shape[0]} cells, fewer than "
                             f"n_prototypes={self.n_prototypes}")
        self.instance_scaler_ = Scaler.fit(cells)
        x = np.asarray(self.instance_scaler_.transform(cells), dtype=np.float64)
        rng = np.random.default_rng(self.seed)
        if x.shape[0] > self.max_cells:
            x = x[np.sort(rng.choice(x.shape[0], self.max_cells, replace=False))]
        km = KMeans(n_clusters=int(self.n_prototypes), n_init=self.n_init,
                    random_state=self.seed).fit(x)
        self.centres_ = km.cluster_centers_.astype(np.float64)
        feats = self._features(store, rows)
        self.fusion_scaler_ = Scaler.fit(feats)
        z = np.asarray(self.fusion_scaler_.transform(feats), dtype=np.float64)
        inner = _inner_folds(y, self.inner_folds, self.seed)

        self.C_, self.threshold_, self.coef_, self.intercept_ = fit_fusion_logistic(
            z, y, self.Cs, inner, self.threshold)
        return self

    # ---- inference ---------------------------------------------------------------------------
    def _check_store(self, store: Any) -> np.ndarray:
        rows = check_predict_store(self, store)
        return rows

    def decision_function(self, store: Any) -> np.ndarray:
        rows = self._check_store(store)
        with blas_threads(getattr(self, "n_threads", 1)):
            z = self.fusion_scaler_.transform(self._features(store, rows))
        return np.asarray(z, dtype=np.float64) @ self.coef_ + self.intercept_

    def predict_proba(self, store: Any) -> np.ndarray:
        return _proba(1.0 / (1.0 + np.exp(-self.decision_function(store))))

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)

    def prototype_of(self, store: Any) -> list[np.ndarray]:
        """Per patient, the prototype index of each cell."""
        rows = self._check_store(store)
        a = self._assign(store, rows)
        return np.split(a, np.cumsum(store.bag_sizes)[:-1])

    def coefficients(self) -> dict[str, float]:
        """The regression's coefficients by feature name (standardised inputs)."""
        names = list(self.clinical_columns_) + [f"proto{k}" for k in range(len(self.centres_))]
        return dict(zip(names, (float(v) for v in self.coef_)))
