"""Whole-chunk O_DIRECT writes of the image cache: the same bytes Zarr writes, or no write."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import zarr

import lymph.data.cache as cache_mod
from lymph.data.cache import ingest, open_cache
from lymph.data.chunk_write import ALIGN, aligned_empty, raw_chunk_path, write_chunk


def _direct_io_supported(folder: Path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    os.close(fd)
    return True


def _array(path: Path, **kw) -> zarr.Array:
    return zarr.create_array(path, shape=(300, 3, 8, 8), dtype="uint8", chunks=(256, 3, 8, 8),
                             config={"write_empty_chunks": True}, **kw)


def test_aligned_buffer_is_page_aligned_and_private_to_each_process() -> None:
    buf = aligned_empty((256, 3, 8, 8))
    assert buf.ctypes.data % ALIGN == 0 and buf.shape == (256, 3, 8, 8) and not buf.any()
    pid = os.fork()
    if pid == 0:  # child: scribble on its copy
        buf[:] = 7
        os._exit(0)
    os.waitpid(pid, 0)
    assert not buf.any()  # a shared mapping would show the child's writes here


def test_direct_write_gives_the_bytes_zarr_writes(tmp_path: Path) -> None:
    if not _direct_io_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (300, 3, 8, 8), dtype=np.uint8)
    ours = _array(tmp_path / "ours.zarr", compressors=None)
    theirs = _array(tmp_path / "theirs.zarr", compressors=None)
    theirs[:] = data
    folder = raw_chunk_path(ours)
    assert folder == tmp_path / "ours.zarr"
    buf = aligned_empty((256, 3, 8, 8))
    buf[:] = data[:256]
    assert write_chunk(ours, folder, 0, buf)
    buf[:44] = data[256:]
    buf[44:] = 0  # the edge chunk's padding
    assert write_chunk(ours, folder, 1, buf)
    assert np.array_equal(zarr.open_array(tmp_path / "ours.zarr", mode="r")[:], data)
    for key in ("c/0/0/0/0", "c/1/0/0/0"):
        assert (folder / key).read_bytes() == (tmp_path / "theirs.zarr" / key).read_bytes()


def test_no_direct_write_where_the_bytes_would_differ(tmp_path: Path) -> None:
    compressed = _array(tmp_path / "z.zarr")  # zarr's default codecs compress
    assert raw_chunk_path(compressed) is None
    buf = aligned_empty((256, 3, 8, 8))
    assert not write_chunk(compressed, raw_chunk_path(compressed), 0, buf)
    raw = _array(tmp_path / "r.zarr", compressors=None)
    folder = raw_chunk_path(raw)
    assert not write_chunk(raw, folder, 0, buf[:128])  # not a whole chunk
    big = aligned_empty((257, 3, 8, 8))
    assert not write_chunk(raw, folder, 0, big[1:])  # whole chunk, but not page-aligned
    assert not (folder / "c").exists()  # nothing was written


def test_ingest_pixels_and_chunk_files_same_with_or_without_direct_writes(
        synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _direct_io_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    monkeypatch.setattr(cache_mod, "CHUNK", 16)  # several chunks and a partial edge chunk
    direct = ingest(synth_data, tmp_path / "d.zarr", size=32, workers=2)
    calls: list[int] = []

    def refuse(arr, folder, index, data):  # noqa: ANN001 - the zarr-writer fallback
        calls.append(index)
        return False

    monkeypatch.setattr(cache_mod, "write_chunk", refuse)
    via_zarr = ingest(synth_data, tmp_path / "z.zarr", size=32, workers=1)
    assert calls and direct.n_images == via_zarr.n_images and direct.n_images % 16
    a, b = open_cache(tmp_path / "d.zarr"), open_cache(tmp_path / "z.zarr")
    assert np.array_equal(a.read_all(), b.read_all())
    assert a.fingerprint == b.fingerprint
    files = sorted(p.relative_to(tmp_path / "d.zarr") for p in (tmp_path / "d.zarr/pixels/c").rglob("*")
                   if p.is_file())
    assert len(files) == -(-direct.n_images // 16)
    for f in files:
        assert (tmp_path / "d.zarr" / f).read_bytes() == (tmp_path / "z.zarr" / f).read_bytes()


def test_a_write_the_device_refuses_falls_back_and_leaves_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not _direct_io_supported(tmp_path):
        pytest.skip("this file system has no O_DIRECT")
    raw = _array(tmp_path / "r.zarr", compressors=None)
    folder = raw_chunk_path(raw)

    def refuse(fd: int, data: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "write", refuse)
    assert not write_chunk(raw, folder, 0, aligned_empty((256, 3, 8, 8)))
    monkeypatch.undo()
    assert not (folder / "c/0/0/0/0").exists()
