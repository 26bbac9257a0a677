"""``lymph explain PATIENT_ID --model MODEL_DIR (--store STORE.h5 | --data DATA_DIR)``.

One PNG: the patient's ``k`` cells with the highest and the ``k`` with the lowest attention
weight (each captioned with its weight), under a title with the predicted probability, the
model's threshold, the decision, the label when known and the clinical values.

- MIL models (``fit-head``): the pooling's instance weights (attention, gated, mean, max).
- Late fusion (``fit-head --fusion late``): the cells' image scores (cell logit or learned
  projection, the quantity the bag score pools), labelled ``score``.
- Named feature columns (a morphometry store): each top cell also gets the measurements
  that deviate most from the training instances (z-score against the model's instance
  scaler, which was fitted on the training patients' cells), e.g. ``nucleus_area +2.7``.

With ``--data`` the challenge folder is embedded first, the way the model's training store
was made: with the encoder copy in the model directory, or, for a morphometry model, by
ingesting at the store's image size and measuring (every patient of the folder is
processed; the files go to a temporary folder beside ``out``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymph.errors import LymphError

#: columns never reported as deviations (flags, not measurements)
_SKIP_COLUMNS = {"nucleus_found"}


@dataclass
class Explanation:
    patient: str
    probability: float
    threshold: float
    predicted: int
    label: int
    weight_name: str
    weights: np.ndarray  # one per cell, store order
    top: list[int]  # cell indices (within the patient), highest weight first
    bottom: list[int]
    deviations: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    clinical: str = ""
    out: Path | None = None


def deviations(x: np.ndarray, scaler: Any, columns: list[str], n: int = 3
               ) -> list[list[tuple[str, float]]]:
    """For each row of ``x`` the ``n`` columns with the largest |z| against ``scaler``."""
    z = (np.asarray(x, dtype=np.float64) - scaler.mean) / scaler.std
    keep = np.array([c not in _SKIP_COLUMNS for c in columns])
    z = np.where(keep[None, :], z, 0.0)
    order = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :n]
    return [[(columns[j], float(z[i, j])) for j in order[i]] for i in range(z.shape[0])]


def _named(columns: list[str] | None) -> bool:
    """Feature columns that name measurements (not ``0, 1, ...`` / ``ae:0``)."""
    if not columns:
        return False
    return sum(not c.split(":")[-1].isdigit() for c in columns) > len(columns) // 2


def store_from_data(saved: Any, data: Path, work_dir: Path) -> tuple[Path, Path | None]:
    """Embed ``data`` the way the model's store was made; returns (store, image cache)."""
    from lymph.head.predict import embed_like_model

    store_path = work_dir / "explain.store.h5"
    return store_path, embed_like_model(saved, data, store_path, work_dir)


def explain(patient_id: str, model_dir: str | os.PathLike[str], *,
            store: str | os.PathLike[str] | None = None,
            data: str | os.PathLike[str] | None = None,
            out: str | os.PathLike[str] | None = None, k: int = 8,
            cache: str | os.PathLike[str] | None = None) -> Explanation:
    """Write the explanation montage of one patient (see the module docstring)."""
    from lymph.head.modeldir import load_model

    if (store is None) == (data is None):
        raise LymphError("explain: expected exactly one of `store` and `data`")
    if k < 1:
        raise LymphError(f"k: expected at least 1, got {k}")
    saved = load_model(model_dir)
    out_p = Path(out) if out is not None else Path(f"{patient_id}.explain.png")
    if data is not None:
        from lymph.atomic import temp_dir  # removed on exit; a killed run's, by the next

        with temp_dir(out_p.parent, "explain") as wd:
            sp, cp = store_from_data(saved, Path(data), wd)
            return _explain(patient_id, saved, sp, cp, out_p, k)
    return _explain(patient_id, saved, Path(store), None if cache is None else Path(cache),  # type: ignore[arg-type]
                    out_p, k)


def _explain(patient_id: str, saved: Any, store_path: Path, cache_path: Path | None,
             out: Path, k: int) -> Explanation:
    from lymph.data.cache import open_cache
    from lymph.head.predict import check_encoder
    from lymph.report.montage import PixelSource, clinical_text, patient_montage, save_png
    from lymph.store import open_store

    s = open_store(store_path)
    check_encoder(saved, s)
    row = s.index_of(str(patient_id))
    sub = s.subset([row])
    est = saved.estimator
    if not getattr(est, "images", True):
        raise LymphError(f"{saved.path}: a clinical-only model has no per-cell weights to "
                         "explain (use a model with images)")
    if s.bag_sizes[row] == 0:
        raise LymphError(f"{store_path}: patient {patient_id} has no images")
    p = float(est.predict_proba(sub)[0, 1])
    t = float(est.threshold_)
    if hasattr(est, "cell_scores"):
        w, wname = np.asarray(est.cell_scores(sub)[0], dtype=np.float64), "score"
    else:
        w, wname = np.asarray(est.attention(sub)[0], dtype=np.float64), "w"
    from lymph.report.montage import top_bottom

    top, bottom = top_bottom(w, k)
    devs: dict[int, list[tuple[str, float]]] = {}
    scaler = getattr(est, "instance_scaler_", None)
    if scaler is not None and _named(s.feature_columns):
        bag = s.bag(row)
        for j, d in zip(top, deviations(bag[top], scaler, list(s.feature_columns or []))):
            devs[int(j)] = d
    label = int(s.labels[row])
    decision = "malignant" if p >= t else "reactive"
    known = {1: "malignant", 0: "reactive"}.get(label, "unknown")
    clin = clinical_text(s, row)
    pooling = getattr(est, "pooling", None)
    kind = type(est).__name__ + (f", {pooling} pooling" if pooling and hasattr(est, "model_") else "")
    title = [f"{patient_id}: P(malignant) {p:.3f}, threshold {t:.3f} -> {decision} "
             f"(label: {known}); {s.bag_sizes[row]} cells",
             clin, f"model {saved.path.name} ({kind}); cells ordered by "
                   + ("attention weight" if wname == "w" else "image score")]
    notes = {j: "most deviant vs training cells (z): " + ", ".join(f"{c} {z:+.1f}" for c, z in d)
             for j, d in devs.items()}
    source = PixelSource(s, open_cache(cache_path) if cache_path is not None else None)
    img = patient_montage(s, row, w, k=k, source=source, title=title, notes=notes,
                          weight_name=wname)
    save_png(img, out)
    return Explanation(patient=str(patient_id), probability=p, threshold=t,
                       predicted=int(p >= t), label=label, weight_name=wname, weights=w,
                       top=[int(j) for j in top], bottom=[int(j) for j in bottom],
                       deviations=devs, clinical=clin, out=out)
