"""Re-score a weak store's cells with test-time dihedral averaging toggled, without retraining.

Issue 18 screening: a weak scorer's checkpoints do not change with ``tta`` (it only changes
how cells are scored), so the effect of averaging over the 8 rotations / flips is measured
on the same trained scorers. For every scorer of the store (fold scorers and the final one)
the raw cell logits are recomputed with ``tta`` on or off, recalibrated on that scorer's own
training cells (as :func:`lymph.encoder.weak_folds.calibrate` does), and the out-of-fold
patient ROC AUC is printed as JSON (:func:`lymph.encoder.weak_checks.oof_metrics`).

    python benchmarks/weak_rescore.py STORE.h5 CACHE.zarr --tta on
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("cache")
    ap.add_argument("--tta", choices=("on", "off"), required=True)
    a = ap.parse_args()

    from sklearn.linear_model import LogisticRegression

    from lymph.data.cache import open_cache
    from lymph.encoder import distributed as D
    from lymph.encoder.embed import compute_features, load_encoder
    from lymph.encoder.preprocess import Preprocess
    from lymph.encoder.weak_checks import oof_metrics
    from lymph.encoder.weak_folds import image_targets
    from lymph.store import open_store

    t0 = time.perf_counter()
    s = open_store(a.store)
    cache = open_cache(a.cache)
    wf = s.provenance["weak_folds"]
    pos = {str(i): k for k, i in enumerate(cache.ids)}
    labels = np.asarray(cache.labels)
    scorer = np.asarray(s.patient_scorer)
    env = D.setup("cpu")
    emb = np.zeros((cache.n_images, 2), np.float32)
    ptr = cache.patient_ptr
    try:
        entries = [(c["fold"], c["path"]) for c in wf["checkpoints"]] + [(-1, wf["final"]["path"])]
        for k, path in entries:
            ck, method, model = load_encoder(path, env.device, env)
            model.config.tta = a.tta == "on"
            model.cal_scale.fill_(1.0)
            model.cal_shift.fill_(0.0)
            norm = ck["normalisation"]
            prep = Preprocess(norm["mean"], norm["std"], env.device, channels_last=True)
            raw = compute_features(model, method, cache, prep, env, progress=False)
            train = np.array([pos[i] for i in ck["weak"]["train_ids"]])
            rows, targets = image_targets(ptr, labels, train)
            lr = LogisticRegression(C=1e4, max_iter=1000)
            lr.fit(raw[rows, :1].astype(np.float64), targets[rows, 0].astype(np.int64),
                   sample_weight=targets[rows, 1])
            logit = raw[:, 0] * float(lr.coef_[0, 0]) + float(lr.intercept_[0])
            mine = np.flatnonzero(scorer == k)
            for p in mine:  # the store's own assignment of patients to scorers
                emb[ptr[p] : ptr[p + 1], 0] = logit[ptr[p] : ptr[p + 1]]
    finally:
        D.teardown(env)
    emb[:, 1] = 1.0 / (1.0 + np.exp(-emb[:, 0]))
    out = oof_metrics(emb, ptr, labels, scorer)
    print(json.dumps({"store": a.store, "tta": a.tta, "seconds": round(time.perf_counter() - t0, 1),
                      "auc_mean_prob": out["auc_mean_prob"], "auc_mean_logit": out["auc_mean_logit"],
                      "per_fold": out["per_fold"]}, indent=1))


if __name__ == "__main__":
    main()
