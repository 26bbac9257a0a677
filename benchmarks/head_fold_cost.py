"""CPU and wall time per fold of the MIL head on a store, in one process (issue 17); not a test.

    PYTHONPATH=src python benchmarks/head_fold_cost.py ../shared/mil/musk1.h5 --folds 10 --save p.npy

Fits ``MILClassifier(pooling=...)`` (the fit-head default) on the first ``--limit`` of the
stratified ``--folds`` folds (seed 0) and predicts each test fold; prints CPU seconds
(``time.process_time``, the stable figure on a shared machine) and wall seconds per fold.
``--save`` writes the concatenated test probabilities, to check that a change keeps
results identical (``numpy.array_equal`` of two runs' files). Point ``PYTHONPATH`` at
another checkout's ``src`` to time that version of the code on the same folds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--pooling", default="attention")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="only the first N folds")
    ap.add_argument("--save", default=None, help="test probabilities (.npy)")
    a = ap.parse_args()

    from lymph.head.estimator import MILClassifier
    from lymph.head.evaluate import make_folds  # also where 75754b3 has it
    from lymph.store import open_store

    s = open_store(a.store)
    folds = make_folds(s.labels, a.folds, 1, 0)[: a.limit]
    probs = []
    t, c = time.perf_counter(), time.process_time()
    for _, _, tr, te in folds:
        m = MILClassifier(pooling=a.pooling).fit(s.subset(tr))
        probs.append(m.predict_proba(s.subset(te))[:, 1])
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    n = len(folds)
    print(f"{a.store}: {n} folds, CPU {cpu:.2f} s ({cpu / n:.3f} s/fold), "
          f"wall {wall:.2f} s ({wall / n:.3f} s/fold)")
    if a.save:
        np.save(a.save, np.concatenate(probs))


if __name__ == "__main__":
    main()
