"""Figures of stage two (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lymph.figures import STYLES, legend_outside, new_figure, save_png


def pr_curve_png(path: str | os.PathLike[str], labels: np.ndarray, oof: np.ndarray,
                 title: str = "") -> Path:
    """Precision-recall curves of out-of-fold P(malignant), one per repeat (``oof (R, n)``,
    NaN = not scored), with the prevalence baseline."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig, ax = new_figure((6.4, 4.2), dpi=120)
    prevalence = None
    for r in range(oof.shape[0]):
        ok = np.isfinite(oof[r])
        y, p = labels[ok].astype(int), oof[r, ok]
        if np.unique(y).size < 2:
            continue
        prec, rec, _ = precision_recall_curve(y, p)
        st = STYLES[r % len(STYLES)]  # repeats numbered from 1, as in the reports
        ax.step(rec, prec, where="post", lw=1.2, alpha=0.8 if oof.shape[0] == 1 else 0.6,
                color=st["color"], ls=st["ls"],
                label=f"repeat {r + 1}: AP {average_precision_score(y, p):.3f}")
        prevalence = y.mean()
    if prevalence is not None:
        ax.axhline(prevalence, color="grey", ls="--", lw=0.8, label=f"prevalence {prevalence:.2f}")
    ax.set_xlabel("recall (malignant)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "out-of-fold precision-recall", fontsize=9)
    legend_outside(ax)
    fig.tight_layout()
    return save_png(fig, path)
