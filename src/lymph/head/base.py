"""What the torch estimators of stage two share (:class:`~lymph.head.estimator.MILClassifier`,
:class:`~lymph.baselines.MixtureOfExperts`), so that their fitting cannot drift apart:
the parameter check of ``threshold``, torch's thread count, the labelled rows, the
scalers fitted on the fit patients, the inner stratified validation split and the
threshold chosen on it. The store helpers (:func:`where`, :func:`labelled_rows`,
:func:`clinical_matrix`) serve every estimator of the comparison.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.errors import LymphError
from lymph.head.bags import Scaler, instances_of, make_buckets
from lymph.head.train import choose_threshold, make_groups


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside (``None``: unchanged), restored after."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None and n != old:
            torch.set_num_threads(old)


def where(store: Any) -> str:
    """The store's path for a message (``"store"`` for one in memory)."""
    return str(store.path) if getattr(store, "path", None) is not None else "store"


def labelled_rows(store: Any) -> tuple[np.ndarray, np.ndarray]:
    """The labelled rows of a store and their labels; both classes must be present."""
    rows = store.labelled()
    if rows.size == 0:
        raise LymphError(f"{where(store)}: /patients/label: no labelled patients to fit on "
                         "(empty selection; expected labels 0 or 1)")
    y = store.labels[rows].astype(np.int64)
    if np.unique(y).size < 2:
        raise LymphError(f"{where(store)}: /patients/label: the fit patients are all of "
                         f"class {int(y[0])}; expected both classes")
    return rows, y


def clinical_matrix(store: Any, columns: list[str]) -> np.ndarray:
    """The store's clinical values for ``columns`` (by name, any order), checked finite."""
    have = list(store.clinical_columns)
    missing = [c for c in columns if c not in have]
    if missing:
        raise LymphError(
            f"{where(store)}: /patients/clinical: missing clinical field(s) "
            f"{', '.join(missing)}; the model expects columns {', '.join(columns)} "
            f"(the store has {', '.join(have) or 'none'})")
    x = store.clinical[:, [have.index(c) for c in columns]].astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise LymphError(f"{where(store)}: /patients/clinical: patient {store.ids[i]} has no "
                         f"value for {columns[j]} (expected a finite number)")
    return x


def check_threshold(t: Any) -> None:
    """The ``threshold`` parameter: ``"inner"`` or a number in (0, 1), for every estimator."""
    ok = t == "inner" or (isinstance(t, (int, float, np.number)) and not isinstance(t, bool)
                          and math.isfinite(float(t)) and 0.0 < float(t) < 1.0)
    if not ok:
        raise LymphError(f"threshold: expected 'inner' or a number in (0, 1), got {t!r}")


class TorchBagEstimator(BaseEstimator, ClassifierMixin):
    """Base of the torch MIL estimators. Subclasses store their parameters in ``__init__``
    (at least ``seed``, ``threshold``, ``val_fraction``, ``n_threads``), set
    ``clinical_columns_`` and define ``_fit(store)``, calling the steps below in order:
    :meth:`_fit_scalers`, :meth:`_inner_split`, training, :meth:`_set_threshold`."""

    #: the rule that picks the threshold on inner validation probabilities (y, p) -> float
    threshold_rule: Callable[[np.ndarray, np.ndarray], float] = staticmethod(choose_threshold)

    def fit(self, store: Any) -> Any:
        with torch_threads(self.n_threads):  # type: ignore[attr-defined]
            return self._fit(store)  # type: ignore[attr-defined]

    def _fit_scalers(self, store: Any, rows: np.ndarray, images: bool) -> np.ndarray:
        """Standardisation fitted on the fit patients only (never on those evaluated); the
        fit patients' standardised clinical matrix."""
        clin = clinical_matrix(store, self.clinical_columns_)[rows]  # type: ignore[attr-defined]
        self.clinical_scaler_ = Scaler.fit(clin)
        self.instance_scaler_ = (Scaler.fit(instances_of(store.embeddings, store.patient_ptr, rows))
                                 if images else None)
        return self.clinical_scaler_.transform(clin)

    def _inner_split(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) positions of the fit patients: a stratified, seeded
        ``val_fraction`` split for early stopping and the threshold; no validation part when
        there are too few patients (fixed epochs, threshold 0.5)."""
        from sklearn.model_selection import train_test_split

        pos = np.arange(y.size)
        n_val = int(round(self.val_fraction * y.size))  # type: ignore[attr-defined]
        if self.val_fraction > 0 and np.bincount(y, minlength=2).min() >= 2 and n_val >= 2:  # type: ignore[attr-defined]
            tr, va = train_test_split(pos, test_size=n_val, stratify=y,
                                      random_state=self.seed)  # type: ignore[attr-defined]
            return tr, va
        return pos, pos[:0]

    def _set_threshold(self, y_val: np.ndarray, logits_val: np.ndarray) -> None:
        """``threshold_``: :attr:`threshold_rule` on the validation patients' probabilities
        (``threshold="inner"``), 0.5 without any, or the fixed number."""
        t = self.threshold  # type: ignore[attr-defined]
        if t == "inner" and y_val.size:
            p = 1.0 / (1.0 + np.exp(-np.asarray(logits_val).astype(np.float64)))
            self.threshold_ = self.threshold_rule(y_val, p)
        else:
            self.threshold_ = 0.5 if t == "inner" else float(t)

    def _groups(self, store: Any, rows: np.ndarray, zc: np.ndarray, y: np.ndarray | None) -> list:
        """Padded, masked length buckets of ``rows`` (standardised instances) with their
        clinical rows ``zc`` and labels ``y``; clinical only without an instance scaler."""
        buckets = (make_buckets(store.embeddings, store.patient_ptr, rows, self.instance_scaler_)
                   if self.instance_scaler_ is not None else None)
        return make_groups(buckets, zc, y)

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)  # type: ignore[attr-defined]
