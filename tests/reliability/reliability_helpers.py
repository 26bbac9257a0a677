"""Shared pieces of the reliability tests: a tiny dataset, CLI calls, child processes.

Everything is tiny (16 px images, 1 epoch, a dozen patients) so the whole folder runs in
a few minutes on a shared 2-core machine. (Not a ``conftest.py``: ``tests/conftest.py`` is
imported as ``conftest`` by other tests, and a second one would shadow it.)
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lymph.cli import app

SIZE = 16  # cached image side
#: `lymph embed` training options: 1 epoch, tiny model, CPU, fixed seed
TRAIN = ["--epochs", "1", "--dim", "4", "--batch-size", "8", "--device", "cpu", "--seed", "0"]
#: `lymph fit-head` options: 2 folds, a few epochs
HEAD = ["--folds", "2", "--epochs", "3", "--patience", "2", "--batch-size", "8"]
#: a pipeline file for `lymph run` at the same tiny sizes (no comparison stage)
PIPELINE = (
    f"[ingest]\nsize = {SIZE}\n"
    '[embed]\nepochs = 1\ndim = 4\nbatch_size = 8\ndevice = "cpu"\n'
    "[head]\nmax_epochs = 3\npatience = 2\nfolds = 2\nbatch_size = 8\n"
    "[compare]\nenabled = false\n"
)
ENV = {**os.environ, "LYMPH_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def make_tiny(out: Path, *, patients: int = 8, test_patients: int = 2, seed: int = 1,
              images: tuple[int, int] = (2, 3)) -> Path:
    """A small synthetic challenge root: ``patients`` labelled + ``test_patients``, 24 px."""
    from lymph.data.synth import SynthConfig, make_synthetic

    return make_synthetic(out, SynthConfig(patients=patients, test_patients=test_patients,
                                           images_min=images[0], images_max=images[1],
                                           size=24, seed=seed))


def train_tiny(d: Path, store_name: str = "store.h5") -> dict[str, Path]:
    """A tiny dataset under ``d``, an encoder trained on it with its store, and a model
    directory fitted on that store (what the reliability tests corrupt copies of)."""
    data = make_tiny(d / "data")
    store = d / store_name
    r = cli("embed", "--data", data, "--out", store, "--size", SIZE, *TRAIN)
    assert r.exit_code == 0, r.output
    r = cli("fit-head", "--store", store, "--out", d / "model", *HEAD)
    assert r.exit_code == 0, r.output
    return {"data": data, "store": store, "encoder": store.with_suffix(".encoder.pt"),
            "model": d / "model"}


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def fresh_logging() -> None:
    """Drop the CLI's stderr log handler so the next `invoke` binds one to its own stderr
    (``setup_logging`` installs it once per process, bound to the stream of that time)."""
    log = logging.getLogger("lymph")
    for h in [h for h in log.handlers if getattr(h, "_lymph", False)]:
        log.removeHandler(h)


def cli(*args: Any) -> Any:
    """``lymph ARGS`` in process; returns the click Result (``output`` has stderr too)."""
    fresh_logging()
    return CliRunner().invoke(app, [str(a) for a in args])


def child(code: str) -> subprocess.Popen[str]:
    """A Python child running ``code``; stdout piped (markers), stderr to a temporary file."""
    import tempfile

    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=err,
                            text=True, env=ENV)
    proc.err_file = err  # type: ignore[attr-defined]
    return proc


def child_stderr(proc: subprocess.Popen[str]) -> str:
    f = proc.err_file  # type: ignore[attr-defined]
    f.seek(0)
    return f.read()


def wait_for(proc: subprocess.Popen[str], marker: str | tuple[str, ...],
             timeout: float = 120.0) -> str:
    """Read the child's stdout until a line starting with ``marker`` (or one of them);
    return that line. Fails (with the child's stderr) if the child ends first."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=timeout)
            if not line:
                pytest.fail(f"child exited ({proc.wait()}) before {marker!r}:\n"
                            f"{child_stderr(proc)[-3000:]}")
            if line.startswith(marker):
                return line.strip()
    except queue.Empty:
        proc.kill()
        pytest.fail(f"child printed no {marker!r} within {timeout} s")


def kill9(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no cleanup, no finally blocks
    proc.wait()
    proc.err_file.close()  # type: ignore[attr-defined]


def tmp_leftovers(folder: Path, name: str) -> list[Path]:
    """Temporary siblings an interrupted atomic write of ``folder/name`` left behind."""
    return [p for p in folder.iterdir()
            if p.name.startswith(f".{name}.tmp-") or p.name.startswith(f".{name}.old-")]


SLOW_CHILD = r"""
import importlib, json, os, signal, sys, time
# a terminal's Ctrl-C: the test runner may itself run with SIGINT ignored (started in the
# background by a non-interactive shell), which every child would inherit
signal.signal(signal.SIGINT, signal.default_int_handler)
spec = json.loads(sys.argv[1])
import lymph.data.cache as cache
cache.CHUNK = 8  # several chunks: the fork pool runs
mod = importlib.import_module(spec["module"])
owner, name = mod, spec["attr"]
if "." in name:
    cls, name = name.split(".")
    owner = getattr(mod, cls)
real = getattr(owner, name)
def slow(*a, **k):
    with open(spec["pids"], "a") as f:
        f.write(f"{os.getpid()}\n")
    print("BUSY", flush=True)
    time.sleep(spec["sleep"])
    return real(*a, **k)
setattr(owner, name, slow)
from lymph.cli import app
sys.argv = ["lymph", *spec["args"]]
app()
"""


def slowed_child(work: Path, args: list[Any], module: str, attr: str,
                 sleep: float) -> tuple[subprocess.Popen[str], Path]:
    """``lymph ARGS`` in a child (cwd ``work``) with ``module.attr`` slowed by ``sleep``
    seconds per call; each call appends its pid to ``work/pids.txt`` and prints ``BUSY``."""
    import json
    import tempfile

    pids = work / "pids.txt"
    spec = {"args": [str(a) for a in args], "module": module, "attr": attr,
            "sleep": sleep, "pids": str(pids)}

    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by the caller)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=err, text=True, env=ENV, cwd=work,
                            start_new_session=True)  # its own group: os.killpg reaches all
    proc.err_file = err  # type: ignore[attr-defined]
    return proc, pids
