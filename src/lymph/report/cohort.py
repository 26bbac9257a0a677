"""The cohort: patients by class, images per patient, age and lymphocyte count by class.

Read from the embedding store (labels, bag sizes, clinical columns); ``log_lymph_count`` is
shown as the count (x10^9/L). Medians with the range (images) or the interquartile range
(age, count).
"""

from __future__ import annotations

from typing import Any

import numpy as np

GROUPS = (("reactive", 0), ("malignant", 1), ("unlabelled", -1))


def _stats(v: np.ndarray, spread: str) -> dict[str, float] | None:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = (v.min(), v.max()) if spread == "range" else np.percentile(v, [25, 75])
    return {"median": float(np.median(v)), "low": float(lo), "high": float(hi), "n": int(v.size)}


def clinical_values(store: Any) -> dict[str, np.ndarray]:
    """Readable clinical values by name: ``age``, ``lymph_count`` (from its log), ``male``."""
    out: dict[str, np.ndarray] = {}
    cols = list(store.clinical_columns)
    for j, c in enumerate(cols):
        v = np.asarray(store.clinical[:, j], dtype=np.float64)
        if c == "log_lymph_count":
            out["lymph_count"] = np.exp(v)
        elif c == "gender_male":
            out["male"] = v
        else:
            out[c] = v
    return out


def cohort(store: Any) -> dict[str, Any]:
    """Counts and per-class summaries (JSON-ready)."""
    labels = np.asarray(store.labels)
    sizes = np.asarray(store.bag_sizes, dtype=np.float64)
    clin = clinical_values(store)
    res: dict[str, Any] = {"n_patients": int(labels.size), "n_images": int(sizes.sum()),
                           "groups": {}}
    for name, lab in GROUPS:
        rows = labels == lab
        if not rows.any():
            continue
        g: dict[str, Any] = {"patients": int(rows.sum()), "images": _stats(sizes[rows], "range")}
        for key in ("age", "lymph_count"):
            if key in clin:
                g[key] = _stats(clin[key][rows], "iqr")
        if "male" in clin:
            g["male_fraction"] = float(np.mean(clin["male"][rows] >= 0.5))
        res["groups"][name] = g
    return res


def cohort_md(c: dict[str, Any]) -> str:
    def fmt(s: dict[str, float] | None, nd: int = 0) -> str:
        if s is None:
            return "–"
        return f"{s['median']:.{nd}f} ({s['low']:.{nd}f}–{s['high']:.{nd}f})"

    lines = [f"{c['n_patients']} patients, {c['n_images']} cell images.", "",
             ("| group | patients | images per patient, median (range) | age, median (IQR) | "
             "lymphocyte count x10^9/L, median (IQR) | male |"), "|---|---|---|---|---|---|"]
    for name, g in c["groups"].items():
        male = f"{100 * g['male_fraction']:.0f}%" if "male_fraction" in g else "–"
        lines.append(f"| {name} | {g['patients']} | {fmt(g['images'])} | {fmt(g.get('age'))} | "
                     f"{fmt(g.get('lymph_count'), 1)} | {male} |")
    return "\n".join(lines)
