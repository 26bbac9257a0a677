"""The stage cache of `lymph run`: ``artifacts/<stage>/<fingerprint>/``.

A stage's fingerprint is a hash of its own settings and its inputs' fingerprints, so it
changes exactly when something that can change its output changes. A stage folder is
complete when its manifest ``stage.json`` exists: the manifest is written last
(atomically), so an interrupted stage is never reused; a folder without one is removed and
rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lymph.atomic import sha256_text, write_text_atomic
from lymph.errors import LymphError

log = logging.getLogger("lymph")

MANIFEST = "stage.json"
STAGES = ("data", "ingest", "embed", "head", "compare")


def fingerprint(stage: str, settings: dict[str, Any], inputs: list[str]) -> str:
    """Hash of a stage's name, settings and input fingerprints (16 hex digits)."""
    return sha256_text(stage, json.dumps(settings, sort_keys=True), *inputs)[:16]


@dataclass
class Stage:
    name: str
    fingerprint: str
    folder: Path
    settings: dict[str, Any]
    inputs: list[str]

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    def is_complete(self) -> bool:
        if not self.manifest.is_file():
            return False
        try:
            m = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return m.get("fingerprint") == self.fingerprint

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest.read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the stage's lock (``<stage>/.<fingerprint>.lock``, an advisory ``flock``):
        two runs never write one stage folder at once; the second waits, then finds the
        stage complete and reuses it. The kernel drops the lock of a killed run. The lock
        file is removed by its holder; a waiter that then gets the lock of a removed file
        opens the path again (so two runs never hold two different files)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        path = self.folder.parent / f".{self.fingerprint}.lock"
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            yield
            return
        warned = False
        while True:
            f = open(path, "a+")  # noqa: SIM115 (held across the yield; closed below)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not warned:
                    log.warning("%s: another lymph run is writing this stage; waiting for it",
                                self.folder)
                    warned = True
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()  # the holder removed that file: lock the path anew
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
            f.close()  # releases the lock

    def build(self, work: Callable[[Path], dict[str, Any]], config: dict[str, Any],
              on_start: Callable[[], None] | None = None) -> tuple[dict[str, Any], bool, float]:
        """Reuse the complete stage, or build it under the lock: ``(outputs, cached,
        seconds)``. A failed or interrupted build leaves no folder (and so no cache).
        ``on_start`` is called when the build itself starts (not for a reused stage)."""
        if self.is_complete():
            return self.read_manifest()["outputs"], True, 0.0
        with self.lock():
            if self.is_complete():  # another run built it while we waited
                return self.read_manifest()["outputs"], True, 0.0
            if on_start is not None:
                on_start()
            t0 = time.perf_counter()
            folder = self.begin()
            try:
                outs = work(folder)
                secs = time.perf_counter() - t0
                self.finish(config, outs, secs)
            except BaseException:
                shutil.rmtree(self.folder, ignore_errors=True)
                raise
        return outs, False, secs

    def begin(self) -> Path:
        """Start (or restart) the stage: an incomplete folder is cleared."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        return self.folder

    def finish(self, config: dict[str, Any], outputs: dict[str, Any], seconds: float) -> None:
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "inputs": self.inputs,
            "outputs": {k: str(v) for k, v in outputs.items()},
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config,  # the whole resolved configuration of the run
        }
        write_text_atomic(self.manifest, json.dumps(manifest, indent=2) + "\n")


def make_stage(root: Path, name: str, settings: dict[str, Any], inputs: list[str]) -> Stage:
    fp = fingerprint(name, settings, inputs)
    return Stage(name, fp, Path(root) / name / fp, settings, inputs)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_stages(root: str | Path) -> list[dict[str, Any]]:
    """What is cached under ``root``: one row per complete stage folder."""
    root = Path(root)
    if not root.is_dir():
        raise LymphError(f"{root}: no artifacts folder (run `lymph run` or `lymph demo` first)")
    rows = []
    for stage in STAGES:
        d = root / stage
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            m = f / MANIFEST
            if not m.is_file():
                continue
            try:
                man = json.loads(m.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            rows.append({
                "stage": stage, "fingerprint": f.name, "path": str(f),
                "bytes": folder_size(f), "settings": man.get("settings", {}),
                "seconds": man.get("seconds"), "finished": man.get("finished"),
            })
    return rows
