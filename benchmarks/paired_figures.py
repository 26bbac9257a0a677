"""Paired figures of a comparison JSON (`compare-baselines --json`, nested or not).

Every images model minus the best clinical-only model (the clinical-only row with the
highest mean balanced accuracy), per fold, with the corrected 95 % interval of
:func:`lymph.intervals.corrected_interval` (test/train 1/4 for 5 folds); and, for the
``MODEL@fold-mean`` rows of a nested run, fold-mean minus final scorer. Writes the figures
as JSON and prints a table::

    python benchmarks/paired_figures.py weak-nested-5x5.json weak-nested-5x5-paired.json

With ``--against OLD.json`` (a comparison on the same folds, e.g. another stage one), each
model present in both is also compared with its own row of ``OLD.json`` (``MODEL - old``)::

    python benchmarks/paired_figures.py new.json new-paired.json --against old.json
"""

from __future__ import annotations

import json
import sys

import numpy as np

from lymph.intervals import corrected_interval

METRICS = ("balanced_accuracy", "roc_auc")


def _per_fold(row: dict, metric: str) -> np.ndarray:
    return np.array([f[metric] for f in row["per_fold"]], dtype=np.float64)


def paired_figures(rows: list[dict], test_over_train: float = 0.25) -> dict:
    by = {r["model"]: r for r in rows}
    clin = [m for m, r in by.items() if r["inputs"] == "clinical" and "@" not in m]
    best = max(clin, key=lambda m: by[m]["balanced_accuracy"]["mean"])
    out: dict = {"best_clinical_only": best}
    for m, r in by.items():
        pairs = []
        if r["inputs"] != "clinical":
            pairs.append(best)
        if m.endswith("@fold-mean") and m[: -len("@fold-mean")] in by:
            pairs.append(m[: -len("@fold-mean")])
        for ref in pairs:
            for k in METRICS:
                out[f"{m} - {ref} {k}"] = _paired(r, by[ref], k, test_over_train)
    return out


def _paired(row: dict, ref: dict, metric: str, test_over_train: float) -> dict:
    d = _per_fold(row, metric) - _per_fold(ref, metric)
    lo, hi = corrected_interval(d, test_over_train)
    return {"mean": float(d.mean()), "ci95_corrected": [lo, hi],
            "won_tied_lost": [int((d > 1e-12).sum()), int((abs(d) <= 1e-12).sum()),
                              int((d < -1e-12).sum())]}


def paired_against(rows: list[dict], old: list[dict], test_over_train: float = 0.25) -> dict:
    """Each model of ``rows`` minus the same model of ``old``, per fold (same folds)."""
    before = {r["model"]: r for r in old}
    out: dict = {}
    for r in rows:
        o = before.get(r["model"])
        if o is None:
            continue
        if [(f["repeat"], f["fold"]) for f in r["per_fold"]] != \
                [(f["repeat"], f["fold"]) for f in o["per_fold"]]:
            raise SystemExit(f"{r['model']}: the two comparisons have different folds")
        for k in METRICS:
            out[f"{r['model']} - old {k}"] = _paired(r, o, k, test_over_train)
    return out


def main(argv: list[str]) -> int:
    against = None
    if "--against" in argv:
        i = argv.index("--against")
        against, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    rows = json.load(open(argv[0]))
    out = paired_figures(rows)
    if against is not None:
        out["against"] = {"path": against, **paired_against(rows, json.load(open(against)))}
        for key, o in out["against"].items():
            if key != "path":
                print(f"{key:52s} {o['mean']:+.3f} [{o['ci95_corrected'][0]:+.3f}, "
                      f"{o['ci95_corrected'][1]:+.3f}] {tuple(o['won_tied_lost'])}")
    with open(argv[1], "w") as f:
        json.dump(out, f, indent=1)
    best = out["best_clinical_only"]
    for r in sorted(rows, key=lambda r: -r["balanced_accuracy"]["mean"]):
        m, line = r["model"], ""
        key = f"{r['model']} - {best} balanced_accuracy"
        if key in out:
            o, a = out[key], out[f"{m} - {best} roc_auc"]
            line = (f"  vs {best}: BA {o['mean']:+.3f} [{o['ci95_corrected'][0]:+.3f}, "
                    f"{o['ci95_corrected'][1]:+.3f}] {tuple(o['won_tied_lost'])}, ROC AUC "
                    f"{a['mean']:+.3f} [{a['ci95_corrected'][0]:+.3f}, {a['ci95_corrected'][1]:+.3f}]")
        print(f"{m:34s} {r['balanced_accuracy']['mean']:.3f} ± {r['balanced_accuracy']['std']:.3f}"
              f"  ROC AUC {r['roc_auc']['mean']:.3f}{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
