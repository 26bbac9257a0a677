"""Several image scores together (issue 18): late fusion with one image score per feature
block of a concatenated store (``lymph store concat``: columns ``PREFIX:name``).

:class:`LateFusion` projects *all* features of a store onto one cell score. On a
concatenated store (morphometry + autoencoder + weak, ...) :class:`MultiScoreFusion` keeps
one score per source instead: for each block (the columns sharing a ``PREFIX:``) the cell
score is the block's weak-supervision logit (``PREFIX:logit``) when it has one, else a
learned linear projection of the block's standardised features (instance-level L2 logistic
regression, each cell labelled by its patient, nested out of fold exactly as in
:class:`LateFusion`). Each block gives the mean and the ``quantile`` of its cells' scores;
they join the clinical features in a class-balanced L2 logistic regression whose ``C`` is
chosen from ``Cs`` by inner stratified CV (log loss). The regularisation decides how much
each source counts; :meth:`coefficients` names the features ``PREFIX_mean`` /
``PREFIX_qNN``. A store without prefixes is one block (then this is :class:`LateFusion`).
With ``n_prototypes`` > 0 the cell-composition features of
:class:`~lymph.baselines.composition.CompositionFusion` (log proportions of k-means
prototypes of all the store's features, fitted on the fit patients' cells) join them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.baselines.common import (
    check_fusion_params,
    check_predict_store,
    fit_fusion_logistic,
    _inner_folds,
    _need_clinical,
    _proba,
    native_threads,
)
from lymph.baselines.late_fusion import LateFusion, logit_column
from lymph.head.bags import Scaler, check_bags, instances_of
from lymph.head.estimator import clinical_matrix, labelled_rows


def feature_blocks(columns: list[str] | None, dim: int) -> dict[str, np.ndarray]:
    """Column indices per block: the ``PREFIX`` of ``PREFIX:name`` columns, in order of first
    appearance; one block ``images`` when the store has no prefixed columns."""
    if not columns or not all(":" in c for c in columns):
        return {"images": np.arange(dim)}
    out: dict[str, list[int]] = {}
    for j, c in enumerate(columns):
        out.setdefault(c.split(":", 1)[0], []).append(j)
    return {k: np.asarray(v) for k, v in out.items()}


class MultiScoreFusion(BaseEstimator, ClassifierMixin):
    """Clinical features + one pooled image score per feature block -> regularised logistic
    regression (see the module docstring)."""

    inputs = "images+clinical"
    images = True
    clinical = True

    def __init__(self, Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), quantile: float = 0.75,
                 projection_C: float = 1.0, inner_folds: int = 5,
                 threshold: str | float = "inner", n_prototypes: int = 0, seed: int = 0,
                 n_threads: int | None = 1) -> None:
        self.n_prototypes = n_prototypes
        self.Cs = Cs
        self.quantile = quantile
        self.projection_C = projection_C
        self.inner_folds = inner_folds
        self.threshold = threshold
        self.seed = seed
        self.n_threads = n_threads

    def _block_store(self, store: Any, idx: np.ndarray) -> Any:
        cols = None if store.feature_columns is None else [store.feature_columns[j] for j in idx]
        return replace(store, embeddings=store.embeddings[:, idx], feature_columns=cols)

    def _image_features(self, store: Any, rows: np.ndarray, fitted: bool,
                        y: np.ndarray | None = None, inner: list | None = None) -> np.ndarray:
        """(len(rows), 2 * blocks): per block the mean and quantile of the cell scores; with
        ``fitted`` False, fit each block's scorer and return nested OOF features."""
        out = []
        for name, idx in self.blocks_.items():
            sub = self._block_store(store, idx)
            if fitted:
                lf = self.block_models_[name]
                out.append(lf._bag_features(sub, rows, lf.projection_))
                continue
            lf = LateFusion(quantile=self.quantile, projection_C=self.projection_C, seed=self.seed)
            lf.logit_column_ = logit_column(sub)
            if lf.logit_column_ is not None:
                lf.instance_scaler_, lf.projection_ = None, None
                out.append(lf._bag_features(sub, rows, None))
            else:
                lf.instance_scaler_ = Scaler.fit(instances_of(sub.embeddings, sub.patient_ptr, rows))
                img = np.zeros((rows.size, 2))
                for tr, va in inner or []:
                    img[va] = lf._bag_features(sub, rows[va], lf._fit_projection(sub, rows[tr], y[tr]))
                lf.projection_ = lf._fit_projection(sub, rows, y)
                if not inner:
                    img = lf._bag_features(sub, rows, lf.projection_)
                out.append(img)
            self.block_models_[name] = lf
        if self.n_prototypes:
            if not fitted:
                from lymph.baselines.composition import CompositionFusion

                self.composition_ = CompositionFusion(
                    n_prototypes=self.n_prototypes, clinical=False, inner_folds=2,
                    Cs=(1.0,), threshold=0.5, seed=self.seed, n_threads=None).fit(store.subset(rows))
            out.append(self.composition_._composition(store, rows))
        return np.concatenate(out, axis=1)

    def fit(self, store: Any) -> MultiScoreFusion:
        with native_threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> MultiScoreFusion:

        check_fusion_params(self)
        rows, y = labelled_rows(store)
        self.clinical_columns_ = _need_clinical(store, "MultiScoreFusion")
        check_bags(store, rows)
        self.classes_ = np.array([0, 1])
        self.dim_ = store.dim
        self.blocks_ = feature_blocks(store.feature_columns, store.dim)
        self.block_models_: dict[str, LateFusion] = {}
        inner = _inner_folds(y, self.inner_folds, self.seed)
        img = self._image_features(store, rows, False, y, inner)
        clin = clinical_matrix(store, self.clinical_columns_)[rows].astype(np.float64)
        feats = np.concatenate([clin, img], axis=1)
        self.fusion_scaler_ = Scaler.fit(feats)
        z = np.asarray(self.fusion_scaler_.transform(feats), dtype=np.float64)

        self.C_, self.threshold_, self.coef_, self.intercept_ = fit_fusion_logistic(
            z, y, self.Cs, inner, self.threshold)
        return self

    def decision_function(self, store: Any) -> np.ndarray:
        rows = check_predict_store(self, store)
        clin = clinical_matrix(store, self.clinical_columns_).astype(np.float64)
        with native_threads(getattr(self, "n_threads", 1)):
            feats = np.concatenate([clin, self._image_features(store, rows, True)], axis=1)
        return np.asarray(self.fusion_scaler_.transform(feats), dtype=np.float64) @ self.coef_ \
            + self.intercept_

    def predict_proba(self, store: Any) -> np.ndarray:
        return _proba(1.0 / (1.0 + np.exp(-self.decision_function(store))))

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)

    def coefficients(self) -> dict[str, float]:
        q = round(100 * self.quantile)
        names = list(self.clinical_columns_) + [f"{b}_{s}" for b in self.blocks_
                                                for s in ("mean", f"q{q}")]
        names += [f"proto{k}" for k in range(self.n_prototypes or 0)]
        return dict(zip(names, (float(v) for v in self.coef_)))
