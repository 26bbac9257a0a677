"""The clinical sections of ``report.md`` (and of ``report.html``), from
:func:`lymph.report.analysis.analyse`: summary sentence, cohort, triage operating points with
intervals, the paired difference, calibration, decision curve, what drives the model.
Every function returns Markdown; the HTML renderer converts the same text."""

from __future__ import annotations

from typing import Any

import numpy as np

from lymph.report.triage import BALANCED, TARGET

OP_TITLE = {TARGET: "target sensitivity", BALANCED: "balanced"}
RATE_TITLE = {"sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV",
              "npv": "NPV", "balanced_accuracy": "balanced accuracy"}


def _iv(d: dict[str, Any] | None, pct: bool = False, signed: bool = False) -> str:
    if d is None or d.get("estimate") is None:
        return "–"
    e, lo, hi = d["estimate"], d["low"], d["high"]
    if not np.isfinite(e):
        return "–"
    f = "{:+.1f}" if signed and pct else "{:.1f}" if pct else "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(e)} ({f.format(lo)} to {f.format(hi)})"


def _lohi(d: dict[str, Any], pct: bool = False) -> str:
    f = "{:.1f}" if pct else "{:.3f}"
    if d.get("low") is None:
        return "–"
    return f"{f.format(d['low'])} to {f.format(d['high'])}"


def summary_md(a: dict[str, Any]) -> str:
    c = a["chosen"]
    t, b = a["triage"][c][TARGET], a["triage"][c][BALANCED]
    iv = a["uncertainty"]["models"][c]
    pct = round(100 * a["target_sensitivity"])
    versus = (f"compared with the best clinical-only model **{a['clinical_only']}**"
              if a["clinical_only"] else "no clinical-only model in this comparison")
    lines = [
        f"**Chosen model: {c}**, {a['chosen_rule']}; {versus}.", "",
        (f"At a threshold set for {pct}% sensitivity (chosen inside each training fold), out of "
        f"fold, per 100 patients: **{t['avoided_per_100']:.0f} cytometries avoided** "
        f"(95% interval {_lohi(iv[TARGET + '.avoided_per_100'], pct=True)}), "
        f"**{t['missed_per_100']:.1f} malignant cases missed** (95% interval "
        f"{_lohi(iv[TARGET + '.missed_per_100'], pct=True)}); achieved "
        f"sensitivity {_iv(iv[TARGET + '.sensitivity'])}. The trade: at the model's balanced "
        f"threshold, {b['avoided_per_100']:.0f} cytometries avoided but "
        f"{b['missed_per_100']:.1f} malignant cases missed per 100 patients."), "",
        a["sentence"], "",
        (f"Intervals: {a['uncertainty']['method']} ({a['uncertainty']['n_boot']} samples of the "
        f"{a['uncertainty']['n_patients']} patients; thresholds kept as the folds chose them)."),
    ]
    return "\n".join(lines)


def triage_md(a: dict[str, Any]) -> str:
    pct = round(100 * a["target_sensitivity"])
    names = list(a["triage"])
    out = [(f"Two thresholds, each chosen inside every training fold and applied to that fold's "
           f"unseen patients: **target sensitivity** (the highest threshold reaching {pct}% "
           "sensitivity on the training patients' out-of-fold probabilities, set halfway to "
           "the next lower score; "
           "`--target-sensitivity`) and **balanced** (the model's own threshold, maximum "
           "balanced accuracy on its inner validation split). Figures: out of fold, mean over "
           f"{a['repeats']} repeat(s), 95% interval in brackets. The figure shows the whole "
           "trade: each line moves one threshold over all patients; the marks are the two "
           "operating points (a threshold per fold, so a mark can sit off its line)."), "",
           "| figure | " + " | ".join(f"{n}: {OP_TITLE[op]}" for n in names for op in (TARGET, BALANCED)) + " |",
           "|---|" + "---|" * (2 * len(names))]
    unc = a["uncertainty"]["models"]
    rows = [(RATE_TITLE[k], k, False) for k in RATE_TITLE] + [
        ("cytometries avoided per 100 patients", "avoided_per_100", True),
        ("malignant cases missed per 100 patients", "missed_per_100", True)]
    for title, key, pct_fmt in rows:
        cells = [_iv(unc[n][f"{op}.{key}"], pct=pct_fmt) for n in names for op in (TARGET, BALANCED)]
        out.append(f"| {title} | " + " | ".join(cells) + " |")
    thr = [f"{a['triage'][n][op]['threshold_mean']:.3f}" for n in names for op in (TARGET, BALANCED)]
    out.append("| threshold (mean over folds) | " + " | ".join(thr) + " |")
    out += ["", "Confusion matrices (repeat 1, in patients):", "",
            ("| model, threshold | reactive, no cytometry | reactive, sent to cytometry | "
            "malignant, no cytometry (missed) | malignant, sent to cytometry |"),
            "|---|---|---|---|---|"]
    for n in names:
        for op in (TARGET, BALANCED):
            c = a["triage"][n][op]["confusion_repeat_1"]
            out.append(f"| {n}, {OP_TITLE[op]} | {c['tn']} | {c['fp']} | {c['fn']} | {c['tp']} |")
    return "\n".join(out)


def difference_md(a: dict[str, Any]) -> str:
    d = a["uncertainty"].get("difference")
    if not d:
        return "_No clinical-only model: no paired difference._"
    f = d["figures"]
    out = [(f"Paired difference **{d['model']} minus {d['baseline']}** on the same patients and "
           "folds (same bootstrap samples for both, 95% interval):"), "",
           "| figure | difference (95% interval) |", "|---|---|"]
    for key, title, pct in (("roc_auc", "ROC AUC", False), ("brier", "Brier score (lower is better)", False),
                            (f"{TARGET}.sensitivity", "sensitivity at target", False),
                            (f"{TARGET}.specificity", "specificity at target", False),
                            (f"{TARGET}.avoided_per_100", "cytometries avoided per 100 at target", True),
                            (f"{TARGET}.missed_per_100", "malignant missed per 100 at target", True),
                            (f"{BALANCED}.balanced_accuracy", "balanced accuracy at balanced threshold", False)):
        out.append(f"| {title} | {_iv(f[key], pct=pct, signed=True)} |")
    out += ["", a["sentence"]]
    return "\n".join(out)


def calibration_md(a: dict[str, Any]) -> str:
    out = [("| model | Brier before | Brier after | slope before | slope after | intercept before | "
           "intercept after |"), "|---|---|---|---|---|---|---|"]
    for n, c in a["calibration"].items():
        b, f = c["before"], c["after"]
        out.append(f"| {n} | {b['brier']:.3f} | {f['brier']:.3f} | {b['slope']:.2f} | "
                   f"{f['slope']:.2f} | {b['intercept']:+.2f} | {f['intercept']:+.2f} |")
    notes = []
    for n, c in a["calibration"].items():
        notes.append(f"{n}: the probabilities are {'**off**' if c['off'] else 'acceptably calibrated'}"
                     f" (slope {c['before']['slope']:.2f}, intercept {c['before']['intercept']:+.2f})")
    out += ["", "; ".join(notes) + ". \"After\": Platt scaling (logistic regression on the "
            "logit of the probability) fitted on each training fold's out-of-fold probabilities, "
            "applied to the fold's unseen patients. Ideal: slope 1, intercept 0; the Brier score "
            "is the mean squared error of the probability (lower is better)."]
    return "\n".join(out)


def decision_md(a: dict[str, Any]) -> str:
    dc = a["decision_curve"]
    pts = dc["thresholds"]
    pick = [j for j, t in enumerate(pts) if round(t, 2) in (0.05, 0.1, 0.2, 0.3, 0.5)]
    names = list(dc["models"])
    out = ["Net benefit (per patient) at some threshold probabilities:", "",
           "| threshold probability | " + " | ".join(names) + " | cytometry for all | for none |",
           "|---|" + "---|" * (len(names) + 2)]
    for j in pick:
        out.append(f"| {pts[j]:.2f} | " + " | ".join(f"{dc['models'][n][j]:.3f}" for n in names)
                   + f" | {dc['treat_all'][j]:.3f} | 0 |")
    return "\n".join(out)


def drivers_md(a: dict[str, Any]) -> str:
    from lymph.report.drivers import coefficients_md, measurements_md

    d = a["drivers"]
    return coefficients_md(d["coefficients"], d["model"]) + "\n\n" + measurements_md(d["measurements"])


def terminal_summary(report_json: Any) -> list[str]:
    """The report's answer in two lines for the terminal, from ``report.json`` (a path);
    empty when the file is missing (a report written by an older version)."""
    import json
    from pathlib import Path

    path = Path(report_json)
    if not path.is_file():
        return []
    a = json.loads(path.read_text(encoding="utf-8"))
    c = a["chosen"]
    t = a["triage"][c][TARGET]
    iv = a["uncertainty"]["models"][c]
    pct = round(100 * a["target_sensitivity"])
    return [(f"triage ({c}, threshold for {pct}% sensitivity chosen in the training folds): per "
            f"100 patients {t['avoided_per_100']:.0f} cytometries avoided (95% interval "
            f"{_lohi(iv[TARGET + '.avoided_per_100'], pct=True)}), {t['missed_per_100']:.1f} "
            f"malignant missed ({_lohi(iv[TARGET + '.missed_per_100'], pct=True)})"),
            a["sentence"]]
