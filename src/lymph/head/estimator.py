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

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.errors import LymphError
from lymph.head.bags import Scaler, check_bags, instances_of, make_buckets
from lymph.head.model import HeadConfig, MILHead
from lymph.head.registry import check_pooling
from lymph.head.train import TrainResult, choose_threshold, forward_groups, make_groups, train


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None and n != old:
            torch.set_num_threads(old)


def _where(store: Any) -> str:
    return str(store.path) if getattr(store, "path", None) is not None else "store"


def labelled_rows(store: Any) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows of a store and their labels; both classes must be present."""
    rows = store.labelled()
    if rows.size == 0:
        raise LymphError(f"{_where(store)}: /patients/label: no labelled patients to fit on "
                         "(empty selection; expected labels 0 or 1)")
    y = store.labels[rows].astype(np.int64)
    if np.unique(y).size < 2:
        raise LymphError(f"{_where(store)}: /patients/label: the fit patients are all of "
                         f"class {int(y[0])}; expected both classes")
    return rows, y


def clinical_matrix(store: Any, columns: list[str]) -> np.ndarray:
    """The store's clinical values for ``columns`` (by name, any order), checked finite."""
    have = list(store.clinical_columns)
    missing = [c for c in columns if c not in have]
    if missing:
        raise LymphError(
            f"{_where(store)}: /patients/clinical: missing clinical field(s) "
            f"{', '.join(missing)}; the model expects columns {', '.join(columns)} "
            f"(the store has {', '.join(have) or 'none'})")
    x = store.clinical[:, [have.index(c) for c in columns]].astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise LymphError(f"{_where(store)}: /patients/clinical: patient {store.ids[i]} has no "
                         f"value for {columns[j]} (expected a finite number)")
    return x


class MILClassifier(BaseEstimator, ClassifierMixin):
    """MIL head: ``pooling`` over instances + standardised clinical features -> MLP -> logit.

    ``clinical=False``: images only (also automatic when the store has no clinical
    columns). ``images=False``: a clinical-only MLP. ``threshold``: ``"inner"`` (chosen on
    the inner validation split, see :func:`lymph.head.train.choose_threshold`) or a number.
    ``val_fraction`` of the fit patients (stratified) is the inner validation split used
    for early stopping and the threshold; the kept model is the one trained on the rest,
    at its best epoch.
    """

    def __init__(self, pooling: str = "attention", clinical: bool = True, images: bool = True,
                 attention_hidden: int = 128, mlp: tuple[int, ...] = (256, 128),
                 dropout: float = 0.25, lr: float = 2e-3, weight_decay: float = 1e-4,
                 max_epochs: int = 100, patience: int = 15, batch_size: int = 32,
                 val_fraction: float = 0.2, seed: int = 0, threshold: str | float = "inner",
                 n_threads: int | None = 1) -> None:
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

    # ---- fitting ------------------------------------------------------------------------
    def _check_params(self) -> None:
        check_pooling(self.pooling)
        if not (self.threshold == "inner" or isinstance(self.threshold, (int, float))):
            raise LymphError(f"threshold: expected 'inner' or a number in (0, 1), got {self.threshold!r}")
        if not self.images and not self.clinical:
            raise LymphError("images=False and clinical=False: expected at least one input")

    def fit(self, store: Any) -> MILClassifier:
        with _threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> MILClassifier:
        from sklearn.model_selection import train_test_split

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
        # Scalers: fitted on the fit patients only (never on the patients evaluated).
        clin = clinical_matrix(store, self.clinical_columns_)[rows]
        self.clinical_scaler_ = Scaler.fit(clin)
        self.instance_scaler_ = (Scaler.fit(instances_of(store.embeddings, store.patient_ptr, rows))
                                 if self.images else None)
        # Inner stratified split of the fit patients: early stopping + threshold.
        pos = np.arange(rows.size)
        n_val = int(round(self.val_fraction * rows.size))
        counts = np.bincount(y, minlength=2)
        if self.val_fraction > 0 and counts.min() >= 2 and n_val >= 2:
            tr, va = train_test_split(pos, test_size=n_val, stratify=y, random_state=self.seed)
        else:  # too few patients for an inner split: fixed epochs, threshold 0.5
            tr, va = pos, pos[:0]
        self.inner_val_ids_ = [str(store.ids[rows[i]]) for i in va]
        cfg = HeadConfig(dim=self.dim_, n_clinical=len(self.clinical_columns_),
                         pooling=self.pooling, attention_hidden=self.attention_hidden,
                         mlp=tuple(self.mlp), dropout=self.dropout)
        self.config_ = cfg
        zc = self.clinical_scaler_.transform(clin)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = MILHead(cfg)
            res, val_logits = self._train(store, rows, tr, va, zc, y)
        self.best_epoch_, self.epochs_run_ = res.best_epoch, res.epochs_run
        if self.threshold == "inner" and va.size:
            p_val = 1.0 / (1.0 + np.exp(-val_logits.astype(np.float64)))
            self.threshold_ = choose_threshold(y[va], p_val)
        else:
            self.threshold_ = 0.5 if self.threshold == "inner" else float(self.threshold)
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
                    patience=self.patience, batch_size=self.batch_size,
                    rng=np.random.default_rng(self.seed))
        val_logits = (forward_groups(self.model_, va_groups, va.size)[0] if va_groups
                      else np.zeros(0, np.float32))
        return res, val_logits

    def _groups(self, store: Any, rows: np.ndarray, zc: np.ndarray, y: np.ndarray | None) -> list:
        buckets = (make_buckets(store.embeddings, store.patient_ptr, rows, self.instance_scaler_)
                   if self.images else None)
        return make_groups(buckets, zc, y)

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

    def predict_proba(self, store: Any) -> np.ndarray:
        logits, _ = self._forward(store, False)
        p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)

    def attention(self, store: Any) -> list[np.ndarray]:
        """Per patient, the pooling weight of each instance (store order; sums to 1)."""
        if not self.images:
            raise LymphError("MILClassifier(images=False): a clinical-only model has no "
                             "instance weights")
        _, w = self._forward(store, True)
        assert w is not None
        return w
