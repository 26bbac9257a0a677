"""Ingest throughput against this machine's ceiling, measured in the same run.

Ceiling = cores x the single-core rate of the same work (decode + resize of the same files,
no storage). Ratio = ingest images/s / ceiling (target >= 0.8).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lymph.data.cache import ingest
from lymph.data.challenge import read_challenge
from lymph.data.images import UnreadableImage, decode_image


def single_core_decode_rate(paths: list[Path], size: int, crop: int | None = None) -> float:
    """Images/s of decode + resize in this process, over ``paths``."""
    t0 = time.perf_counter()
    for p in paths:
        try:
            decode_image(p, size, crop)
        except UnreadableImage:
            pass
    return len(paths) / (time.perf_counter() - t0)


def bench_ingest(data_dir: str | Path, *, size: int = 112, repeats: int = 3,
                 sample: int = 2000, workers: int | None = None) -> dict[str, Any]:
    """Median ingest rate over ``repeats`` full ingests, and its ratio to the ceiling."""
    cores = workers or os.cpu_count() or 1
    paths = read_challenge(data_dir).image_paths()
    step = max(1, len(paths) // sample)
    probe = paths[::step][:sample]
    single_core_decode_rate(probe[:50], size)  # warm the page cache and imports
    singles, rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            singles.append(single_core_decode_rate(probe, size))
            t0 = time.perf_counter()
            res = ingest(data_dir, Path(tmp) / f"c{r}.zarr", size=size, force=True, workers=cores)
            rates.append(res.n_images / (time.perf_counter() - t0))
    single = statistics.median(singles)
    rate = statistics.median(rates)
    return {
        "images": len(paths),
        "cores": cores,
        "single_core_images_per_s": round(single, 1),
        "ceiling_images_per_s": round(single * cores, 1),
        "ingest_images_per_s": round(rate, 1),
        "ratio_to_ceiling": round(rate / (single * cores), 3),
        "repeats": repeats,
    }
