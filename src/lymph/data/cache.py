"""The decoded image cache (`lymph ingest`): every image decoded once, stored as Zarr v3.

Layout (``docs/image-cache.md``, encoding-type ``lymph-image-cache``, version ``1``)::

    CACHE.zarr/               group; attributes: encoding-type/-version, fingerprint,
                              settings, channel_mean, channel_std, patients, paths
      pixels                  uint8 (n_images, 3, size, size), chunks of CHUNK images
      patient_ptr             int64 (n_patients + 1,)

The folder is built under a temporary name and renamed when complete; the format
attributes are stamped last. Decoding runs on all cores, each worker writing whole chunks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import atomic_path, sha256_text
from lymph.data.challenge import ChallengeData, clinical_features, read_challenge
from lymph.data.chunk_write import aligned_empty, raw_chunk_path, write_chunk
from lymph.data.images import UnreadableImage, decode_image
from lymph.data.workers import chunk_results
from lymph.errors import LymphError

log = logging.getLogger("lymph")

ENCODING_TYPE = "lymph-image-cache"
ENCODING_VERSION = "1"
CHUNK = 256  # images per Zarr chunk: about 9.6 MB raw at 112 px
STATS_STRIDE = 16  # channel statistics from every 16th image (680 of the dev set's 10,850)
#: Pixels are stored uncompressed: decoded smear images barely compress (Blosc lz4: 14 %
#: smaller on the dev set) and raw chunks write 1.5x and read 2x faster. Chunks are written
#: as they come (``write_empty_chunks``): zarr's default scan of every chunk for all-fill
#: values cost as much as a fifth of the decoding time.
COMPRESSORS = None


@dataclass
class ImageCache:
    """An opened image cache. Pixels stay on disk; the index and table are in memory."""

    path: Path
    pixels: Any  # zarr.Array (n_images, 3, size, size) uint8
    patient_ptr: np.ndarray
    patients: list[dict[str, Any]]  # id, label, gender, dob, age, lymph_count, split
    paths: list[str]
    size: int
    crop: int | None
    channel_mean: np.ndarray  # (3,) on [0, 1]
    channel_std: np.ndarray
    fingerprint: str

    @property
    def n_images(self) -> int:
        return int(self.patient_ptr[-1])

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    @property
    def ids(self) -> list[str]:
        return [p["id"] for p in self.patients]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([p["label"] for p in self.patients], dtype=np.int8)

    def clinical(self) -> tuple[np.ndarray, list[str]]:
        return clinical_features(
            np.asarray([p["age"] for p in self.patients]),
            np.asarray([p["lymph_count"] for p in self.patients]),
            [p["gender"] for p in self.patients],
        )

    def image_patient(self) -> np.ndarray:
        """Patient row of every image: ``(n_images,)`` int64."""
        return np.repeat(np.arange(self.n_patients), np.diff(self.patient_ptr))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Pixels of images ``start:stop``: ``(stop - start, 3, size, size)`` uint8."""
        return np.asarray(self.pixels[start:stop])

    def read_all(self) -> np.ndarray:
        return np.asarray(self.pixels[:])


# ---- fingerprint ---------------------------------------------------------------------------
def _file_entry(p: str | Path) -> str:
    try:
        st = os.stat(p)
    except OSError:  # vanished: decoding it will report it unreadable
        return f"{p}|missing"
    return f"{p}|{st.st_size}|{st.st_mtime_ns}"


def _fingerprint(settings: dict[str, Any], csvs: list[str], image_entries: list[str]) -> str:
    return sha256_text(json.dumps(settings, sort_keys=True),
                       *(_file_entry(c) for c in csvs), *image_entries)


def _csvs(data: ChallengeData) -> list[str]:
    return sorted(str(p) for p in data.root.rglob("*.csv"))


def data_fingerprint(data: ChallengeData, settings: dict[str, Any]) -> str:
    """Hash of the settings, the CSVs and every image file's path, size and mtime."""
    return _fingerprint(settings, _csvs(data), [_file_entry(p) for p in data.image_paths()])


# ---- workers -----------------------------------------------------------------------------
_buffer: np.ndarray | None = None  # each worker process's decode buffer, reused chunk after chunk
_array: tuple[str, Any] | None = None  # each worker process's open pixels array (path, array)


def _chunk_buffer(rows: int, size: int) -> np.ndarray:
    """A whole chunk's ``(rows, 3, size, size)`` uint8 buffer, allocated once per process,
    page-aligned (for :func:`write_chunk`).

    A fresh 9.6 MB array per chunk cost 8 % of the decoding time: its pages are new to
    the process (and, in a virtual machine, to the host), and every first touch faults.
    """
    global _buffer
    if _buffer is None or _buffer.shape != (rows, 3, size, size):
        _buffer = aligned_empty((rows, 3, size, size))
    return _buffer


def _release_worker_state() -> None:
    """Drop this process's buffer and open array (the serial path decodes in-process)."""
    global _buffer, _array
    _buffer = _array = None


def _decode_chunk(args: tuple[str, int, int, list[str], int, int | None]
                  ) -> tuple[int, np.ndarray, np.ndarray, list[str], list[str]]:
    """Decode images ``start:stop`` (one chunk) and write them straight into the Zarr array.

    Returns the start index, per-image ok flags, per-channel sums over the sampled ok
    images (sum, sum of squares, pixel count: float64 (3, 3)), the messages of
    unreadable files and the fingerprint entries of all files.
    """
    import zarr

    global _array
    arr_path, start, stop, paths, size, crop = args
    if _array is None or _array[0] != arr_path:  # opened once per worker, not per chunk
        _array = (arr_path, zarr.open_array(arr_path, mode="r+"))
    arr = _array[1]
    rows = int(arr.chunks[0])
    buf = _chunk_buffer(rows, size)
    out = buf[: stop - start]  # rows of unreadable images are dropped later
    ok = np.ones(stop - start, dtype=bool)
    bad: list[str] = []
    entries = []
    for k, p in enumerate(paths):
        entries.append(_file_entry(p))  # the fingerprint's stat, taken as the file is read
        try:
            out[k] = decode_image(p, size, crop)
        except UnreadableImage as e:
            ok[k] = False
            bad.append(str(e))
    index, offset = divmod(start, rows)
    buf[stop - start :] = 0  # an edge chunk's padding, as Zarr writes it (fill value 0)
    if offset or not write_chunk(arr, raw_chunk_path(arr), index, buf):
        with zarr.config.set({"array.write_empty_chunks": True}):  # no all-fill scan (see top)
            arr[start:stop] = out
    # channel statistics from per-channel histograms of every STATS_STRIDE-th image (a
    # normalisation needs no more; histograms are exact and far cheaper than floats)
    v = np.arange(256, dtype=np.float64) / 255.0
    sample = out[ok][::STATS_STRIDE]
    hist = np.stack([np.bincount(sample[:, c].ravel(), minlength=256) for c in range(3)])
    sums = np.stack([hist @ v, hist @ (v * v), hist.sum(axis=1)])  # sum, sum of squares, n
    return start, ok, sums, bad, entries


# ---- ingest ------------------------------------------------------------------------------
@dataclass
class IngestResult:
    path: Path
    cached: bool  # True when an up-to-date cache was reused (no work done)
    n_images: int
    n_patients: int
    skipped: list[str]


def ingest(
    data_dir: str | Path,
    out: str | Path,
    *,
    size: int = 112,
    crop: int | None = None,
    force: bool = False,
    strict: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Decode every image of ``data_dir`` once into a Zarr cache at ``out``.

    Re-running on unchanged inputs and settings is a no-op (``cached=True``) unless
    ``force``. Unreadable images are skipped with a warning (``strict``: an error); a
    patient left with no readable image is an error. ``progress(done, total)`` is called
    as chunks complete.
    """
    from lymph.checks import check_int

    check_int("size", size, 8, 1024)
    if crop is not None:
        check_int("crop", crop, 1)
    if workers is not None:
        check_int("workers", workers, 1)
    out = Path(out)
    data = read_challenge(data_dir)
    settings = {"size": size, "crop": crop, "format": ENCODING_VERSION}
    if out.exists() and not force:
        try:
            existing = open_cache(out)
            if existing.fingerprint == data_fingerprint(data, settings):
                return IngestResult(out, True, existing.n_images, existing.n_patients, [])
        except LymphError:
            pass
    from lymph.outputs import check_output

    check_output(out, "cache", name="image cache", inputs=[data_dir])  # never a user's folder
    paths = [str(p) for p in data.image_paths()]
    n = len(paths)
    workers = workers or os.cpu_count() or 1
    with atomic_path(out) as tmp:
        import zarr

        root = zarr.open_group(tmp, mode="w")
        root.create_array(
            "pixels", shape=(n, 3, size, size), dtype="uint8", chunks=(CHUNK, 3, size, size),
            compressors=COMPRESSORS, config={"write_empty_chunks": True},
        )
        arr_path = str(tmp / "pixels")
        jobs = [
            (arr_path, s, min(s + CHUNK, n), paths[s : min(s + CHUNK, n)], size, crop)
            for s in range(0, n, CHUNK)
        ]
        ok = np.ones(n, dtype=bool)
        sums = np.zeros((3, 3))
        bad: list[str] = []
        entries: list[list[str]] = [[] for _ in jobs]  # fingerprint entries, job by job
        done = 0
        try:
            with chunk_results(_decode_chunk, jobs, workers) as results:
                for start, ok_k, s_k, bad_k, entries_k in results:
                    entries[start // CHUNK] = entries_k
                    ok[start : start + len(ok_k)] = ok_k
                    sums += s_k
                    bad += bad_k
                    done += len(ok_k)
                    if progress:
                        progress(done, n)
        finally:
            _release_worker_state()
        bad.sort()
        if bad and strict:
            raise LymphError(f"unreadable image(s) with `strict`: {bad[0]}" + (
                f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        for msg in bad:
            log.warning("skipped unreadable image %s", msg)
        ptr = data.patient_ptr()
        if not ok.all():
            for i, p in enumerate(data.patients):
                if not ok[ptr[i] : ptr[i + 1]].any():
                    raise LymphError(
                        f"{data.root}: patient {p.id} has no readable image "
                        f"({len(p.image_paths)} file(s), all unreadable)"
                    )
            _compact(tmp, ok, size)
            keep_counts = np.add.reduceat(ok.astype(np.int64), ptr[:-1]) if n else np.zeros(0)
            ptr = np.concatenate([[0], np.cumsum(keep_counts)]).astype(np.int64)
            paths = [p for p, k in zip(paths, ok) if k]
        n_ok = int(ok.sum())
        mean = sums[0] / sums[2]
        std = np.sqrt(np.maximum(sums[1] / sums[2] - mean**2, 0.0))
        root.create_array("patient_ptr", data=ptr)
        table = data.table()
        patients = [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items() if k != "n_images"}
            for row in table.to_dict(orient="records")
        ]
        # the workers stat each image as they decode it: the fingerprint costs no serial
        # pass over 10,850 files, and it describes the files as they were read
        fp = _fingerprint(settings, _csvs(data), [e for job in entries for e in job])
        root.attrs.update(
            {
                "fingerprint": fp,
                "settings": settings,
                "source": str(Path(data_dir).resolve()),
                "channel_mean": mean.tolist(),
                "channel_std": std.tolist(),
                "patients": patients,
                "paths": paths,
                "n_skipped": len(bad),
                # the format stamp goes in the same single write of zarr.json, after the
                # arrays are complete: an interrupted ingest never leaves a valid cache
                "encoding-type": ENCODING_TYPE,
                "encoding-version": ENCODING_VERSION,
            }
        )
    if bad:
        log.warning("%d unreadable image(s) skipped", len(bad))
    return IngestResult(out, False, n_ok, len(patients), bad)


def _compact(folder: Path, ok: np.ndarray, size: int) -> None:
    """Drop the rows of unreadable images from ``pixels`` (rare path: copy, then swap)."""
    import shutil

    import zarr

    src = zarr.open_array(folder / "pixels", mode="r")
    keep = np.flatnonzero(ok)
    dst = zarr.create_array(
        folder / "pixels_ok", shape=(keep.size, 3, size, size), dtype="uint8",
        chunks=(CHUNK, 3, size, size),
        compressors=COMPRESSORS, config={"write_empty_chunks": True},
    )
    for s in range(0, keep.size, CHUNK):
        dst[s : s + CHUNK] = src.get_orthogonal_selection((keep[s : s + CHUNK],))
    shutil.rmtree(folder / "pixels")
    os.rename(folder / "pixels_ok", folder / "pixels")


def open_cache(path: str | Path) -> ImageCache:
    """Open an image cache, checking its type, version and shapes."""
    import zarr

    path = Path(path)
    if not path.is_dir():
        raise LymphError(f"{path}: image cache not found (expected a folder made by `lymph ingest`)")
    try:
        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
    except Exception as e:  # zarr raises several types for a broken folder
        raise LymphError(f"{path}: not a readable Zarr image cache ({type(e).__name__}: {e})") from None
    etype, ever = attrs.get("encoding-type"), attrs.get("encoding-version")
    if etype != ENCODING_TYPE:
        raise LymphError(
            f"{path}: attribute 'encoding-type': expected {ENCODING_TYPE!r}, got {etype!r} "
            "(not an image cache, or an incomplete one)"
        )
    if ever != ENCODING_VERSION:
        raise LymphError(
            f"{path}: attribute 'encoding-version' is {ever!r}; this lymph reads "
            f"{ENCODING_VERSION!r}. Upgrade lymph, or rebuild with `lymph ingest --force`."
        )
    try:
        pixels = root["pixels"]
        ptr = np.asarray(root["patient_ptr"][:], dtype=np.int64)
    except (KeyError, FileNotFoundError) as e:
        raise LymphError(f"{path}: missing array {e} in image cache") from None
    settings = attrs["settings"]
    size = int(settings["size"])
    patients, paths = attrs["patients"], attrs["paths"]
    if (
        pixels.dtype != np.uint8 or tuple(pixels.shape[1:]) != (3, size, size)
        or ptr.shape != (len(patients) + 1,) or ptr[0] != 0
        or ptr[-1] != pixels.shape[0] or len(paths) != pixels.shape[0]
    ):
        raise LymphError(
            f"{path}: inconsistent image cache: pixels {pixels.dtype} {pixels.shape}, "
            f"patient_ptr {ptr.shape}, {len(patients)} patients, {len(paths)} paths"
        )
    return ImageCache(
        path=path, pixels=pixels, patient_ptr=ptr, patients=patients, paths=paths, size=size,
        crop=settings.get("crop"), channel_mean=np.asarray(attrs["channel_mean"]),
        channel_std=np.asarray(attrs["channel_std"]), fingerprint=attrs["fingerprint"],
    )
