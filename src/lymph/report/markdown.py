"""The run report of ``lymph compare-baselines --out DIR``.

``DIR`` receives (each file written atomically):

- ``report.md``: opens with the ROC and PR curves, then the table (mean +- std over folds,
  sorted by balanced accuracy), the paired comparison against the best clinical-only model,
  and montages of the patients the attention model misclassified out of fold (repeat 1);
- ``roc.png``, ``pr.png`` (see :mod:`lymph.report.plots`);
- ``misclassified/ID.png``: each misclassified patient's highest- and lowest-attention cells;
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


def _montage_model(result: Any) -> Any:
    if MONTAGE_MODEL in result.models and result.models[MONTAGE_MODEL].attention:
        return result.models[MONTAGE_MODEL]
    for m in result.ranked():
        if m.attention and m.spec.pooling is not None:
            return m
    return None


def misclassified_md(result: Any, store: Any, out_dir: Path, cache: Any = None,
                     k: int = 6) -> tuple[str, list[Path]]:
    """Montages of the montage model's out-of-fold errors (repeat 1) and their section."""
    from lymph.errors import LymphError
    from lymph.report.montage import PixelSource, clinical_text, patient_montage, save_png

    m = _montage_model(result)
    if m is None:
        return "_No attention model in this comparison: no montages._", []
    cv = m.cv
    scored = np.flatnonzero(cv.oof_fold[0] >= 0)
    pred = (cv.oof[0, scored] >= cv.oof_threshold[0, scored]).astype(int)
    wrong = scored[pred != cv.labels[scored]]
    if wrong.size == 0:
        return f"{m.name} misclassified no patient out of fold (repeat 1).", []
    # most confident errors first
    conf = np.abs(cv.oof[0, wrong] - cv.oof_threshold[0, wrong])
    wrong = wrong[np.argsort(-conf, kind="stable")]
    lines = [f"Patients misclassified out of fold by **{m.name}** (repeat 1): {wrong.size} of "
             f"{scored.size}, most confident errors first. Each montage shows the {k} cells with "
             f"the highest and the {k} with the lowest attention weight that the fold model "
             "(which did not see the patient) gave them.", ""]
    source = PixelSource(store, cache)
    paths: list[Path] = []
    for row in wrong[:MAX_MONTAGES]:
        pid = str(cv.ids[row])
        p, t, y = float(cv.oof[0, row]), float(cv.oof_threshold[0, row]), int(cv.labels[row])
        truth = "malignant" if y == 1 else "reactive"
        head = f"{pid}: {truth}, P(malignant) {p:.3f} at threshold {t:.3f}; {clinical_text(store, int(row))}"
        w = m.attention.get(pid)
        lines.append(f"### {pid}")
        lines.append("")
        lines.append(head)
        lines.append("")
        if w is None:
            lines += ["_(no attention weights recorded)_", ""]
            continue
        try:
            img = patient_montage(store, int(row), w, k=k, source=source,
                                  title=[head, f"model {m.name}, out of fold"], weight_name="w")
        except LymphError as e:
            lines += [f"_(no montage: {e})_", ""]
            continue
        path = save_png(img, out_dir / "misclassified" / f"{pid}.png")
        paths.append(path)
        lines += [f"![{pid}](misclassified/{pid}.png)", ""]
    if wrong.size > MAX_MONTAGES:
        lines.append(f"({wrong.size - MAX_MONTAGES} more not shown.)")
    return "\n".join(lines), paths


def write_report(result: Any, store: Any, out_dir: str | os.PathLike[str], *, cache: Any = None,
                 k: int = 6, montages: bool = True) -> dict[str, Path]:
    """Write the report folder (see the module docstring); returns the files by name."""
    from lymph.report.plots import curves_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = dict(curves_png(out, result))
    files["oof"] = write_text_atomic(out / "oof.csv", oof_csv(result))
    files["comparison"] = write_text_atomic(
        out / "comparison.json", json.dumps(result.to_json(), indent=2, default=float) + "\n")
    if montages:
        mis_md, mis_paths = misclassified_md(result, store, out, cache, k)
    else:
        mis_md, mis_paths = "_Montages not requested._", []
    for p in mis_paths:
        files[f"montage:{p.stem}"] = p
    info = result.store_info
    head = [
        "# Model comparison",
        "",
        f"Store `{info.get('path')}` (method {info.get('method')}, fingerprint "
        f"`{str(info.get('fingerprint'))[:12]}`), {result.n_patients} labelled patients, "
        f"{result.n_folds}-fold stratified CV x {result.repeats} repeat(s), seed {result.seed}; "
        "every model on the same folds.",
        "",
        "![ROC curves](roc.png) ![Precision-recall curves](pr.png)",
        "",
        "Curves: out-of-fold probabilities of repeat 1 (legend: that repeat's AUC / average "
        "precision). Table: mean ± standard deviation over all folds; thresholds chosen inside "
        "each fold's training patients.",
        "",
        "## Results",
        "",
        table_md(result),
        "",
    ]
    if result.notes:
        head += ["Notes: " + "; ".join(result.notes) + ".", ""]
    body = ["## Paired comparison", "", paired_md(result), "",
            "## Misclassified patients", "", mis_md, "",
            "## Files", "",
            "`oof.csv` (out-of-fold probabilities of every model), `comparison.json` (all "
            "figures, per-fold metrics, the folds' test patients).", ""]
    files["report"] = write_text_atomic(out / "report.md", "\n".join(head + body))
    return files
