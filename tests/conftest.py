"""Shared fixtures: tiny synthetic datasets, caches and stores, and the real-data path.

Everything here is deterministic and small enough for a 2-core CI machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "dlmi"
REAL_DATA = Path(os.environ.get("LYMPH_REAL_DATA", REAL_DATA))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real challenge data (../shared/dlmi); tests that use it skip when absent."""
    if not (REAL_DATA / "trainset").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset: 16 labelled + 3 test patients, 4-9 images of 48 px."""
    from lymph.data.synth import SynthConfig, make_synthetic

    out = tmp_path_factory.mktemp("synth") / "data"
    return make_synthetic(out, SynthConfig(patients=16, test_patients=3, images_min=4,
                                           images_max=9, size=48, seed=3))


@pytest.fixture(scope="session")
def synth_cache(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image cache of ``synth_data`` at 32 px (single process)."""
    from lymph.data.cache import ingest

    out = tmp_path_factory.mktemp("cache") / "images.zarr"
    ingest(synth_data, out, size=32, workers=1)
    return out


def make_bags(n_patients: int = 40, dim: int = 8, sizes: tuple[int, int] = (3, 20),
              signal: float = 2.0, seed: int = 0, n_clinical: int = 3,
              shuffle_labels: bool = False) -> dict:
    """Arrays for ``lymph.store.write_store`` with a planted bag-level signal: in a
    malignant patient's bag some instances have feature 0 shifted by ``signal``."""
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n_patients)], dtype=np.int8)
    rng.shuffle(labels)
    sz = rng.integers(sizes[0], sizes[1] + 1, n_patients)
    ptr = np.concatenate([[0], np.cumsum(sz)]).astype(np.int64)
    emb = rng.normal(0, 1, (int(ptr[-1]), dim)).astype(np.float32)
    for i in range(n_patients):
        if labels[i] == 1:
            rows = np.arange(ptr[i], ptr[i + 1])
            hit = rows[rng.random(rows.size) < 0.5]
            if hit.size == 0:
                hit = rows[:1]
            emb[hit, 0] += signal
    clinical = rng.normal(0, 1, (n_patients, n_clinical)).astype(np.float32)
    if shuffle_labels:
        labels = rng.permutation(labels)
    return dict(
        embeddings=emb, patient_ptr=ptr, ids=[f"P{i}" for i in range(n_patients)],
        labels=labels, clinical=clinical,
        clinical_columns=[f"c{j}" for j in range(n_clinical)],
    )


@pytest.fixture
def bag_store(tmp_path: Path) -> Path:
    """A store with a planted bag-level image signal (40 patients, dim 8)."""
    from lymph.store import write_store

    return write_store(tmp_path / "bags.h5", **make_bags())
