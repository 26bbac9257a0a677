"""Screen weak cell-scorer variants (stage one only) by their out-of-fold patient ROC AUC.

Issue 18, fourth pass (``docs/results.md``): each variant trains the K fold scorers and the
final scorer of ``lymph embed --method weak`` on one image cache, with its own width,
epochs and learning-rate schedule, and writes its store to ``OUTDIR/<variant>.h5`` (the
store records the model and training settings, so ``compare-baselines --nested`` retrains
the same variant). One JSON line per variant: OOF patient ROC AUC of the mean cell
probability and logit, training seconds, images per second.

    python benchmarks/weak_screen.py CACHE.zarr OUTDIR --variant a --variant b
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = {  # name: (channels, epochs, lr schedule, target)
    "a": ((16, 32, 64, 64), 6, "constant", "label"),  # the current scorer
    "b": ((16, 32, 64, 64), 15, "cosine", "label"),
    "e": ((32, 64, 128, 128), 6, "constant", "label"),
    "f": ((32, 64, 128, 128), 15, "cosine", "label"),
    "r": ((16, 32, 64, 64), 6, "constant", "clinical-residual"),  # (a), cells weighted by
    # how wrong a clinical-only model is about their patient
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("outdir")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from lymph.data.cache import open_cache
    from lymph.encoder.methods.weak import WeakConfig
    from lymph.encoder.weak_folds import default_train_config, run_weak

    cache = open_cache(a.cache)
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for v in a.variant:
        channels, epochs, schedule, target = VARIANTS[v]
        tcfg = default_train_config(a.seed)
        tcfg.epochs, tcfg.lr_schedule = epochs, schedule
        t0 = time.perf_counter()
        w = run_weak(cache, out / f"{v}.h5", folds=5, seed=a.seed, config=tcfg,
                     model_config=WeakConfig(size=cache.size, channels=channels), progress=False,
                     target=target)
        print(json.dumps({"variant": v, "channels": list(channels), "epochs": epochs,
                          "lr_schedule": schedule, "target": target, "oof_auc_mean_prob": w.oof.get("auc_mean_prob"),
                          "oof_auc_mean_logit": w.oof.get("auc_mean_logit"),
                          "train_seconds": round(w.train_seconds, 1),
                          "images_per_s": round(w.images_per_s, 1),
                          "wall_seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
