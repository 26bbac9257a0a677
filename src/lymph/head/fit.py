"""``lymph fit-head``: cross-validate a MIL head on a store, then fit and save a final model.

Outputs: the metrics object (also ``--json``), out-of-fold probabilities (CSV: ``id, label,
repeat, fold, probability, threshold, predicted``), a PR curve (PNG), and with ``out`` the
model directory (see :mod:`lymph.head.modeldir`), which also keeps those three files
under ``cv/``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import write_text_atomic
from lymph.errors import LymphError
from lymph.head.evaluate import METRICS, CVResult, cross_validate, make_folds, summarise
from lymph.head.registry import estimator_class, fusion_estimator


@dataclass
class FitHeadResult:
    report: dict[str, Any]  # the --json object
    cv: CVResult
    outputs: dict[str, Path]


def parse_threshold(value: str | float) -> str | float:
    if value == "inner":
        return "inner"
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise LymphError(f"threshold: expected 'inner' or a number in (0, 1), got {value!r}") from None
    if not 0.0 < t < 1.0:
        raise LymphError(f"threshold: expected 'inner' or a number in (0, 1), got {value!r}")
    return t


def parse_members(value: str | int) -> str | int:
    """``--members``: 'auto' or an integer >= 1."""
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise LymphError(f"members: expected 'auto' or an integer >= 1, got {value!r}") from None
    if k < 1:
        raise LymphError(f"members: expected 'auto' or an integer >= 1, got {value!r}")
    return k


def oof_csv(cv: CVResult) -> str:
    buf = io.StringIO()
    cols = ["id", "label", "repeat", "fold", "probability", "threshold", "predicted"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in cv.oof_rows():
        r = dict(r, probability=f"{r['probability']:.6f}", threshold=f"{r['threshold']:.6f}")
        w.writerow(r)
    return buf.getvalue()


def fit_head(store: str | os.PathLike[str] | Any, *, pooling: str = "attention", folds: int = 5,
             repeats: int = 1, seed: int = 0, out: str | os.PathLike[str] | None = None,
             json_path: str | os.PathLike[str] | None = None,
             oof_path: str | os.PathLike[str] | None = None,
             plot_path: str | os.PathLike[str] | None = None,
             progress: Any = None, fusion: str = "concat", fold_list: list[Any] | None = None,
             n_jobs: int = 1, allow_in_sample: bool = False, **params: Any) -> FitHeadResult:
    """Cross-validate ``MILClassifier(pooling=..., **params)`` and save the final model.

    ``store`` is a path or an open store. Defaults: the OOF CSV and PR curve go beside
    ``json_path`` (``X.oof.csv``, ``X.pr.png``), else into ``out/cv/``. A store whose
    labelled patients were scored in-sample by a label-trained encoder is refused unless
    ``allow_in_sample`` (then the report's ``in_sample`` says so; :mod:`lymph.insample`).
    """
    from lymph.head.estimator import MILClassifier
    from lymph.head.plots import pr_curve_png
    from lymph.store import open_store

    t_load = time.perf_counter()
    s = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    load_s = time.perf_counter() - t_load
    if out is not None:  # a model that could not predict from raw data says so now
        from lymph.head.modeldir import check_encoder_available

        check_encoder_available(s)
    if "threshold" in params:
        params["threshold"] = parse_threshold(params["threshold"])
    spec = fusion_estimator(fusion)  # head.registry: concat -> MILClassifier, late -> LateFusion
    if spec.name != "MILClassifier":  # e.g. late: pooled image score + clinical -> logistic
        proto: Any = estimator_class(spec.name)(seed=seed, threshold=params.get("threshold", "inner"))
    else:
        proto = MILClassifier(pooling=pooling, seed=seed, **params)
        proto._check_params()
    labelled = s.labelled()
    if labelled.size == 0:
        raise LymphError(f"{s.path}: /patients/label: no labelled patients (empty selection)")
    images = proto.images
    clinical = proto.clinical and len(s.clinical_columns) > 0
    if not images and not clinical:
        raise LymphError(f"{s.path}: /patients/clinical: no clinical columns, so `no_images` "
                         "leaves no input")
    from lymph.insample import check_in_sample

    in_sample = check_in_sample(s, allow=allow_in_sample, images=images)
    if fold_list is None:  # else given (the pipeline's holdout split, stage-one folds)
        fold_list = make_folds(s.labels, folds, repeats, seed)
    from sklearn.base import clone

    cv = cross_validate(lambda: clone(proto), s, fold_list, progress=progress, n_jobs=n_jobs)
    summary = summarise(cv)
    report: dict[str, Any] = {
        "pooling": pooling if images and fusion == "concat" else None,
        "model": {"late": "late-fusion", "composition": "composition+clinical"}.get(fusion)
        or _model_name(pooling, images, clinical),
        "fusion": fusion,
        "images": images, "clinical": clinical,
        "clinical_columns": list(s.clinical_columns) if clinical else [],
        "folds": folds, "repeats": repeats, "seed": seed,
        "n_patients": int(labelled.size),
        "n_malignant": int((s.labels[labelled] == 1).sum()),
        "n_instances": int(s.bag_sizes[labelled].sum()),
        "seconds": round(cv.seconds, 3),
        "seconds_load": round(load_s, 3),
        **summary,
        "threshold_rule": "inner: 0.5 unless the max-balanced-accuracy cut on inner "
        "out-of-fold probabilities beats it by 2 standard errors"
        if proto.threshold == "inner" else f"fixed {proto.threshold}",
        "threshold": {"mean": float(np.mean([f.threshold for f in cv.folds])),
                      "std": float(np.std([f.threshold for f in cv.folds]))},
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in proto.get_params().items()},
        "store": {"path": None if s.path is None else str(s.path), "fingerprint": s.fingerprint,
                  "method": (s.provenance or {}).get("method")},
        **({"in_sample": in_sample} if in_sample else {}),
        "per_fold": [{"repeat": f.repeat, "fold": f.fold, "threshold": f.threshold,
                      "seconds": round(f.seconds, 3), **f.info,
                      **{m: f.metrics[m] for m in METRICS}} for f in cv.folds],
    }
    outputs: dict[str, Path] = {}
    base = Path(json_path) if json_path is not None else None
    with tempfile.TemporaryDirectory(prefix="lymph-fit-head-") as td:
        tdp = Path(td)
        oof_file, png_file, metrics_file = tdp / "oof.csv", tdp / "pr.png", tdp / "metrics.json"
        oof_file.write_text(oof_csv(cv), encoding="utf-8")
        pr_curve_png(png_file, cv.labels, cv.oof,
                     title=f"{report['model']}: {folds}-fold x {repeats}, OOF")
        if oof_path is None and base is not None:
            oof_path = base.with_name(base.stem + ".oof.csv")
        if plot_path is None and base is not None:
            plot_path = base.with_name(base.stem + ".pr.png")
        if oof_path is not None:
            write_text_atomic(oof_path, oof_file.read_text(encoding="utf-8"))
            outputs["oof"] = Path(oof_path)
        if plot_path is not None:
            from lymph.atomic import write_bytes_atomic

            write_bytes_atomic(plot_path, png_file.read_bytes())
            outputs["plot"] = Path(plot_path)
        if out is not None:
            from lymph.head.modeldir import save_model

            t0 = time.perf_counter()
            final = clone(proto).fit(s.subset(labelled))
            report["seconds_final_fit"] = round(time.perf_counter() - t0, 3)
            report["final_threshold"] = float(final.threshold_)
            metrics_file.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            save_model(final, out, store=s, extra={"cv/metrics.json": metrics_file,
                                                   "cv/oof.csv": oof_file, "cv/pr.png": png_file})
            outputs["model"] = Path(out)
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
        outputs["json"] = Path(json_path)
    return FitHeadResult(report=report, cv=cv, outputs=outputs)


def _model_name(pooling: str, images: bool, clinical: bool) -> str:
    if not images:
        return "clinical-mlp"
    return f"{pooling}+clinical" if clinical else f"{pooling}-images-only"
