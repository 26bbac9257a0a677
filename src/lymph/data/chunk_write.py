"""Writing whole chunks of an uncompressed Zarr array without the page cache.

The image cache stores raw uint8 chunks (``docs/image-cache.md``): a chunk file is the
chunk's C-order bytes, nothing else. Written through the page cache, each 9.6 MB chunk
cost ~25 ms of CPU in the kernel (fresh page-cache pages; 13 % of the work of decoding
it). Written with ``O_DIRECT`` from a page-aligned buffer it costs ~0.3 ms of CPU and a
few ms of waiting on the disk, so ingest stays bound by decoding.

Zarr still owns the format: it creates the array and its metadata, names the chunk file
(its chunk-key encoding) and reads everything back. This module only writes the bytes
Zarr would write, and only where that is provably the same: a local store, a single
``bytes`` codec (no compression, no filters), 1-byte dtype, whole aligned chunks, a file
system that accepts ``O_DIRECT``. Anywhere else :func:`write_chunk` returns False and the
caller writes through Zarr.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of this
_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """A zeroed array whose data starts on a page boundary (private anonymous mmap)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    private = getattr(mmap, "MAP_PRIVATE", None)
    if private is not None:  # never shared with forked workers (mmap's default is shared)
        buf = mmap.mmap(-1, max(nbytes, 1), flags=private | mmap.MAP_ANONYMOUS)
    else:
        buf = mmap.mmap(-1, max(nbytes, 1))
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def raw_chunk_path(arr: Any) -> Path | None:
    """Folder-relative chunk files of ``arr`` hold raw C-order bytes: return the array's
    folder, else None (compressed, filtered, multi-byte or not on a local disk)."""
    try:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore
    except ImportError:  # another zarr major version: let zarr write
        return None
    meta = arr.metadata
    codecs = getattr(meta, "codecs", ())
    if (not isinstance(arr.store, LocalStore) or len(codecs) != 1
            or not isinstance(codecs[0], BytesCodec) or arr.dtype.itemsize != 1):
        return None
    return Path(arr.store.root) / arr.path


def write_chunk(arr: Any, folder: Path | None, index: int, data: np.ndarray) -> bool:
    """Write chunk ``index`` (along the first axis) of ``arr`` from ``data``, the whole
    chunk (edge chunks padded), with ``O_DIRECT``. False where that is not possible; the
    caller then writes through Zarr. ``folder``: :func:`raw_chunk_path` of ``arr``."""
    flag = getattr(os, "O_DIRECT", 0)
    if (folder is None or not flag or tuple(data.shape) != tuple(arr.chunks)
            or not data.flags.c_contiguous or data.nbytes % ALIGN
            or data.ctypes.data % ALIGN):
        return False
    key = arr.metadata.encode_chunk_key((index,) + (0,) * (data.ndim - 1))
    path = folder / key
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
    except OSError as e:
        if e.errno in _UNSUPPORTED:  # e.g. an older tmpfs or overlayfs: no direct I/O
            return False
        raise
    view = memoryview(data.reshape(-1))
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        if e.errno in _UNSUPPORTED:  # e.g. an alignment the device does not accept
            return False
        raise
    os.close(fd)
    return True
