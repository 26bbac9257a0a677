"""Merge the JSON rows of comparisons run in parts (`compare-baselines --json`, e.g. a nested
run split with `--from-repeat`) into the rows of one comparison.

Each model's per-fold results are joined (a (repeat, fold) pair may appear in one part
only; every part must have the same folds setting, seed and models) and its summary is
recomputed as `compare-baselines` computes it (mean and standard deviation, ddof 0, over
the finite per-fold values). Nested parts' stage-one seconds and scorer counts are summed.

    python benchmarks/merge_comparisons.py OUT.json PART1.json PART2.json ...
"""

from __future__ import annotations

import json
import sys

import numpy as np

METRICS = ("balanced_accuracy", "accuracy", "f1", "roc_auc", "pr_auc")


def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "std": float(v.std()) if v.size else float("nan")}


def merge(parts: list[list[dict]]) -> list[dict]:
    models = [{r["model"] for r in p} for p in parts]
    if any(m != models[0] for m in models):
        raise SystemExit("the parts have different models")
    out = []
    for name in sorted(models[0]):
        rows = [next(r for r in p if r["model"] == name) for p in parts]
        for key in ("folds", "seed", "n_patients", "inputs"):
            if len({json.dumps(r[key]) for r in rows}) != 1:
                raise SystemExit(f"{name}: the parts differ in {key!r}")
        per_fold = sorted((f for r in rows for f in r["per_fold"]),
                          key=lambda f: (f["repeat"], f["fold"]))
        keys = [(f["repeat"], f["fold"]) for f in per_fold]
        if len(set(keys)) != len(keys):
            raise SystemExit(f"{name}: a (repeat, fold) appears in two parts")
        row = dict(rows[0])
        row.update({m: _summary([f[m] for f in per_fold]) for m in METRICS})
        row["threshold"] = _summary([f["threshold"] for f in per_fold])
        row["repeats"] = len({f["repeat"] for f in per_fold})
        row["seconds"] = round(sum(r["seconds"] for r in rows), 3)
        row["per_fold"] = per_fold
        store = dict(rows[0]["store"])
        for key in ("stage_one_seconds", "scorers_trained"):
            if all(key in r["store"] for r in rows):
                store[key] = sum(r["store"][key] for r in rows)
        store["merged_from"] = [r["store"].get("from_repeat", 0) for r in rows]
        row["store"] = store
        out.append(row)
    return sorted(out, key=lambda r: -r["balanced_accuracy"]["mean"])


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    rows = merge([json.load(open(p)) for p in argv[1:]])
    with open(argv[0], "w") as f:
        json.dump(rows, f, indent=2)
    for r in rows:
        print(f"{r['model']:34s} {r['balanced_accuracy']['mean']:.3f} ± "
              f"{r['balanced_accuracy']['std']:.3f}  ROC AUC {r['roc_auc']['mean']:.3f} ± "
              f"{r['roc_auc']['std']:.3f}  ({len(r['per_fold'])} folds)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
