"""Atomic artifact writes: write to a temporary path beside the target, then rename.

An interrupted run therefore never leaves a file (or folder) at the target path that
opens as valid: either the previous artifact is still there, complete, or the new one is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path


def tmp_prefix(target: Path) -> str:
    """``.NAME.``: how lymph's temporaries beside ``target`` begin. A long name is
    shortened (with a hash) so that a temporary's name fits where the target's does."""
    name = target.name
    if len(name.encode("utf-8")) > 200:
        name = name[:80] + "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    return f".{name}."


def _tmp_sibling(target: Path, kind: str = "tmp") -> Path:
    return target.with_name(f"{tmp_prefix(target)}{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_stale(folder: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove leftovers of killed lymph processes in ``folder``: entries named
    ``{prefix}{kind}-{pid}-{8 hex}`` (``kind`` tmp or old) whose process is gone.
    Only names lymph makes match; a live process's temporaries are left alone."""
    import re

    pat = re.compile(re.escape(prefix) + r"(?:tmp|old)-(\d+)-[0-9a-f]{8}$")
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pat.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def temp_dir(parent: str | os.PathLike[str], what: str) -> Iterator[Path]:
    """A temporary folder ``parent/.lymph-{what}.tmp-{pid}-{hex}``, removed on every exit
    Python sees (error, SIGINT, SIGTERM via :mod:`lymph.signals`); leftovers of killed
    runs are removed by the next call."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, tmp_prefix(parent / f"lymph-{what}"))
    d = _tmp_sibling(parent / f"lymph-{what}")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` atomically.

    Works for files and folders. A file replaces the old one with ``os.replace`` (atomic
    on POSIX: a concurrent reader sees the old or the new file, whole). A folder
    replacing an existing one is swapped with it in one atomic exchange (Linux
    ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, with a moment when the target
    is absent); the old one is removed afterwards. On error the temporary path is removed
    and the target is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, tmp_prefix(target))  # leftovers of killed runs
    tmp = _tmp_sibling(target)
    try:
        yield tmp
        if tmp.is_dir():
            if target.exists() and _exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
                return
            old = None
            if target.exists():
                old = _tmp_sibling(target, "old")
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            _fsync_file(tmp)
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    False where that is unavailable (another OS, an old kernel or C library, a file system
    without it): the caller then falls back to two renames.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically and return its path."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
