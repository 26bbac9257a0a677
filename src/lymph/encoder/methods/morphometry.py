"""Morphometry: interpretable hand-crafted features of each cell (``lymph embed --method
morphometry``). No training; deterministic; runs on all cores.

Per image (``docs/morphometry.md`` lists every column):

1. Nucleus: the stain score ``s = (B - R) + (255 - G)`` (binned in integer steps of 2) is
   high on the dark purple nucleus, middling on the pale blue cytoplasm and on red blood
   cells, low on the background. A three-class multi-Otsu threshold of ``s`` splits off
   the nucleus (its upper threshold); of the connected components above it we keep the
   one closest to the image centre (components under ``MIN_COMPONENT`` of the image are
   ignored) and fill its holes.
2. Cell (nucleus + cytoplasm): pixels of the middle class within ``CYTO_REACH`` of the
   nucleus that are bluer (``B - R``) than this image's red blood cells (the median of the
   middle class far from the nucleus) by ``CYTO_MARGIN``, plus the nucleus; the component
   that holds the nucleus, holes filled.
3. Shape, colour (RGB and HED stain space) and grey-level co-occurrence texture of the
   nucleus; colour of the cytoplasm ring. Areas are fractions of the image area and
   lengths fractions of the image side, so caches at different sizes are comparable.

An image where no nucleus is found gives zeros with ``nucleus_found = 0``; every value is
finite.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lymph.data.cache import ImageCache

log = logging.getLogger("lymph")

MORPHOMETRY_VERSION = "1"

SCORE_BINS = 384  # the stain score binned by 2 (0..255 channel scale)
MIN_COMPONENT = 0.002  # nucleus components smaller than this fraction of the image are noise
CYTO_MARGIN = 10.0  # cytoplasm: B - R (0..255) this much above the image's red blood cells
CYTO_REACH = 0.2  # cytoplasm lies within this fraction of the side from the nucleus
CYTO_REF_DEFAULT = -20.0  # B - R of red blood cells when an image shows too few of them
GLCM_LEVELS = 32  # grey levels of the co-occurrence matrix (fixed range 0..255)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)

_SHAPE = [
    "nucleus_found",            # 1 if a nucleus was segmented, else 0 (and the rest 0)
    "nucleus_area",             # fraction of the image area
    "nucleus_perimeter",        # fraction of the image side
    "nucleus_equiv_diameter",   # diameter of the disc of equal area, fraction of the side
    "nucleus_major_axis",       # fraction of the side
    "nucleus_minor_axis",       # fraction of the side
    "nucleus_eccentricity",     # 0 = circle, -> 1 elongated
    "nucleus_solidity",         # area / convex hull area
    "nucleus_circularity",      # 4 pi area / perimeter^2 (1 = disc)
    "nucleus_radial_cv",        # std / mean of the boundary's distance to the centroid
    "nucleus_centre_offset",    # centroid distance to the image centre, fraction of the side
    "cell_area",                # nucleus + cytoplasm, fraction of the image area
    "cell_equiv_diameter",
    "cell_solidity",
    "nc_ratio",                 # nucleus area / cell area
]
_NUC_COLOUR = [
    "nucleus_r_mean", "nucleus_g_mean", "nucleus_b_mean",
    "nucleus_r_std", "nucleus_g_std", "nucleus_b_std",
    "nucleus_hema_mean", "nucleus_hema_std", "nucleus_eosin_mean",
]
_TEXTURE = ["nucleus_glcm_contrast", "nucleus_glcm_homogeneity", "nucleus_glcm_energy",
            "nucleus_glcm_correlation"]
_CYTO = [
    "cyto_r_mean", "cyto_g_mean", "cyto_b_mean", "cyto_blueness",  # blueness: mean (B - R)
    "cyto_hema_mean",
]

MORPHOMETRY_COLUMNS: list[str] = _SHAPE + _NUC_COLOUR + _TEXTURE + _CYTO
_COL = {c: j for j, c in enumerate(MORPHOMETRY_COLUMNS)}


# ---- one image -----------------------------------------------------------------------------
def _score(rgb: np.ndarray) -> np.ndarray:
    """Stain score of a float (3, s, s) image on 0..255, binned to integers 0..383:
    ``((B - R) + (255 - G) + 255) // 2``. High on the nucleus, low on the background."""
    return ((rgb[2] - rgb[0] + 510.0 - rgb[1]) // 2).astype(np.int32)


def _thresholds(score: np.ndarray) -> np.ndarray | None:
    """Three-class multi-Otsu on the integer score: classes are ``<= t[0]``,
    ``(t[0], t[1]]`` and ``> t[1]`` exactly (no bin-centre ambiguity)."""
    from skimage.filters import threshold_multiotsu

    hist = np.bincount(score.ravel(), minlength=SCORE_BINS)
    if np.count_nonzero(hist) < 3:
        return None  # a blank (or two-colour) image: nothing to split
    return np.asarray(threshold_multiotsu(hist=hist, classes=3))


def _nucleus_mask(rgb: np.ndarray, score: np.ndarray, t_nucleus: float) -> np.ndarray | None:
    """Boolean (s, s) mask of the nucleus nearest the centre, holes filled, or None."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(score > t_nucleus)
    if n == 0:
        return None
    size = rgb.shape[1]
    areas = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    yy, xx = np.indices(lab.shape)
    dist = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    # distance of each component's nearest pixel to the centre
    near = np.asarray(ndi.minimum(dist, lab, index=np.arange(1, n + 1)))
    ok = areas >= max(1.0, MIN_COMPONENT * size * size)
    if not ok.any():
        return None
    near = np.where(ok, near, np.inf)
    # closest to the centre; ties (several covering it) go to the larger one
    keep = int(np.lexsort((-areas, near))[0]) + 1
    return np.asarray(ndi.binary_fill_holes(lab == keep))


def _cell_mask(rgb: np.ndarray, score: np.ndarray, t: np.ndarray,
               nucleus: np.ndarray) -> np.ndarray:
    """Nucleus plus cytoplasm: non-background pixels near the nucleus that are bluer
    (B - R) than this image's red blood cells by ``CYTO_MARGIN``."""
    from scipy import ndimage as ndi

    size = rgb.shape[1]
    blue = rgb[2] - rgb[0]
    away = ndi.distance_transform_edt(~nucleus)
    mid = (score > t[0]) & (score <= t[1]) & ~nucleus  # not background, not another nucleus
    ref_px = blue[mid & (away > CYTO_REACH * size)]  # red blood cells, mostly
    ref = float(np.median(ref_px)) if ref_px.size >= 20 else CYTO_REF_DEFAULT
    mask = (mid & (blue > ref + CYTO_MARGIN) & (away <= CYTO_REACH * size)) | nucleus
    lab, _ = ndi.label(mask)
    keep = np.bincount(lab[nucleus]).argmax()
    return np.asarray(ndi.binary_fill_holes(lab == keep))


def _glcm(grey: np.ndarray, mask: np.ndarray, distance: int) -> np.ndarray:
    """Contrast, homogeneity, energy, correlation of the nucleus (pairs inside it only)."""
    from skimage.feature import graycomatrix, graycoprops

    q = (grey.astype(np.int32) * GLCM_LEVELS // 256 + 1).astype(np.uint8)
    q[~mask] = 0
    m = graycomatrix(q, [distance], GLCM_ANGLES, levels=GLCM_LEVELS + 1, symmetric=True)
    m = m[1:, 1:].astype(np.float64)  # drop pairs touching the outside
    tot = m.sum(axis=(0, 1), keepdims=True)
    if not (tot > 0).all():
        return np.zeros(4)
    m /= tot
    out = np.array([graycoprops(m, p).mean() for p in ("contrast", "homogeneity", "energy",
                                                         "correlation")])
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _one(img: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed
    from skimage.measure import find_contours, regionprops

    f = np.zeros(len(MORPHOMETRY_COLUMNS), dtype=np.float64)
    rgb = img.astype(np.float32)
    size = img.shape[1]
    score = _score(rgb)
    t = _thresholds(score)
    nuc = None if t is None else _nucleus_mask(rgb, score, float(t[1]))
    if nuc is None or not nuc.any():
        return f
    cell = _cell_mask(rgb, score, t, nuc)
    area_img = float(size * size)
    p = regionprops(nuc.astype(np.uint8))[0]
    pc = regionprops(cell.astype(np.uint8))[0]
    f[_COL["nucleus_found"]] = 1.0
    f[_COL["nucleus_area"]] = p.area / area_img
    f[_COL["nucleus_perimeter"]] = p.perimeter / size
    f[_COL["nucleus_equiv_diameter"]] = p.equivalent_diameter_area / size
    f[_COL["nucleus_major_axis"]] = p.axis_major_length / size
    f[_COL["nucleus_minor_axis"]] = p.axis_minor_length / size
    f[_COL["nucleus_eccentricity"]] = p.eccentricity
    f[_COL["nucleus_solidity"]] = p.solidity
    f[_COL["nucleus_circularity"]] = (
        min(4 * np.pi * p.area / p.perimeter**2, 1.5) if p.perimeter > 0 else 0.0
    )
    cy, cx = p.centroid
    contours = find_contours(np.pad(nuc, 1).astype(np.float32), 0.5)
    if contours:
        c = max(contours, key=len) - 1
        rad = np.hypot(c[:, 0] - cy, c[:, 1] - cx)
        f[_COL["nucleus_radial_cv"]] = rad.std() / rad.mean() if rad.mean() > 0 else 0.0
    f[_COL["nucleus_centre_offset"]] = np.hypot(cy - (size - 1) / 2, cx - (size - 1) / 2) / size
    f[_COL["cell_area"]] = pc.area / area_img
    f[_COL["cell_equiv_diameter"]] = pc.equivalent_diameter_area / size
    f[_COL["cell_solidity"]] = pc.solidity
    f[_COL["nc_ratio"]] = p.area / pc.area

    px = rgb[:, nuc] / 255.0  # (3, n_nucleus)
    hed = rgb2hed(np.moveaxis(img, 0, -1))  # (s, s, 3): haematoxylin, eosin, DAB
    j = _COL["nucleus_r_mean"]
    f[j : j + 3] = px.mean(axis=1)
    f[j + 3 : j + 6] = px.std(axis=1)
    f[_COL["nucleus_hema_mean"]] = hed[..., 0][nuc].mean()
    f[_COL["nucleus_hema_std"]] = hed[..., 0][nuc].std()
    f[_COL["nucleus_eosin_mean"]] = hed[..., 1][nuc].mean()
    grey = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]).clip(0, 255)
    f[_COL["nucleus_glcm_contrast"] : _COL["nucleus_glcm_correlation"] + 1] = _glcm(
        grey, nuc, max(1, round(size / 112))
    )
    cyto = cell & ~nuc
    if cyto.any():
        cp = rgb[:, cyto] / 255.0
        j = _COL["cyto_r_mean"]
        f[j : j + 3] = cp.mean(axis=1)
        f[_COL["cyto_blueness"]] = (cp[2] - cp[0]).mean()
        f[_COL["cyto_hema_mean"]] = hed[..., 0][cyto].mean()
    return np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)


def cell_features(pixels: np.ndarray) -> np.ndarray:
    """Morphometric features of a batch: uint8 ``(n, 3, s, s)`` RGB -> float32 ``(n, F)``,
    columns :data:`MORPHOMETRY_COLUMNS`."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
        from lymph.errors import LymphError

        raise LymphError(
            f"cell_features: expected uint8 (n, 3, s, s), got {pixels.dtype} {pixels.shape}"
        )
    out = np.zeros((pixels.shape[0], len(MORPHOMETRY_COLUMNS)), dtype=np.float32)
    for i in range(pixels.shape[0]):
        out[i] = _one(pixels[i])
    return out


# ---- the whole cache -----------------------------------------------------------------------
def _chunk(args: tuple[str, int, int]) -> tuple[int, np.ndarray]:
    import zarr

    arr_path, start, stop = args
    px = np.asarray(zarr.open_array(arr_path, mode="r")[start:stop])
    return start, cell_features(px)


def morphometry_config() -> dict[str, Any]:
    """The settings that fix the features (recorded in the store's provenance)."""
    return {
        "min_component": MIN_COMPONENT, "cyto_margin": CYTO_MARGIN,
        "cyto_reach": CYTO_REACH, "cyto_ref_default": CYTO_REF_DEFAULT,
        "glcm_levels": GLCM_LEVELS, "glcm_angles": len(GLCM_ANGLES), "score_bins": SCORE_BINS,
        "nucleus_threshold": "multiotsu3((B-R+510-G)//2)[1]",
    }


def compute_morphometry(
    cache: ImageCache,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Features of every image of ``cache``: float32 ``(n_images, F)``, on all cores."""
    from lymph.data.cache import CHUNK
    from lymph.data.workers import chunk_results

    n = cache.n_images
    arr_path = str(Path(cache.path) / "pixels")
    jobs = [(arr_path, s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    feats = np.zeros((n, len(MORPHOMETRY_COLUMNS)), dtype=np.float32)
    workers = workers or os.cpu_count() or 1
    done = 0
    with chunk_results(_chunk, jobs, workers) as results:
        for start, f in results:
            feats[start : start + f.shape[0]] = f
            done += f.shape[0]
            if progress:
                progress(done, n)
    return feats


def write_morphometry_store(
    cache: ImageCache,
    out: str | Path,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Compute the morphometric features of every cached image and write an embedding store
    (``feature_columns = MORPHOMETRY_COLUMNS``). Deterministic: the same cache gives a
    byte-identical store."""
    import lymph
    from lymph.store import write_store

    feats = compute_morphometry(cache, workers=workers, progress=progress)
    found = feats[:, _COL["nucleus_found"]]
    if found.size and found.mean() < 0.9:
        log.warning("morphometry: no nucleus found in %d of %d images", int((found == 0).sum()),
                    found.size)
    clinical, columns = cache.clinical()
    return write_store(
        out, embeddings=feats, patient_ptr=cache.patient_ptr, ids=cache.ids, labels=cache.labels,
        clinical=clinical, clinical_columns=columns, feature_columns=MORPHOMETRY_COLUMNS,
        image_paths=cache.paths,
        provenance={
            "method": "morphometry", "morphometry_version": MORPHOMETRY_VERSION,
            "data_fingerprint": cache.fingerprint, "lymph_version": lymph.__version__,
            "config": morphometry_config(), "dim": len(MORPHOMETRY_COLUMNS),
            "image_size": cache.size, "image_crop": cache.crop,
        },
    )
