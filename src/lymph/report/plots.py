"""ROC and precision-recall curves of every compared model (matplotlib, Agg backend).

Curves use the out-of-fold probabilities of the **first repeat** (each labelled patient
scored exactly once, by the fold model that did not see it). Averaging probabilities over
repeats would mix models of different folds into one score per patient; the spread over
repeats is in the table instead. The legend gives each model's AUC / average precision on
that repeat (the table's figures are means over folds, so they differ slightly).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lymph.figures import STYLES, legend_outside, new_figure, save_png

def _curves_png(path: Path, labels: np.ndarray, oof: dict[str, np.ndarray], kind: str,
                title: str) -> Path:
    from sklearn.metrics import (average_precision_score, precision_recall_curve,
                                 roc_auc_score, roc_curve)

    fig, ax = new_figure((8.2, 5.0), dpi=110)
    prevalence = None
    for k, (name, p_all) in enumerate(oof.items()):
        ok = np.isfinite(p_all) & (labels >= 0)
        y, p = labels[ok].astype(int), p_all[ok]
        if np.unique(y).size < 2:
            continue
        st = STYLES[k % len(STYLES)]
        style = {"color": st["color"], "lw": 1.4, "ls": st["ls"]}
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, p):.3f})", **style)
        else:
            prec, rec, _ = precision_recall_curve(y, p)
            ax.step(rec, prec, where="post", label=f"{name} ({average_precision_score(y, p):.3f})",
                    **style)
            prevalence = y.mean()
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
        ax.set_xlabel("false positive rate (reactive called malignant)")
        ax.set_ylabel("true positive rate (malignant)")
    else:
        if prevalence is not None:
            ax.axhline(prevalence, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("recall (malignant)")
        ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    legend_outside(ax, title="AUC" if kind == "roc" else "average precision")
    fig.tight_layout()
    save_png(fig, path)
    return path


def curves_png(out_dir: str | os.PathLike[str], result: Any) -> dict[str, Path]:
    """Write ``roc.png`` and ``pr.png`` for a :class:`~lymph.compare.ComparisonResult`."""
    out = Path(out_dir)
    labels = np.asarray(result.models[next(iter(result.models))].cv.labels)
    oof = {m.name: m.cv.oof[0] for m in result.ranked()}
    sub = f"{result.n_folds}-fold CV, out-of-fold, repeat 1 of {result.repeats}"
    return {
        "roc": _curves_png(out / "roc.png", labels, oof, "roc", f"ROC curves ({sub})"),
        "pr": _curves_png(out / "pr.png", labels, oof, "pr", f"Precision-recall curves ({sub})"),
    }
