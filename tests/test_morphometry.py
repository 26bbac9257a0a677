"""Morphometry (`lymph embed --method morphometry`): segmentation accuracy on drawn nuclei,
robustness, determinism and the store it writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lymph.data.synth import ATYPICAL_NUCLEUS, TYPICAL_NUCLEUS, draw_cell
from lymph.encoder.methods.morphometry import (MORPHOMETRY_COLUMNS, MORPHOMETRY_VERSION, cell_features,
                                       write_morphometry_store)

COL = {c: j for j, c in enumerate(MORPHOMETRY_COLUMNS)}


def disc_image(size: int, r_nucleus: float, r_cell: float = 0.3) -> np.ndarray:
    """A clean cell, (3, size, size) uint8: purple nucleus disc of radius ``r_nucleus * size``
    in a pale blue cytoplasm disc on a pink background, with two red blood cells."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    r = np.hypot(yy - size / 2, xx - size / 2)
    img = np.empty((size, size, 3))
    img[:] = (0.98, 0.89, 0.80)  # background
    for cy, cx in ((0.12, 0.15), (0.85, 0.8)):
        img[np.hypot(yy - cy * size, xx - cx * size) < 0.14 * size] = (0.75, 0.60, 0.66)
    img[r < r_cell * size] = (0.70, 0.72, 0.86)
    img[r < r_nucleus * size] = (0.35, 0.20, 0.55)
    return (img * 255).round().astype(np.uint8).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [64, 112, 224])
def test_measures_a_drawn_disc(size: int) -> None:
    f = cell_features(disc_image(size, 0.18)[None])[0]
    assert f[COL["nucleus_found"]] == 1
    assert f[COL["nucleus_area"]] == pytest.approx(np.pi * 0.18**2, rel=0.04)
    assert f[COL["nucleus_equiv_diameter"]] == pytest.approx(0.36, rel=0.02)
    assert f[COL["cell_area"]] == pytest.approx(np.pi * 0.3**2, rel=0.04)
    assert f[COL["nc_ratio"]] == pytest.approx((0.18 / 0.3) ** 2, rel=0.05)
    assert f[COL["nucleus_eccentricity"]] < 0.2 and f[COL["nucleus_solidity"]] > 0.93
    assert f[COL["nucleus_centre_offset"]] < 0.02


def test_measures_draw_cell_nucleus_within_its_radius_range() -> None:
    rng = np.random.default_rng(0)
    for atypical, base in ((False, TYPICAL_NUCLEUS), (True, ATYPICAL_NUCLEUS)):
        for _ in range(5):
            img = draw_cell(rng, 112, atypical).transpose(2, 0, 1)
            f = cell_features(img[None])[0]
            r = f[COL["nucleus_equiv_diameter"]] / 2
            # radius factor in [0.93, 1.07]; the atypical edge is wavy (+-12 %, mean radius ~ base)
            slack = 0.03 if not atypical else 0.05
            assert base * 0.93 * (1 - slack) <= r <= base * 1.07 * (1 + slack), (atypical, r)


def test_atypical_cells_have_larger_nuclei() -> None:
    rng = np.random.default_rng(1)
    imgs = np.stack([draw_cell(rng, 64, k % 2 == 1).transpose(2, 0, 1) for k in range(40)])
    f = cell_features(imgs)
    area = f[:, COL["nucleus_area"]]
    assert (f[:, COL["nucleus_found"]] == 1).all()
    assert area[1::2].min() > area[0::2].max()
    assert f[1::2, COL["nucleus_radial_cv"]].mean() > f[0::2, COL["nucleus_radial_cv"]].mean()


def test_blank_and_noise_images_are_finite() -> None:
    rng = np.random.default_rng(0)
    imgs = np.stack([
        np.zeros((3, 32, 32), np.uint8), np.full((3, 32, 32), 255, np.uint8),
        np.full((3, 32, 32), 180, np.uint8), rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),
    ])
    f = cell_features(imgs)
    assert f.shape == (4, len(MORPHOMETRY_COLUMNS)) and f.dtype == np.float32
    assert np.isfinite(f).all()
    assert (f[:3] == 0).all()  # nothing found: zeros, nucleus_found = 0
    assert cell_features(np.zeros((0, 3, 16, 16), np.uint8)).shape == (0, len(MORPHOMETRY_COLUMNS))


def test_deterministic_and_batch_independent() -> None:
    rng = np.random.default_rng(2)
    imgs = np.stack([draw_cell(rng, 48, k % 3 == 0).transpose(2, 0, 1) for k in range(6)])
    a = cell_features(imgs)
    assert np.array_equal(a, cell_features(imgs))
    assert np.array_equal(a[::-1], cell_features(imgs[::-1]))


def test_columns_are_named_and_unique() -> None:
    assert len(set(MORPHOMETRY_COLUMNS)) == len(MORPHOMETRY_COLUMNS)
    assert MORPHOMETRY_COLUMNS[0] == "nucleus_found"
    assert {"nucleus_area", "nucleus_perimeter", "nucleus_eccentricity", "nucleus_solidity",
            "nc_ratio", "nucleus_glcm_contrast"} <= set(MORPHOMETRY_COLUMNS)


def test_writes_a_valid_store(synth_cache: Path, tmp_path: Path) -> None:
    from lymph.data.cache import open_cache
    from lymph.store import open_store

    cache = open_cache(synth_cache)
    seen: list[int] = []
    p = write_morphometry_store(cache, tmp_path / "m.h5", workers=1,
                                progress=lambda done, total: seen.append(done))
    s = open_store(p)
    assert s.feature_columns == MORPHOMETRY_COLUMNS
    assert s.embeddings.shape == (cache.n_images, len(MORPHOMETRY_COLUMNS))
    assert np.isfinite(s.embeddings).all()
    assert s.embeddings[:, COL["nucleus_found"]].mean() > 0.9
    assert list(s.ids) == cache.ids and np.array_equal(s.patient_ptr, cache.patient_ptr)
    assert list(s.image_paths) == cache.paths
    clin, cols = cache.clinical()
    assert s.clinical_columns == cols and np.allclose(s.clinical, clin)
    prov = s.provenance
    assert prov["method"] == "morphometry" and prov["morphometry_version"] == MORPHOMETRY_VERSION
    assert prov["data_fingerprint"] == cache.fingerprint and prov["dim"] == len(MORPHOMETRY_COLUMNS)
    assert seen and seen[-1] == cache.n_images
    # all cores give the same bytes as one
    q = write_morphometry_store(cache, tmp_path / "m2.h5", workers=2)
    assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(q.read_bytes()).digest()


def test_many_chunks_in_parallel_match_serial(synth_cache: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import lymph.data.cache as cache_mod
    from lymph.encoder.methods.morphometry import compute_morphometry

    cache = cache_mod.open_cache(synth_cache)
    monkeypatch.setattr(cache_mod, "CHUNK", 16)  # several jobs, so the pool really runs
    serial = compute_morphometry(cache, workers=1)
    assert np.array_equal(compute_morphometry(cache, workers=2), serial)
