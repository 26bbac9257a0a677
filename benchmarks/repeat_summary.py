"""Summary of repeated k-fold runs (`fit-head --json` or `compare-baselines --json`), as
the MIL literature reports them: the mean over repeats of each repeat's k-fold mean, with
the standard deviation and standard error over repeats, and the mean time per fold.

Each ``NAME=FILE`` is one run (a `fit-head` JSON, or the one row of a `compare-baselines`
JSON). With ``--paired A,B`` the per-fold difference ``A - B`` (same folds: same seed,
folds and repeats) gets the corrected 95 % interval of
:func:`lymph.intervals.corrected_interval` (test/train ``1 / (k - 1)``)::

    python benchmarks/repeat_summary.py ens=m1x5.json one=m1x5-one.json \\
        forest=m1x5-forest.json --paired ens,one --json m1x5-summary.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from lymph.intervals import corrected_interval

METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def load_row(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    if isinstance(d, list):  # compare-baselines: a list of model rows
        if len(d) != 1:
            raise SystemExit(f"{path}: expected one model row, got {len(d)}")
        d = d[0]
    return d


def per_fold(row: dict, metric: str) -> np.ndarray:
    return np.array([f[metric] for f in row["per_fold"]], dtype=np.float64)


def summarise(row: dict) -> dict:
    reps = np.array([f["repeat"] for f in row["per_fold"]])
    out: dict = {"folds": row["folds"], "repeats": row["repeats"],
                 "seconds_per_fold": float(np.mean([f["seconds"] for f in row["per_fold"]]))}
    for m in METRICS:
        v = per_fold(row, m)
        means = np.array([v[reps == r].mean() for r in np.unique(reps)])
        out[m] = {"mean": float(means.mean()), "sd_over_repeats": float(means.std(ddof=1)),
                  "se_over_repeats": float(means.std(ddof=1) / np.sqrt(means.size)),
                  "repeat_means": means.tolist()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=FILE")
    ap.add_argument("--paired", action="append", default=[], help="A,B: A - B per fold")
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args()
    rows = {}
    for item in a.runs:
        name, _, path = item.partition("=")
        rows[name] = load_row(path)
    out: dict = {"runs": {n: summarise(r) for n, r in rows.items()}, "paired": {}}
    print(f"{'run':<10} {'accuracy':>22} {'ROC AUC':>22} {'s/fold':>7}")
    for n, s in out["runs"].items():
        acc, auc = s["accuracy"], s["roc_auc"]
        print(f"{n:<10} {acc['mean']:.3f} ± {acc['se_over_repeats']:.3f} (sd {acc['sd_over_repeats']:.3f})"
              f" {auc['mean']:.3f} ± {auc['se_over_repeats']:.3f} (sd {auc['sd_over_repeats']:.3f})"
              f" {s['seconds_per_fold']:7.2f}")
    for pair in a.paired:
        x, y = pair.split(",")
        rx, ry = rows[x], rows[y]
        key = [(f["repeat"], f["fold"]) for f in rx["per_fold"]]
        if key != [(f["repeat"], f["fold"]) for f in ry["per_fold"]] or rx["seed"] != ry["seed"]:
            raise SystemExit(f"{pair}: not the same folds")
        res = {}
        for m in METRICS:
            d = per_fold(rx, m) - per_fold(ry, m)
            lo, hi = corrected_interval(d, 1.0 / (rx["folds"] - 1))
            res[m] = {"mean": float(d.mean()), "ci95": [lo, hi]}
            print(f"{x} - {y} {m}: {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out["paired"][f"{x}-{y}"] = res
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
