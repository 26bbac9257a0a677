"""Write a cohort-scale format-1 store, for timing stage two (issue 17); not a test.

    python benchmarks/cohort_store.py --out /tmp/cohort.h5            # 10^4 patients, ~1.13 M cells
    lymph fit-head --store /tmp/cohort.h5 --folds 5 --jobs 2
    lymph compare-baselines --store /tmp/cohort.h5 --folds 5 --jobs 2

Patients get log-normal bag sizes (median ~90, mean ~113 cells, 1 to ~1,500), dim-60
features N(0, 1) in which a fraction of a malignant patient's cells are shifted by
``--signal`` along a random direction, and three clinical columns (one informative). The
same ``--seed`` gives the same file. Generated in blocks of patients, so memory stays near
the size of the embeddings (1.13 M x 60 float32 = 271 MB).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_cohort(n_patients: int = 10_000, cells: int = 1_130_000, dim: int = 60,
                signal: float = 0.6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=0.7, size=n_patients)
    sizes = np.maximum(1, np.round(raw / raw.sum() * cells)).astype(np.int64)
    sizes[np.argmax(sizes)] += cells - int(sizes.sum())  # exactly `cells` instances
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    labels = (rng.random(n_patients) < 0.4).astype(np.int8)
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    emb = np.empty((cells, dim), dtype=np.float32)
    block = 100_000
    for s in range(0, cells, block):  # blocks of instances, not a loop over patients
        e = min(cells, s + block)
        emb[s:e] = rng.standard_normal((e - s, dim), dtype=np.float32)
    bag = np.repeat(np.arange(n_patients), sizes)
    hit = (labels[bag] == 1) & (rng.random(cells) < 0.3)
    emb[hit] += signal * direction
    clinical = rng.normal(size=(n_patients, 3)).astype(np.float32)
    clinical[:, 0] += 0.5 * labels
    return {"embeddings": emb, "patient_ptr": ptr,
            "ids": [f"C{i:05d}" for i in range(n_patients)], "labels": labels,
            "clinical": clinical, "clinical_columns": ["age_z", "lab_a", "lab_b"],
            "provenance": {"method": "synthetic-cohort", "seed": seed, "signal": signal}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--cells", type=int, default=1_130_000)
    ap.add_argument("--dim", type=int, default=60)
    ap.add_argument("--signal", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from lymph.store import write_store

    t0 = time.perf_counter()
    d = make_cohort(a.patients, a.cells, a.dim, a.signal, a.seed)
    write_store(a.out, **d)
    print(f"wrote {a.out}: {a.patients} patients, {a.cells} cells, dim {a.dim} "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
