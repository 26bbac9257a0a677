"""The estimator contract of stage two, and the MIL head as an estimator.

Contract (every model compared by ``fit-head`` / ``compare-baselines`` follows it):

- A scikit-learn style estimator: subclass ``sklearn.base.BaseEstimator`` and
  ``ClassifierMixin``; ``__init__`` only stores its parameters (so ``get_params`` / ``clone``
  work); learned state ends in ``_``; ``fit`` returns ``self``.
- ``fit(store: EmbeddingStore) -> self`` trains on the labelled patients of that store
  (``store.labels`` in {0, 1}; rows with -1 are ignored) and on nothing else: a
  cross-validation passes ``store.subset(train_rows)``. Any standardisation, inner
  validation split, early stopping and threshold choice happen inside, on those patients.
- ``predict_proba(store) -> np.ndarray (n_patients, 2)``: columns P(reactive),
  P(malignant), one row per patient of ``store`` in store order (labels are not used).
- ``threshold_: float``: the decision threshold on P(malignant), chosen on the inner split
  of the fit data (or fixed by a parameter). ``predict(store)`` is
  ``predict_proba(store)[:, 1] >= threshold_``.
- MIL models also have ``attention(store) -> list[np.ndarray]``: per patient, one weight per
  instance (store order), summing to 1.
- Bad input is a :class:`~lymph.errors.LymphError` naming the store, the field and what was
  expected (a missing clinical column, a patient without images, no patients).

:class:`MILClassifier` is the MIL head (pooling + clinical MLP). Determinism: ``seed`` fixes
the inner split, the initial weights, dropout and the batch order; the global torch RNG is
left as it was. ``n_threads`` (default 1) is the torch thread count used inside ``fit`` and
``predict_proba`` (restored afterwards): this head's operations are small, and on a shared
2-core machine one thread is several times faster than two (thread contention), and
reproducible. ``None`` keeps the process setting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lymph.errors import LymphError
from lymph.head.bags import check_bags
from lymph.head.base import TorchBagEstimator, check_threshold, clinical_matrix, labelled_rows
from lymph.head.base import torch_threads as _threads
from lymph.head.base import where as _where
from lymph.head.ensemble import build_head
from lymph.head.model import HeadConfig, MILHead
from lymph.head.registry import check_pooling
from lymph.head.train import (
    TrainResult,
    choose_threshold_guarded,
    forward_groups,
    train,
)

#: ``members="auto"``: an inner-CV ensemble below this many fit patients, one head above
#: (where a 20% inner split already holds hundreds of patients).
AUTO_ENSEMBLE_BELOW = 1000


#: ``patience`` counts epochs of up to this many training patients (see scaled_patience).
PATIENCE_PATIENTS = 1000


def scaled_patience(patience: int, n_train: int, floor: int = 3) -> int:
    """Early-stopping patience measured in patients seen rather than epochs: ``patience``
    epochs up to :data:`PATIENCE_PATIENTS` training patients, proportionally fewer epochs
    above (at least ``floor``, never more than ``patience``). 8,000 patients: 15 -> 3
    epochs, i.e. still 24,000 patients seen without improvement. Small stores unchanged."""
    if n_train <= PATIENCE_PATIENTS:
        return patience
    return min(patience, max(floor, int(np.ceil(patience * PATIENCE_PATIENTS / n_train))))


class MILClassifier(TorchBagEstimator):
    """MIL head: ``pooling`` over instances + standardised clinical features -> MLP -> logit.

    ``clinical=False``: images only (also automatic when the store has no clinical
    columns). ``images=False``: a clinical-only MLP. ``threshold``: ``"inner"`` (the
    guarded rule of :func:`lymph.head.train.choose_threshold_guarded` on inner
    out-of-sample probabilities) or a number.

    ``members``: ``"auto"`` (default) is an inner-CV ensemble of ``inner_folds`` heads when
    the fit set has fewer than :data:`AUTO_ENSEMBLE_BELOW` labelled patients, else one head;
    an integer forces it (1 = one head). Ensemble (:mod:`lymph.head.ensemble`): head ``k``
    trains on the fit patients outside inner fold ``k`` and early-stops on fold ``k``; the
    threshold rule sees every fit patient's out-of-fold probability; predictions average
    the heads. One head: ``val_fraction`` of the fit patients (stratified) is the inner
    validation split for early stopping and the threshold; the kept model is the one
    trained on the rest, at its best epoch.
    """

    #: 0.5 unless the best cut beats it by 2 standard errors (issue 17)
    threshold_rule = staticmethod(choose_threshold_guarded)

    def __init__(self, pooling: str = "attention", clinical: bool = True, images: bool = True,
                 attention_hidden: int = 128, mlp: tuple[int, ...] = (256, 128),
                 dropout: float = 0.25, lr: float = 2e-3, weight_decay: float = 1e-4,
                 max_epochs: int = 100, patience: int = 15, batch_size: int = 32,
                 val_fraction: float = 0.2, seed: int = 0, threshold: str | float = "inner",
                 n_threads: int | None = 1, members: int | str = "auto",
                 inner_folds: int = 5) -> None:
        self.pooling = pooling
        self.clinical = clinical
        self.images = images
        self.attention_hidden = attention_hidden
        self.mlp = mlp
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.threshold = threshold
        self.n_threads = n_threads
        self.members = members
        self.inner_folds = inner_folds

    # ---- fitting ------------------------------------------------------------------------
    def _check_params(self) -> None:
        check_pooling(self.pooling)
        check_threshold(self.threshold)
        if not self.images and not self.clinical:
            raise LymphError("images=False and clinical=False: expected at least one input")
        m = self.members
        if not (m == "auto" or (isinstance(m, (int, np.integer)) and not isinstance(m, bool)
                                and m >= 1)):
            raise LymphError(f"members: expected 'auto' or an integer >= 1, got {m!r}")
        if not (isinstance(self.inner_folds, (int, np.integer)) and self.inner_folds >= 2):
            raise LymphError(f"inner_folds: expected an integer >= 2, got {self.inner_folds!r}")

    def _n_members(self, y: np.ndarray) -> int:
        """Heads of the ensemble for fit labels ``y`` (1 = one head, inner split)."""
        k = (self.inner_folds if y.size < AUTO_ENSEMBLE_BELOW else 1) if self.members == "auto" \
            else int(self.members)
        k = min(k, int(np.bincount(y, minlength=2).min()))  # stratified: each fold both classes
        return k if k >= 2 else 1

    def fit(self, X: Any, y: Any = None, clinical: Any = None) -> MILClassifier:
        """Fit on a store (``fit(store)``: its labelled patients) or on plain arrays
        (``fit(bags, y, clinical=None)``: a list of ``(n_i, d)`` arrays, one label per bag,
        any two label values; see :mod:`lymph.head.arrays`)."""
        from lymph.head.arrays import is_store, store_from_arrays

        if is_store(X):
            if y is not None or clinical is not None:
                raise LymphError("fit: a store carries its own labels and clinical columns; "
                                 "expected fit(store) or fit(bags, y, clinical=None)")
            store, classes = X, None
        else:
            if y is None:
                raise LymphError("y: expected one label per bag with fit(bags, y), got None")
            store, classes = store_from_arrays(X, y, clinical)
        with _threads(self.n_threads):
            self._fit(store)
        if classes is not None:
            self.classes_ = classes
        return self

    def _as_store(self, X: Any, clinical: Any) -> Any:
        from lymph.head.arrays import is_store, store_from_arrays

        if not hasattr(self, "model_"):
            raise LymphError("MILClassifier: not fitted (call fit first)")
        if is_store(X):
            if clinical is not None:
                raise LymphError("clinical: a store carries its own clinical columns; "
                                 "expected clinical=None with a store")
            return X
        return store_from_arrays(X, None, clinical, dim=self.dim_ if self.images else None,
                                 n_clinical=len(self.clinical_columns_))[0]

    def _fit(self, store: Any) -> MILClassifier:
        self._check_params()
        rows, y = labelled_rows(store)
        self.classes_ = np.array([0, 1])
        self.clinical_columns_ = list(store.clinical_columns) if self.clinical else []
        if not self.images and not self.clinical_columns_:
            raise LymphError(f"{_where(store)}: /patients/clinical: no clinical columns, but "
                             "images=False (clinical-only) needs some")
        self.dim_ = store.dim if self.images else 0
        self.feature_columns_ = store.feature_columns
        if self.images:
            check_bags(store, rows)
        zc = self._fit_scalers(store, rows, self.images)  # on the fit patients only
        k = self._n_members(y)
        if k > 1:
            return self._fit_ensemble(store, rows, zc, y, k)
        tr, va = self._inner_split(y)  # early stopping + threshold
        self.inner_val_ids_ = [str(store.ids[rows[i]]) for i in va]
        cfg = HeadConfig(dim=self.dim_, n_clinical=len(self.clinical_columns_),
                         pooling=self.pooling, attention_hidden=self.attention_hidden,
                         mlp=tuple(self.mlp), dropout=self.dropout)
        self.config_ = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = MILHead(cfg)
            res, val_logits = self._train(store, rows, tr, va, zc, y)
        self.best_epoch_, self.epochs_run_ = res.best_epoch, res.epochs_run
        self._set_threshold(y[va], val_logits)
        return self

    def _fit_ensemble(self, store: Any, rows: np.ndarray, zc: np.ndarray, y: np.ndarray,
                      k: int) -> MILClassifier:
        """``k`` heads on ``k`` stratified inner folds, trained together (vectorised)."""
        from sklearn.model_selection import StratifiedKFold

        from lymph.head.ensemble import train_members

        fold_of = np.zeros(rows.size, dtype=np.int64)
        skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=self.seed)
        for j, (_, va) in enumerate(skf.split(np.zeros(rows.size), y)):
            fold_of[va] = j
        self.inner_val_ids_ = []  # every fit patient is validated once (out of fold)
        cfg = HeadConfig(dim=self.dim_, n_clinical=len(self.clinical_columns_),
                         pooling=self.pooling, attention_hidden=self.attention_hidden,
                         mlp=tuple(self.mlp), dropout=self.dropout, members=k)
        self.config_ = cfg
        groups = self._groups(store, rows, zc, y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = build_head(cfg)
            best, epochs, oof = train_members(
                self.model_, groups, rows.size, y, fold_of, lr=self.lr,
                weight_decay=self.weight_decay, max_epochs=self.max_epochs,
                patience=self.patience, batch_size=self.batch_size,
                rng=np.random.default_rng(self.seed))
        self.best_epoch_, self.epochs_run_ = round(float(np.median(best))), int(epochs)
        self.member_best_epochs_ = [int(b) for b in best]
        self._set_threshold(y, oof)  # every fit patient out of fold
        return self

    def _train(self, store: Any, rows: np.ndarray, tr: np.ndarray, va: np.ndarray,
               zc: np.ndarray, y: np.ndarray) -> tuple[TrainResult, np.ndarray]:
        """Train ``self.model_`` on positions ``tr`` of ``rows``, early-stopping on ``va``;
        return the result and the kept model's logits on ``va``. (The benchmark overrides
        this with reference-style training.)"""
        tr_groups = self._groups(store, rows[tr], zc[tr], y[tr])
        va_groups = self._groups(store, rows[va], zc[va], y[va]) if va.size else None
        res = train(self.model_, tr_groups, va_groups, va.size, lr=self.lr,
                    weight_decay=self.weight_decay, max_epochs=self.max_epochs,
                    patience=scaled_patience(self.patience, tr.size),
                    batch_size=self.batch_size, rng=np.random.default_rng(self.seed))
        val_logits = (forward_groups(self.model_, va_groups, va.size)[0] if va_groups
                      else np.zeros(0, np.float32))
        return res, val_logits

    # ---- inference ----------------------------------------------------------------------
    def _check_store(self, store: Any) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise LymphError("MILClassifier: not fitted (call fit first)")
        if store.n_patients == 0:
            raise LymphError(f"{_where(store)}: no patients to predict (empty selection)")
        if self.images:
            if store.dim != self.dim_:
                raise LymphError(
                    f"{_where(store)}: /embeddings: expected {self.dim_} features per image "
                    f"(the model's encoder), got {store.dim}: a store from another encoder?")
            if (self.feature_columns_ is not None and store.feature_columns is not None
                    and list(store.feature_columns) != list(self.feature_columns_)):
                raise LymphError(f"{_where(store)}: /embeddings attribute 'columns' differs from "
                                 "the model's feature columns: a store from another encoder?")
        rows = np.arange(store.n_patients)
        if self.images:
            check_bags(store, rows)
        return rows

    def _forward(self, store: Any, want_weights: bool) -> tuple[np.ndarray, list | None]:
        rows = self._check_store(store)
        zc = self.clinical_scaler_.transform(clinical_matrix(store, self.clinical_columns_))
        groups = self._groups(store, rows, zc, None)
        with _threads(getattr(self, "n_threads", 1)):
            return forward_groups(self.model_, groups, rows.size, want_weights)

    def predict_proba(self, X: Any, clinical: Any = None) -> np.ndarray:
        """``(n, 2)``: P(classes_[0]), P(classes_[1]) per patient of a store or per bag."""
        logits, _ = self._forward(self._as_store(X, clinical), False)
        p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: Any, clinical: Any = None) -> np.ndarray:
        """``classes_[1]`` where P >= ``threshold_`` (0/1 for a store)."""
        pred = (self.predict_proba(X, clinical)[:, 1] >= self.threshold_).astype(np.int64)
        return np.asarray(self.classes_)[pred]

    def score(self, X: Any, y: Any, sample_weight: Any = None, clinical: Any = None) -> float:
        """Accuracy of :meth:`predict` (scikit-learn's default score)."""
        from sklearn.metrics import accuracy_score

        return float(accuracy_score(y, self.predict(X, clinical), sample_weight=sample_weight))

    def attention(self, X: Any, clinical: Any = None) -> list[np.ndarray]:
        """Per patient, the pooling weight of each instance (store order; sums to 1)."""
        if not self.images:
            raise LymphError("MILClassifier(images=False): a clinical-only model has no "
                             "instance weights")
        _, w = self._forward(self._as_store(X, clinical), True)
        assert w is not None
        return w
