"""Late fusion (issue 9): a pooled image score joins the clinical features in a
regularised logistic regression."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.baselines.common import (
    check_fusion_params,
    check_predict_store,
    fit_fusion_logistic,
    fusion_state,
    restore_fusion_state,
    _inner_folds,
    _need_clinical,
    _proba,
    bag_mean_quantile,
    native_threads,
)
from lymph.errors import LymphError
from lymph.head.bags import Scaler, check_bags, instances_of
from lymph.head.base import clinical_matrix, labelled_rows
from lymph.head.base import where as _where

LOGIT_COLUMNS = ("logit", "weak:logit")


# ---- late fusion -------------------------------------------------------------------------------
def logit_column(store: Any) -> str | None:
    """The store's weak-supervision cell-logit column (``logit``, ``weak:logit`` or any
    ``PREFIX:logit``), or None."""
    cols = list(store.feature_columns or [])
    for name in LOGIT_COLUMNS:
        if name in cols:
            return name
    hits = [c for c in cols if c.endswith(":logit")]
    return hits[0] if hits else None


class LateFusion(BaseEstimator, ClassifierMixin):
    """Late fusion (stacking): pooled image scores + standardised clinical features ->
    regularised (L2) logistic regression, class-balanced.

    The image score of a cell:

    - a **weak-supervision store** (a cell-logit column ``logit`` / ``weak:logit``): the
      logit itself. Stage one already wrote out-of-fold logits for labelled patients, so
      nothing is learned here from images.
    - **any other store** (autoencoder, morphometry, ...): a learned linear projection, an
      instance-level L2 logistic regression on the standardised instance features with every
      instance labelled by its patient's label (instance weight ``1 / bag size``, classes
      balanced, so each patient counts once). It is fitted on the fit patients only. The
      scores the fusion regression is trained on are **nested out of fold**: for each of
      ``inner_folds`` stratified folds of the fit patients, a projection fitted on the other
      folds scores that fold's patients; the projection refitted on all fit patients scores
      new patients. So the fusion never sees a score from a projection that saw the patient.

    Pooling: each bag gives two image features, the mean and the ``quantile`` (default 0.75)
    of its cells' scores. The fusion regression's ``C`` is chosen from ``Cs`` by inner
    stratified CV (``inner_folds`` folds, log loss) on the fit patients; the threshold from
    that CV's out-of-fold probabilities at the chosen ``C``; the final regression is refitted
    on all fit patients. Saved without pickles: :meth:`to_json` / :meth:`from_json`.
    """

    inputs = "images+clinical"
    images = True  # uses the store's image features (predict checks the encoder)
    clinical = True

    def __init__(self, Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), quantile: float = 0.75,
                 projection_C: float = 1.0, inner_folds: int = 5,
                 threshold: str | float = "inner", seed: int = 0, n_threads: int | None = 1) -> None:
        self.Cs = Cs
        self.quantile = quantile
        self.projection_C = projection_C
        self.inner_folds = inner_folds
        self.threshold = threshold
        self.seed = seed
        self.n_threads = n_threads

    # ---- image scores ----------------------------------------------------------------------
    def _fit_projection(self, store: Any, rows: np.ndarray, y: np.ndarray,
                        cells: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Instance-level LR on the patients ``rows`` (labels ``y``): (coef (D,), intercept)
        in the space of instances standardised by ``self.instance_scaler_`` (``cells``: those
        standardised instances, when the caller has them)."""
        from sklearn.linear_model import LogisticRegression

        sizes = store.bag_sizes[rows]
        x = self._standardised(store, rows) if cells is None else cells
        yi = np.repeat(y, sizes)
        counts = np.bincount(y, minlength=2).astype(np.float64)
        w = np.repeat((len(y) / (2.0 * counts))[y] / sizes, sizes)
        lr = LogisticRegression(C=self.projection_C, max_iter=500)
        lr.fit(x, yi, sample_weight=w)
        return lr.coef_[0].astype(np.float64), float(lr.intercept_[0])

    def _standardised(self, store: Any, rows: np.ndarray) -> np.ndarray:
        """The instances of ``rows``, standardised by the fitted instance scaler (float32)."""
        return self.instance_scaler_.transform(instances_of(store.embeddings, store.patient_ptr, rows))

    def _cell_scores(self, store: Any, rows: np.ndarray, proj: tuple[np.ndarray, float] | None,
                     cells: np.ndarray | None = None) -> np.ndarray:
        if self.logit_column_ is not None:
            emb = instances_of(store.embeddings, store.patient_ptr, rows)
            return emb[:, list(store.feature_columns).index(self.logit_column_)].astype(np.float64)
        assert proj is not None
        x = self._standardised(store, rows) if cells is None else cells
        return x.astype(np.float64) @ proj[0] + proj[1]

    def _bag_features(self, store: Any, rows: np.ndarray, proj: tuple[np.ndarray, float] | None,
                      cells: np.ndarray | None = None) -> np.ndarray:
        sizes = store.bag_sizes[rows]
        ptr = np.concatenate([[0], np.cumsum(sizes)])
        mean, q = bag_mean_quantile(self._cell_scores(store, rows, proj, cells), ptr, self.quantile)
        return np.stack([mean, q], axis=1)

    # ---- fit -----------------------------------------------------------------------------------
    def fit(self, store: Any) -> LateFusion:
        with native_threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> LateFusion:

        check_fusion_params(self)
        rows, y = labelled_rows(store)
        self.clinical_columns_ = _need_clinical(store, "LateFusion")
        check_bags(store, rows)
        self.classes_ = np.array([0, 1])
        self.dim_ = store.dim
        self.feature_columns_ = None if store.feature_columns is None else list(store.feature_columns)
        self.logit_column_ = logit_column(store)
        inner = _inner_folds(y, self.inner_folds, self.seed)
        if self.logit_column_ is not None:
            self.instance_scaler_ = None
            self.projection_ = None
            img = self._bag_features(store, rows, None)
        else:
            self.instance_scaler_ = Scaler.fit(instances_of(store.embeddings, store.patient_ptr, rows))
            # standardised once; each inner fold takes its patients' rows of it (the same
            # numbers as standardising them apart: the scaler works element by element)
            cells = self._standardised(store, rows)
            ptr = np.concatenate([[0], np.cumsum(store.bag_sizes[rows])])

            def part(idx: np.ndarray) -> np.ndarray:
                return instances_of(cells, ptr, idx)  # bags numbered as in rows

            img = np.zeros((rows.size, 2))
            if inner:  # nested: OOF image scores for the fusion regression's training
                for tr, va in inner:
                    proj = self._fit_projection(store, rows[tr], y[tr], part(tr))
                    img[va] = self._bag_features(store, rows[va], proj, part(va))
            self.projection_ = self._fit_projection(store, rows, y, cells)
            if not inner:
                img = self._bag_features(store, rows, self.projection_, cells)
            del cells
        clin = clinical_matrix(store, self.clinical_columns_)[rows].astype(np.float64)
        feats = np.concatenate([clin, img], axis=1)
        self.fusion_scaler_ = Scaler.fit(feats)
        z = self.fusion_scaler_.transform(feats).astype(np.float64)

        self.C_, self.threshold_, self.coef_, self.intercept_ = fit_fusion_logistic(
            z, y, self.Cs, inner, self.threshold)
        return self

    # ---- inference ---------------------------------------------------------------------------
    def _check_store(self, store: Any) -> np.ndarray:
        rows = check_predict_store(self, store)
        if (self.feature_columns_ is not None and store.feature_columns is not None
                and list(store.feature_columns) != self.feature_columns_):
            raise LymphError(f"{_where(store)}: /embeddings attribute 'columns' differs from the "
                             "model's feature columns: a store from another encoder?")
        return rows

    def decision_function(self, store: Any) -> np.ndarray:
        rows = self._check_store(store)
        clin = clinical_matrix(store, self.clinical_columns_).astype(np.float64)
        with native_threads(getattr(self, "n_threads", 1)):
            img = self._bag_features(store, rows, self.projection_)
        feats = np.concatenate([clin, img], axis=1)
        return self.fusion_scaler_.transform(feats).astype(np.float64) @ self.coef_ + self.intercept_

    def predict_proba(self, store: Any) -> np.ndarray:
        return _proba(1.0 / (1.0 + np.exp(-self.decision_function(store))))

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)

    def cell_scores(self, store: Any) -> list[np.ndarray]:
        """Per patient, each cell's image score (cell logit or learned projection)."""
        rows = self._check_store(store)
        s = self._cell_scores(store, rows, self.projection_)
        return np.split(s, np.cumsum(store.bag_sizes)[:-1])

    def attention(self, store: Any) -> list[np.ndarray]:
        """Per patient, the mean pooling's weight of each cell (``1 / n``), for the
        attention-based views; the ranking that explains a decision is :meth:`cell_scores`."""
        rows = self._check_store(store)
        return [np.full(int(n), 1.0 / n) for n in store.bag_sizes[rows]]

    def coefficients(self) -> dict[str, float]:
        """The fusion regression's coefficients by feature name (standardised inputs)."""
        names = list(self.clinical_columns_) + ["image_mean", f"image_q{round(100 * self.quantile)}"]
        return dict(zip(names, (float(v) for v in self.coef_)))

    # ---- JSON (model directory; no pickles) --------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        if not hasattr(self, "coef_"):
            raise LymphError("LateFusion: not fitted (call fit first)")
        params = self.get_params()
        params["Cs"] = [float(c) for c in params["Cs"]]
        return {
            "params": params,
            "logit_column": self.logit_column_,
            "instance_scaler": None if self.instance_scaler_ is None else self.instance_scaler_.to_json(),
            "projection": None if self.projection_ is None else {
                "coef": [float(v) for v in self.projection_[0]], "intercept": self.projection_[1]},
            **fusion_state(self),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LateFusion:
        params = dict(d["params"])
        params["Cs"] = tuple(params["Cs"])
        est = cls(**params)
        restore_fusion_state(est, d)
        est.logit_column_ = d["logit_column"]
        est.instance_scaler_ = None if d["instance_scaler"] is None else Scaler.from_json(d["instance_scaler"])
        pj = d["projection"]
        est.projection_ = None if pj is None else (np.asarray(pj["coef"], dtype=np.float64),
                                                   float(pj["intercept"]))
        return est
