"""Decision curve (Vickers and Elkin 2006): net benefit over threshold probabilities.

"Treat" here means *send to flow cytometry*. At a threshold probability ``pt`` (the risk of
malignancy above which a clinician would send the patient), a strategy's net benefit is

    net benefit = TP / n - FP / n * pt / (1 - pt)

the malignant patients correctly sent, less the reactive patients sent needlessly, weighted
by the harm ratio the threshold implies. Strategies: each model (send when its out-of-fold
P(malignant) >= pt), treat-all (send everyone) and treat-none (net benefit 0). The counts
are taken for all thresholds at once (a test checks them against
``sklearn.metrics.confusion_matrix``); per repeat, averaged over repeats.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lymph.figures import STYLES, legend_outside, new_figure, save_png


#: threshold probabilities of the curve
THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


def net_benefit(y: np.ndarray, p: np.ndarray, pts: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Net benefit of ``p >= pt`` for each ``pt``."""
    y = np.asarray(y, dtype=np.int64)
    pts = np.asarray(pts, dtype=np.float64)
    sent = np.asarray(p)[None, :] >= pts[:, None]  # (thresholds, patients)
    tp, fp = (sent & (y == 1)).sum(axis=1), (sent & (y == 0)).sum(axis=1)
    return tp / y.size - fp / y.size * pts / (1 - pts)


def decision_curve(y_all: np.ndarray, scored: np.ndarray, oof: dict[str, np.ndarray],
                   pts: np.ndarray = THRESHOLDS) -> dict[str, Any]:
    """``{"thresholds": [...], "treat_all": [...], "treat_none": [...], "models": {name: [...]}}``
    for the models' ``(repeats, n)`` out-of-fold probabilities; ``scored`` ``(repeats, n)``."""
    prev = float(np.mean(y_all[scored[0]]))
    res: dict[str, Any] = {"thresholds": [float(t) for t in pts],
                           "treat_all": [float(prev - (1 - prev) * t / (1 - t)) for t in pts],
                           "treat_none": [0.0] * len(pts), "models": {}}
    for name, P in oof.items():
        per = [net_benefit(y_all[scored[r]], P[r, scored[r]], pts) for r in range(P.shape[0])]
        res["models"][name] = [float(v) for v in np.mean(per, axis=0)]
    return res


def decision_png(path: str | os.PathLike[str], dc: dict[str, Any], title: str) -> Path:

    path = Path(path)
    pts = np.asarray(dc["thresholds"])
    fig, ax = new_figure((7.6, 4.6), dpi=110)
    for k, (name, nb) in enumerate(dc["models"].items()):
        st = STYLES[k % len(STYLES)]
        ax.plot(pts, nb, color=st["color"], ls=st["ls"], lw=1.6, label=name)
    ax.plot(pts, dc["treat_all"], color="black", ls="--", lw=0.9, label="cytometry for all")
    ax.plot(pts, dc["treat_none"], color="grey", ls=":", lw=0.9, label="cytometry for none")
    top = max(dc["treat_all"][0], max((max(v) for v in dc["models"].values()), default=0.0))
    ax.set_ylim(-0.05, top + 0.05)
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold probability of malignancy for sending to cytometry")
    ax.set_ylabel("net benefit")
    ax.set_title(title, fontsize=9)
    legend_outside(ax)
    fig.tight_layout()
    save_png(fig, path)
    return path
