"""The run report of ``lymph compare-baselines --out DIR`` (and of ``lymph run`` / ``demo``).

``DIR`` receives (each file written atomically; what each section means: docs/report.md):

- ``report.md``: summary (the triage trade with 95% intervals and one plain sentence on
  what images add), cohort, triage operating points, the paired difference chosen model
  minus clinical-only, calibration, decision curve, what drives the chosen model (all from
  :func:`lymph.report.analysis.analyse`), then the comparison table with ROC and PR curves,
  the per-fold paired comparison, and montages of the chosen model's out-of-fold errors;
- ``report.html`` and ``assets/``: the same report to browse, with the patient table and each
  patient's cells (:mod:`lymph.report.html`);
- ``report.json``: every figure of the report;
- ``roc.png``, ``pr.png`` (:mod:`lymph.report.plots`), ``trade.png`` (missed against
  avoided, per 100), ``reliability.png``, ``decision.png``;
- ``misclassified/ID.png``: each misclassified patient's highest- and lowest-weight cells;
- ``oof.csv``: ``model,id,label,repeat,fold,probability,threshold,predicted``;
- ``comparison.json``: settings, rows, paired comparisons, the folds' test patients.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import write_text_atomic
from lymph.report.montage import cell_weights

#: the model whose out-of-fold errors get montages (falls back to the best model with weights)
MONTAGE_MODEL = "attention+clinical"
MAX_MONTAGES = 24


def oof_csv(result: Any) -> str:
    buf = io.StringIO()
    cols = ["model", "id", "label", "repeat", "fold", "probability", "threshold", "predicted"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for m in result.models.values():
        for r in m.cv.oof_rows():
            w.writerow(dict(r, model=m.name, probability=f"{r['probability']:.6f}",
                            threshold=f"{r['threshold']:.6f}"))
    return buf.getvalue()


def _pm(d: dict[str, float]) -> str:
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def table_md(result: Any) -> str:
    lines = ["| model | inputs | balanced accuracy | F1 | ROC AUC | PR AUC | seconds |",
             "|---|---|---|---|---|---|---|"]
    for m in result.ranked():
        s = m.summary
        lines.append(f"| {m.name} | {m.spec.inputs} | {_pm(s['balanced_accuracy'])} | "
                     f"{_pm(s['f1'])} | {_pm(s['roc_auc'])} | {_pm(s['pr_auc'])} | "
                     f"{m.cv.seconds:.1f} |")
    return "\n".join(lines)


def _wtl(d: dict[str, Any]) -> str:
    return f"{d['won']} / {d['tied']} / {d['lost']}"


def paired_md(result: Any) -> str:
    if not result.paired:
        return "_No paired comparison (it needs a clinical-only and an images + clinical model)._"
    p = result.paired[0]
    out = [f"Best images + clinical model **{p['model']}** against the best clinical-only model "
           f"**{p['baseline']}**, on the same {len(p['per_fold'])} folds "
           f"(difference = {p['model']} - {p['baseline']}):", "",
           "| metric | mean difference | std | folds won / tied / lost |", "|---|---|---|---|"]
    for m in ("balanced_accuracy", "roc_auc"):
        d = p[m]
        out.append(f"| {m} | {d['mean_difference']:+.3f} | {d['std_difference']:.3f} | {_wtl(d)} |")
    out += ["", "Per fold:", "", "| repeat | fold | Δ balanced accuracy | Δ ROC AUC |",
            "|---|---|---|---|"]
    for f in p["per_fold"]:
        out.append(f"| {f['repeat'] + 1} | {f['fold'] + 1} | {f['balanced_accuracy']:+.3f} | "
                   f"{f['roc_auc']:+.3f} |")
    if len(result.paired) > 1:
        out += ["", f"Every other image model against {p['baseline']}:", "",
                "| model | Δ balanced accuracy (won / tied / lost) | Δ ROC AUC (won / tied / lost) |",
                "|---|---|---|"]
        for q in result.paired[1:]:
            b, r = q["balanced_accuracy"], q["roc_auc"]
            out.append(f"| {q['model']} | {b['mean_difference']:+.3f} ({_wtl(b)}) | "
                       f"{r['mean_difference']:+.3f} ({_wtl(r)}) |")
    return "\n".join(out)


def _montage_model(result: Any, chosen: str | None = None) -> Any:
    """The chosen model when it records cell weights, else :data:`MONTAGE_MODEL`, else the
    best model with weights."""
    if chosen is not None and chosen in result.models and cell_weights(result.models[chosen])[0]:
        return result.models[chosen]
    if MONTAGE_MODEL in result.models and result.models[MONTAGE_MODEL].attention:
        return result.models[MONTAGE_MODEL]
    for m in result.ranked():
        if m.attention and m.spec.pooling is not None:
            return m
    return None


def misclassified_md(result: Any, store: Any, out_dir: Path, cache: Any = None,
                     k: int = 6, chosen: str | None = None) -> tuple[str, list[Path]]:
    """Montages of the chosen model's out-of-fold errors (repeat 1, its balanced threshold)."""
    from lymph.errors import LymphError
    from lymph.report.montage import PixelSource, clinical_text, patient_montage, save_png

    m = _montage_model(result, chosen)
    if m is None:
        return "_No model with cell weights in this comparison: no montages._", []
    weights, wname = cell_weights(m)
    cv = m.cv
    scored = np.flatnonzero(cv.oof_fold[0] >= 0)
    pred = (cv.oof[0, scored] >= cv.oof_threshold[0, scored]).astype(int)
    wrong = scored[pred != cv.labels[scored]]
    if wrong.size == 0:
        return f"{m.name} misclassified no patient out of fold (repeat 1).", []
    # most confident errors first
    conf = np.abs(cv.oof[0, wrong] - cv.oof_threshold[0, wrong])
    wrong = wrong[np.argsort(-conf, kind="stable")]
    what = "cell score" if wname == "score" else "attention weight"
    lines = [f"Patients misclassified out of fold by **{m.name}** at its balanced threshold "
             f"(repeat 1): {wrong.size} of {scored.size}, most confident errors first. Each "
             f"montage shows the {k} cells with the highest and the {k} with the lowest {what} "
             "that the fold model (which did not see the patient) gave them.", ""]
    source = PixelSource(store, cache)
    paths: list[Path] = []
    for row in wrong[:MAX_MONTAGES]:
        pid = str(cv.ids[row])
        p, t, y = float(cv.oof[0, row]), float(cv.oof_threshold[0, row]), int(cv.labels[row])
        truth = "malignant" if y == 1 else "reactive"
        head = f"{pid}: {truth}, P(malignant) {p:.3f} at threshold {t:.3f}; {clinical_text(store, int(row))}"
        w = weights.get(pid)
        lines.append(f"### {pid}")
        lines.append("")
        lines.append(head)
        lines.append("")
        if w is None:
            lines += ["_(no cell weights recorded)_", ""]
            continue
        try:
            img = patient_montage(store, int(row), w, k=k, source=source,
                                  title=[head, f"model {m.name}, out of fold"], weight_name=wname)
        except LymphError as e:
            lines += [f"_(no montage: {e})_", ""]
            continue
        path = save_png(img, out_dir / "misclassified" / f"{pid}.png")
        paths.append(path)
        lines += [f"![{pid}](misclassified/{pid}.png)", ""]
    if wrong.size > MAX_MONTAGES:
        lines.append(f"({wrong.size - MAX_MONTAGES} more not shown.)")
    return "\n".join(lines), paths


def _figures(out: Path, a: dict[str, Any], result: Any) -> dict[str, Path]:
    """reliability.png and decision.png (repeat 1 / mean over repeats)."""
    from lymph.report.calibration import reliability_png
    from lymph.report.decision import decision_png

    y, rows = a["_labels"][a["_scored0"]].astype(int), a["_scored0"]
    curves = {}
    for n in a["calibration"]:
        curves[n] = result.models[n].cv.oof[0, rows]
    c = a["chosen"]
    curves[f"{c}, recalibrated in folds"] = a["_recalibrated"][c][0, rows]
    sub = f"{result.n_folds}-fold CV, out of fold"
    from lymph.report.triage import trade_png

    points = {n: {op: (t[op]["avoided_per_100"], t[op]["missed_per_100"]) for op in t}
              for n, t in a["triage"].items()}
    return {
        "trade": trade_png(out / "trade.png", y,
                           {n: result.models[n].cv.oof[0, rows] for n in a["triage"]}, points,
                           f"Missed against avoided as one threshold moves ({sub}, repeat 1 "
                           f"of {result.repeats})"),
        "reliability": reliability_png(out / "reliability.png", y, curves,
                                       f"Reliability diagram ({sub}, repeat 1 of {result.repeats}, "
                                       "10 bins of equal size)"),
        "decision": decision_png(out / "decision.png", a["decision_curve"],
                                 f"Decision curve ({sub}, mean over {result.repeats} repeat(s))"),
    }


def write_report(result: Any, store: Any, out_dir: str | os.PathLike[str], *, cache: Any = None,
                 k: int = 6, montages: bool = True, chosen: str | None = None,
                 target_sensitivity: float = 0.95, predictions: dict[str, Any] | None = None,
                 n_boot: int = 1000, html: bool = True) -> dict[str, Path]:
    """Write the report folder (see the module docstring); returns the files by name."""
    from lymph.report import clinical_md as cm
    from lymph.report.analysis import analyse, json_ready
    from lymph.report.cohort import cohort_md
    from lymph.report.plots import curves_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = analyse(result, store, chosen=chosen, target=target_sensitivity, n_boot=n_boot,
                predictions=predictions)
    chosen = a["chosen"]
    files: dict[str, Path] = dict(curves_png(out, result))
    files.update(_figures(out, a, result))
    files["oof"] = write_text_atomic(out / "oof.csv", oof_csv(result))
    files["comparison"] = write_text_atomic(
        out / "comparison.json", json.dumps(result.to_json(), indent=2, default=float) + "\n")
    files["report_json"] = write_text_atomic(
        out / "report.json", json.dumps(json_ready(a), indent=2) + "\n")
    if montages:
        mis_md, mis_paths = misclassified_md(result, store, out, cache, k, chosen=chosen)
    else:
        mis_md, mis_paths = "_Montages not requested._", []
    for p in mis_paths:
        files[f"montage:{p.stem}"] = p
    info = result.store_info
    sections = [
        ("Summary", cm.summary_md(a)),
        ("Cohort", cohort_md(a["cohort"])),
        ("Triage operating points", "![The trade: cytometries avoided against malignant "
                                    "cases missed](trade.png)\n\n" + cm.triage_md(a)),
        ("Images against clinical data alone", cm.difference_md(a)),
        ("Calibration", "![Reliability diagram](reliability.png)\n\n" + cm.calibration_md(a)),
        ("Clinical usefulness", "![Decision curve](decision.png)\n\n" + cm.decision_md(a)),
        ("What drives it", cm.drivers_md(a)),
    ]
    results_md = [
        "![ROC curves](roc.png) ![Precision-recall curves](pr.png)", "",
        "Curves: out-of-fold probabilities of repeat 1 of " f"{result.repeats} (legend: that "
        "repeat's AUC / average precision). Table: mean ± standard deviation over all folds; "
        "thresholds chosen inside each fold's training patients.", "", table_md(result)]
    if result.notes:
        results_md += ["", "Notes: " + "; ".join(result.notes) + "."]
    sections += [
        ("Results", "\n".join(results_md)),
        ("Paired comparison", paired_md(result)),
        ("Misclassified patients", mis_md),
        ("Files", "`report.html` (this report to browse, with the patient table and each "
                  "patient's cells), `report.json` (every figure of this report), `oof.csv` "
                  "(out-of-fold probabilities of every model; `repeat` and `fold` counted from "
                  "0 there, from 1 in this report), `comparison.json` (per-fold metrics, the "
                  "folds' test patients)."),
    ]
    intro = (f"Store `{info.get('path')}` (method {info.get('method')}, fingerprint "
             f"`{str(info.get('fingerprint'))[:12]}`), {result.n_patients} labelled patients, "
             f"{result.n_folds}-fold stratified CV x {result.repeats} repeat(s), seed "
             f"{result.seed}; every model on the same folds. What each section means: "
             "docs/report.md.")
    lines = ["# Triage report", "", intro, ""]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    files["report"] = write_text_atomic(out / "report.md", "\n".join(lines))
    if html:
        from lymph.report.html import write_html

        files.update(write_html(out, a, intro, sections, store, result, cache=cache,
                                predictions=predictions, pixels=montages))
    return files
