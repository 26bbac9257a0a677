"""Bags as plain arrays: the scikit-learn side of :class:`~lymph.head.estimator.MILClassifier`.

    from lymph.head import MILClassifier
    clf = MILClassifier().fit(bags, y)          # bags: list of (n_i, d) arrays, y: (n,)
    clf.predict_proba(bags_new)                 # (n_new, 2)
    cross_val_score(MILClassifier(), bags, y, cv=StratifiedKFold(5, shuffle=True))

An optional clinical matrix ``(n, c)`` goes in as ``clinical=`` to ``fit`` and to
``predict_proba`` / ``predict`` / ``score``. Here the arrays become an in-memory
:class:`~lymph.store.EmbeddingStore` (CSR: one concatenation, no per-bag work beyond
checking), so arrays and stores share every line of training and inference. Labels may be
any two values (``classes_`` keeps them, sorted; the second is the positive class).

Every value is checked where it enters; a bad one is a :class:`LymphError` naming the
argument (``bags[3]``, ``y``, ``clinical``) and what was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lymph.errors import LymphError
from lymph.store import EmbeddingStore


def is_store(x: Any) -> bool:
    return hasattr(x, "patient_ptr") and hasattr(x, "embeddings")


def check_bags(bags: Any, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``bags`` -> (instances ``(sum n_i, d)`` float32, CSR offsets ``(n + 1,)``)."""
    if isinstance(bags, np.ndarray) and bags.dtype != object:
        if bags.ndim != 3:
            raise LymphError(f"bags: expected a list of (n_i, d) arrays (or one (n, N, d) "
                             f"array), got an array of shape {bags.shape}")
        bags = list(bags)
    if isinstance(bags, (str, bytes)) or not hasattr(bags, "__len__"):
        raise LymphError(f"bags: expected a list of (n_i, d) arrays, got {type(bags).__name__}")
    if len(bags) == 0:
        raise LymphError("bags: expected at least one bag, got an empty list")
    arrs = []
    for i, b in enumerate(bags):
        try:
            a = np.asarray(b, dtype=np.float32)
        except (TypeError, ValueError):
            raise LymphError(f"bags[{i}]: expected a numeric (n_i, d) array, got "
                             f"{type(b).__name__}") from None
        if a.ndim != 2:
            raise LymphError(f"bags[{i}]: expected a 2-d array (n_i, d), got shape {a.shape}")
        if a.shape[0] == 0:
            raise LymphError(f"bags[{i}]: expected at least one instance, got an empty bag")
        d = arrs[0].shape[1] if arrs else dim
        if d is not None and a.shape[1] != d:
            raise LymphError(f"bags[{i}]: expected {d} features per instance (as "
                             f"{'bags[0]' if arrs else 'the fitted model'}), got {a.shape[1]}")
        if not np.isfinite(a).all():
            r, c = np.argwhere(~np.isfinite(a))[0]
            raise LymphError(f"bags[{i}]: non-finite value at instance {r}, feature {c} "
                             "(expected finite numbers)")
        arrs.append(a)
    sizes = np.array([a.shape[0] for a in arrs], dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return np.concatenate(arrs, axis=0), ptr


def check_labels(y: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``y`` -> (0/1 int8 labels, the two classes sorted)."""
    if y is None:
        raise LymphError("y: expected one label per bag, got None")
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise LymphError(f"y: expected shape ({n},) (one label per bag), got {y.shape}")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise LymphError("y: expected finite labels, got NaN or inf")
    classes = np.unique(y)
    if classes.size != 2:
        raise LymphError(f"y: expected exactly two classes, got {classes.size} "
                         f"({', '.join(map(str, classes[:5]))})")
    return (y == classes[1]).astype(np.int8), classes


def check_clinical(clinical: Any, n: int, n_cols: int | None = None) -> np.ndarray:
    if clinical is None:
        if n_cols:
            raise LymphError(f"clinical: the model was fitted with {n_cols} clinical "
                             "column(s); expected a (n_bags, n_columns) matrix, got None")
        return np.zeros((n, 0), dtype=np.float32)
    try:
        c = np.asarray(clinical, dtype=np.float32)
    except (TypeError, ValueError):
        raise LymphError("clinical: expected a numeric (n_bags, n_columns) matrix") from None
    if c.ndim != 2 or c.shape[0] != n:
        raise LymphError(f"clinical: expected shape ({n}, n_columns), got {c.shape}")
    if n_cols is not None and c.shape[1] != n_cols:
        raise LymphError(f"clinical: expected {n_cols} columns (as at fit), got {c.shape[1]}")
    if not np.isfinite(c).all():
        i, j = np.argwhere(~np.isfinite(c))[0]
        raise LymphError(f"clinical: non-finite value for bag {i}, column {j} "
                         "(expected finite numbers)")
    return c


def store_from_arrays(bags: Any, y: Any = None, clinical: Any = None, *,
                      dim: int | None = None, n_clinical: int | None = None
                      ) -> tuple[EmbeddingStore, np.ndarray | None]:
    """An in-memory store of the checked arrays (labels -1 when ``y`` is None) and the
    classes of ``y``."""
    emb, ptr = check_bags(bags, dim)
    n = ptr.size - 1
    labels, classes = (np.full(n, -1, np.int8), None) if y is None else check_labels(y, n)
    clin = check_clinical(clinical, n, n_clinical)
    return EmbeddingStore(
        path=None, embeddings=emb, patient_ptr=ptr,
        ids=np.array([str(i) for i in range(n)], dtype=object), labels=labels,
        clinical=clin, clinical_columns=[f"clinical_{j}" for j in range(clin.shape[1])],
    ), classes
