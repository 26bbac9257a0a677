"""Every figure of the clinical report, from the comparison's out-of-fold predictions.

    a = analyse(result, store, chosen="late-fusion", target=0.95)
    a["triage"]["late-fusion"]["target_sensitivity"]["avoided_per_100"]

The **chosen model** is the one the user will deploy: ``lymph run`` passes the model its
head stage fits (e.g. ``late-fusion``); otherwise it is the best model using images and
clinical data by mean balanced accuracy (the paired comparison's first model), or the best
model when there is none. The **clinical-only model** is the best clinical-only model by mean
balanced accuracy. The result is JSON-ready (``report.json``) apart from the keys starting
with ``_`` (arrays the renderers use).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lymph.errors import LymphError


def choose(result: Any, chosen: str | None) -> tuple[Any, Any, str]:
    """(chosen model, best clinical-only model or None, the rule that chose it)."""
    from lymph.compare_models import CLINICAL, IMAGES_CLINICAL

    ranked = result.ranked()
    clin = next((m for m in ranked if m.spec.inputs == CLINICAL), None)
    if chosen is not None:
        if chosen not in result.models:
            raise LymphError(f"chosen: {chosen!r} is not in this comparison (models: "
                             f"{', '.join(result.models)})")
        return result.models[chosen], clin, "the model the pipeline fits with its head settings"
    img = next((m for m in ranked if m.spec.inputs == IMAGES_CLINICAL), None)
    if img is not None:
        return img, clin, "the best images + clinical model by mean balanced accuracy"
    return ranked[0], clin, "the best model by mean balanced accuracy"


def _check_finite(m: Any) -> None:
    scored = m.cv.oof_fold >= 0
    if not np.all(np.isfinite(m.cv.oof[scored])):
        raise LymphError(f"{m.name}: non-finite out-of-fold probability; no report figures "
                         "are made from it")


def _fold_thresholds(cv: Any, thr: np.ndarray) -> list[dict[str, Any]]:
    return [{"repeat": f.repeat, "fold": f.fold,  # counted from 0, as in comparison.json
             "threshold": float(thr[f.repeat, f.test_rows[0]]) if len(f.test_rows) else None}
            for f in cv.folds]


def patients_table(store: Any, chosen: Any, triage_c: dict[str, Any],
                   predictions: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per store patient: the chosen model's repeat-1 out-of-fold probability and
    its decisions (labelled), or the final model's (unlabelled, from ``predictions``)."""
    from lymph.report.cohort import clinical_values
    from lymph.report.triage import TARGET

    cv = chosen.cv
    clin = clinical_values(store)
    final = {}
    if predictions:
        final = {str(i): (float(p), int(k)) for i, p, k in zip(
            predictions["ids"], predictions["probability"], predictions["predicted"])}
    t_target = triage_c["thresholds"][TARGET]
    rows = []
    for i, pid in enumerate(store.ids):
        pid = str(pid)
        lab = int(store.labels[i])
        r: dict[str, Any] = {"id": pid, "label": lab, "probability": None, "source": "",
                             "triage": None, "balanced": None, "correct": None,
                             "lymph_count": float(clin["lymph_count"][i]) if "lymph_count" in clin else None,
                             "age": float(clin["age"][i]) if "age" in clin else None,
                             "cells": int(store.bag_sizes[i])}
        if cv.oof_fold[0, i] >= 0:
            p = float(cv.oof[0, i])
            r.update(probability=p, source="out of fold",
                     triage=int(p >= t_target[0, i]), balanced=int(p >= cv.oof_threshold[0, i]))
            r["correct"] = int(r["triage"] == lab)
        elif pid in final:
            p, k = final[pid]
            r.update(probability=p, source="final model", balanced=k)
            if predictions and predictions.get("target_threshold") is not None:
                r["triage"] = int(p >= predictions["target_threshold"])
        rows.append(r)
    return rows


def analyse(result: Any, store: Any, *, chosen: str | None = None, target: float = 0.95,
            n_boot: int = 1000, predictions: dict[str, Any] | None = None) -> dict[str, Any]:
    """All report figures (see the module docstring)."""
    from lymph.report.calibration import calibration
    from lymph.report.cohort import cohort
    from lymph.report.decision import decision_curve
    from lymph.report.drivers import coefficient_table, measurement_table
    from lymph.report.triage import BALANCED, TARGET, check_target, triage
    from lymph.report.uncertainty import bootstrap, plain_sentence

    target = check_target(target)
    m_c, m_k, rule = choose(result, chosen)
    models = [m_c] + ([m_k] if m_k is not None and m_k is not m_c else [])
    for m in models:
        _check_finite(m)
    labels = np.asarray(m_c.cv.labels)
    scored0 = np.flatnonzero(m_c.cv.oof_fold[0] >= 0)
    tri = {m.name: triage(m.cv, target) for m in models}
    cal = {m.name: calibration(m.cv) for m in models}
    boot_in = {m.name: (m.cv.oof[:, scored0],
                        {op: t[:, scored0] for op, t in tri[m.name]["thresholds"].items()})
               for m in models}
    pair = (m_c.name, m_k.name) if len(models) == 2 else None
    unc = bootstrap(labels[scored0].astype(np.int64), boot_in, pair, n_boot=n_boot,
                    seed=result.seed)
    scored = m_c.cv.oof_fold >= 0
    curves = {m.name: m.cv.oof for m in models}
    curves[f"{m_c.name}, recalibrated in folds"] = cal[m_c.name]["recalibrated"]
    dc = decision_curve(labels, scored, curves)
    a: dict[str, Any] = {
        "chosen": m_c.name, "chosen_rule": rule, "chosen_inputs": m_c.spec.inputs,
        "clinical_only": None if m_k is None else m_k.name,
        "target_sensitivity": target,
        "folds": result.n_folds, "repeats": result.repeats, "seed": result.seed,
        "cohort": cohort(store),
        "triage": {n: {op: t[op] for op in (TARGET, BALANCED)} for n, t in tri.items()},
        "fold_thresholds": {n: {op: _fold_thresholds(result.models[n].cv, t["thresholds"][op])
                                for op in (TARGET, BALANCED)} for n, t in tri.items()},
        "uncertainty": unc,
        "calibration": {n: {k: v for k, v in c.items() if k != "recalibrated"}
                        for n, c in cal.items()},
        "decision_curve": dc,
        "drivers": {"model": m_c.name, "coefficients": coefficient_table(m_c.coefficients),
                    "measurements": measurement_table(store, scored0, m_c.cell_scores)},
        "patients": patients_table(store, m_c, tri[m_c.name], predictions),
        "_recalibrated": {n: c["recalibrated"] for n, c in cal.items()},
        "_labels": labels, "_scored0": scored0,
    }
    if pair is not None:
        a["sentence"] = plain_sentence(unc["difference"], m_c.spec.inputs != "clinical")
    else:
        a["sentence"] = "No clinical-only model in this comparison: no paired difference."
    if predictions:
        a["unlabelled_predictions"] = {k: predictions[k] for k in
                                       ("model", "threshold", "target_threshold", "n") if k in predictions}
    return a


def json_ready(a: dict[str, Any]) -> dict[str, Any]:
    """``a`` without the private arrays, NaN as null."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if not str(k).startswith("_")}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, (float, np.floating)):
            return float(v) if np.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v
    return clean(a)
