"""`lymph bench`: this machine's ceilings and the tool's rates, measured in one run.

| rate | ceiling it is compared with |
|---|---|
| ingest images/s (all cores) | cores x the single-core decode + resize rate of the same files |
| stage-one training images/s | fp32 matmul GFLOP/s of the device / training FLOPs per image (and, when training in bf16, the bf16 matmul ceiling too) |
| stage-one step time fed from the cache | the same steps fed from tensors in memory |
| stage-one embedding images/s | (reported) |
| fit-head 5-fold attention seconds | the same model trained one bag per step (reference MIL code) |

Without ``--data`` the figures are taken on a synthetic set made for the purpose.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _fmt(x: float, unit: str = "") -> str:
    return f"{x:,.1f}{unit}" if x < 100 else f"{x:,.0f}{unit}"


def run_bench(data: str | Path | None = None, *, device: str = "auto", quick: bool = False,
              workdir: str | Path | None = None,
              on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure everything; returns ``{"rows": [...], "ingest": {...}, "stage_one": {...},
    "fit_head": {...}}`` (rows are display strings, the rest raw numbers). ``on_step(what)``
    is called as each measurement starts (so a long bench is never silent)."""
    from lymph.data.bench import bench_ingest

    say = on_step or (lambda what: None)
    from lymph.data.cache import ingest, open_cache

    with tempfile.TemporaryDirectory(prefix="lymph-bench-", dir=workdir) as td:
        tmp = Path(td)
        if data is None:
            from lymph.data.synth import SynthConfig, make_synthetic

            data = make_synthetic(tmp / "synth", SynthConfig(
                patients=40, test_patients=0, images_min=30 if quick else 40,
                images_max=60 if quick else 90, size=224, seed=0))
        say("ingest: decoding rate and its ceiling")
        ing = bench_ingest(data, size=112, repeats=1 if quick else 5)
        cache = open_cache(ingest(data, tmp / "bench.zarr", size=112).path)

        from lymph.encoder.bench import bench_stage_one

        say("stage one: training and embedding rates, matmul ceiling")
        s1 = bench_stage_one(cache, device=device, steps=10 if quick else 40,
                             repeats=1 if quick else 3, embed_images=512 if quick else 2048)

        from lymph.head.bench import bench_fit_head
        from lymph.store import open_store

        say("fit-head: vectorised head against the batch-1 reference")
        store_path = _quick_store(cache, tmp / "bench.h5")
        fh = bench_fit_head(open_store(store_path), repeats=1 if quick else 3,
                            reference=True)
    rows = [
        {"figure": "ingest (images/s)", "value": _fmt(ing["ingest_images_per_s"]),
         "ceiling": _fmt(ing["ceiling_images_per_s"]),
         "ratio": f"{ing['ratio_to_ceiling']:.2f}", "target": ">= 0.8"},
        {"figure": f"stage-one training (images/s, {s1['precision']}, {s1['device']}) "
                   "vs fp32 matmul",
         "value": _fmt(s1["train_images_per_s"]),
         "ceiling": _fmt(s1["matmul_gflops_fp32"] / s1["train_gflop_per_image"]),
         "ratio": f"{s1['fraction_of_fp32_ceiling']:.2f}", "target": ">= 0.4"},
        {"figure": "stage-one step fed from cache vs memory (s)",
         "value": f"{s1['step_s_cache']:.4f}", "ceiling": f"{s1['step_s_memory']:.4f}",
         "ratio": f"{s1['feed_efficiency']:.2f}", "target": ">= 0.9"},
        {"figure": "stage-one embedding (images/s)", "value": _fmt(s1["embed_images_per_s"])},
        {"figure": f"fit-head {fh['folds']}-fold attention (s)",
         "value": f"{fh['vectorised_seconds']:.2f}",
         "ceiling": f"{fh.get('reference_seconds', float('nan')):.2f} (batch-1 reference)",
         "ratio": f"{fh.get('speedup', float('nan')):.1f}x", "target": ">= 10x"},
    ]
    if s1["precision"] != "fp32":  # the ceiling of the dtype the convolutions run in
        rows.insert(2, {
            "figure": f"  same, vs {s1['precision']} matmul",
            "value": _fmt(s1["train_images_per_s"]),
            "ceiling": _fmt(s1["matmul_gflops_train_dtype"] / s1["train_gflop_per_image"]),
            "ratio": f"{s1['fraction_of_train_dtype_ceiling']:.2f}"})
    return {"rows": rows, "ingest": ing, "stage_one": s1, "fit_head": fh,
            "data": str(data) if data is not None else "synthetic"}


def _quick_store(cache: Any, out: Path) -> Path:
    """A store for the fit-head figure: a 1-epoch autoencoder is enough to time the head."""
    from lymph.encoder.run import run_embed

    run_embed(out=out, images=cache.path, method="ae", dim=60, epochs=1, progress=False)
    return out
