"""cProfile of the MIL head's fit + predict on the first 3 of 10 folds of a store (after one
warm-up fit), with CPU seconds per fold; not a test.

    PYTHONPATH=src python benchmarks/head_profile.py ../shared/mil/musk2.h5
"""

import cProfile, pstats, sys, time
from lymph.head.estimator import MILClassifier
from lymph.head.evaluate import make_folds
from lymph.store import open_store
s = open_store(sys.argv[1])
folds = make_folds(s.labels, 10, 1, 0)[:3]
MILClassifier().fit(s.subset(folds[0][2]))  # warm-up (dynamo import etc.)
pr = cProfile.Profile(); c = time.process_time(); pr.enable()
for _, _, tr, te in folds:
    MILClassifier().fit(s.subset(tr)).predict_proba(s.subset(te))
pr.disable(); print("cpu/fold", (time.process_time() - c) / 3)
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
