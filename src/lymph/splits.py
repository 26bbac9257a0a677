"""Patient-level folds, the one definition both stages use: stage one's fold-safe weak
scorers (:mod:`lymph.encoder.weak_folds`) and stage two's cross-validation
(:mod:`lymph.head.evaluate`), so the same ``(labels, folds, repeats, seed)`` gives the
same splits everywhere.
"""

from __future__ import annotations

import numpy as np

from lymph.errors import LymphError

Fold = tuple[int, int, np.ndarray, np.ndarray]  # (repeat, fold, train_rows, test_rows)


def make_folds(labels: np.ndarray, folds: int = 5, repeats: int = 1, seed: int = 0) -> list[Fold]:
    """Stratified patient-level folds over the labelled rows (labels 0/1; -1 left out).

    Rows are store row indices. Repeat ``r`` shuffles with ``seed + r``.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    rows = np.flatnonzero(labels >= 0)
    y = labels[rows]
    if folds < 2:
        raise LymphError(f"folds: expected at least 2, got {folds}")
    if repeats < 1:
        raise LymphError(f"repeats: expected at least 1, got {repeats}")
    least = int(np.bincount(y.astype(np.int64), minlength=2).min()) if rows.size else 0
    if least < folds:
        raise LymphError(f"labels: {folds}-fold stratified CV needs at least {folds} patients "
                         f"of each class, the smaller class has {least}")
    out: list[Fold] = []
    for r in range(repeats):
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (tr, te) in enumerate(skf.split(rows, y)):
            out.append((r, k, rows[tr], rows[te]))
    return out
