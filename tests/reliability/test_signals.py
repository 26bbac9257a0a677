"""SIGINT and SIGTERM end any command cleanly (issue 15, class 5).

A child runs ``lymph COMMAND`` with one of its working steps slowed down (so the signal
lands mid-work; the step prints ``BUSY``). After the signal: exit code 130 (SIGINT) or
143 (SIGTERM) within seconds, the last stderr line ``interrupted``, no traceback, no pool
worker left alive, no temporary file or folder left, and the previous artifact intact.
SIGKILL cannot be caught: then the workers die with their parent (``PR_SET_PDEATHSIG``)
and the next run removes the leftovers it recognises as a dead run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    HEAD,
    SIZE,
    TRAIN,
    child_stderr,
    cli,
    make_tiny,
    slowed_child,
    tmp_leftovers,
    train_tiny,
    wait_for,
)

from lymph.data.cache import open_cache
from lymph.store import open_store

pytestmark = pytest.mark.slow  # child processes, most of them import torch: ~7 s each

@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("signals")
    b = train_tiny(d)
    big = make_tiny(d / "big", patients=10, test_patients=0, images=(8, 10))
    (d / "p.toml").write_text('[ingest]\nsize = 16\n[embed]\nepochs = 3\ndim = 4\n'
                              'batch_size = 8\ndevice = "cpu"\n[compare]\nenabled = false\n')
    return {**b, "big": big, "pipeline": d / "p.toml"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False



def _setup(command: str, base: dict[str, Path], work: Path):
    """(args, slowed module, attr, previous-artifact check)"""
    if command == "ingest":
        out = work / "c.zarr"
        assert cli("ingest", base["big"], "--out", out, "--size", SIZE).exit_code == 0
        n = open_cache(out).n_images
        return (["ingest", base["big"], "--out", out, "--size", SIZE, "--force", "--workers", 2],
                "lymph.data.cache", "decode_image", lambda: open_cache(out).n_images == n, out)
    if command == "embed":
        out = work / "s.h5"
        fp = open_store(base["store"]).fingerprint
        out.write_bytes(base["store"].read_bytes())
        return (["embed", "--data", base["data"], "--out", out, "--size", SIZE,
                 *[a if a != "1" else "50" for a in TRAIN]],
                "lymph.encoder.train", "train_step", lambda: open_store(out).fingerprint == fp,
                out)
    if command == "fit-head":
        out = work / "m.json"
        assert cli("fit-head", "--store", base["store"], "--json", out, *HEAD).exit_code == 0
        before = out.read_bytes()
        return (["fit-head", "--store", base["store"], "--json", out, "--out", work / "m", *HEAD],
                "lymph.head.estimator", "MILClassifier.fit", lambda: out.read_bytes() == before,
                out)
    if command == "predict":
        out = work / "p.csv"
        return (["predict", "--model", base["model"], "--data", base["big"], "--out", out,
                 "--device", "cpu"], "lymph.data.cache", "decode_image",
                lambda: not out.exists(), out)
    if command == "compare-baselines":  # --jobs 2: the signal must stop the pool at once
        out = work / "c.json"
        return (["compare-baselines", "--store", base["store"], "--folds", "2", "--jobs", "2",
                 "--models", "attention+clinical,mean+clinical", "--json", out],
                "lymph.head.train", "_slice", lambda: not out.exists(), out)
    out = work / "a"
    return (["run", base["pipeline"], "--data", base["data"], "--artifacts", out],
            "lymph.encoder.train", "train_step",
            lambda: not list((out / "embed").glob("*/stage.json")), out)


CASES = [(c, s) for c in ("ingest", "embed", "fit-head", "predict", "run", "compare-baselines")
         for s in (signal.SIGINT, signal.SIGTERM)]
CASES += [("fit-head", signal.SIGHUP), ("compare-baselines", signal.SIGHUP)]  # terminal closed


@pytest.mark.parametrize(("command", "sig"), CASES,
                         ids=[f"{c}-{signal.Signals(s).name}" for c, s in CASES])
def test_signal_ends_the_command_cleanly(base: dict[str, Path], tmp_path: Path, command: str,
                                         sig: int) -> None:
    work = tmp_path / "w"
    work.mkdir()
    args, module, attr, intact, out = _setup(command, base, work)
    proc, pids = slowed_child(work, args, module, attr, 0.3)
    wait_for(proc, "BUSY", timeout=120)
    time.sleep(0.4)
    t0 = time.perf_counter()
    if sig == signal.SIGTERM:
        proc.send_signal(sig)  # `kill PID`: the parent only
    else:
        os.killpg(proc.pid, sig)  # Ctrl-C, a closed terminal: the whole process group
    try:
        rc = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command did not end within 20 s of the signal")
    took = time.perf_counter() - t0
    err = child_stderr(proc)
    assert rc == 128 + sig, err[-2000:]  # 130 SIGINT, 143 SIGTERM, 129 SIGHUP
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert took < 10, took
    time.sleep(0.5)
    workers = {int(x) for x in pids.read_text().split()} - {proc.pid}
    assert not [p for p in workers if _alive(p)], "pool workers left alive"
    assert intact(), "the previous artifact changed"
    left = [p.name for p in out.parent.iterdir()
            if ".tmp-" in p.name or ".old-" in p.name or p.name.startswith(".lymph-")]
    assert not left, f"temporaries left: {left}"
    if command == "run":
        stage_dirs = [d for d in (out / "embed").iterdir() if d.is_dir()]
        assert not stage_dirs, "a half-built stage folder was left"


def test_sigkill_workers_die_and_next_run_cleans_up(base: dict[str, Path], tmp_path: Path
                                                    ) -> None:
    work = tmp_path / "w"
    work.mkdir()
    args, module, attr, intact, out = _setup("ingest", base, work)
    proc, pids = slowed_child(work, args, module, attr, 0.3)
    wait_for(proc, "BUSY", timeout=120)
    time.sleep(0.4)
    proc.kill()
    proc.wait()
    time.sleep(1.0)
    workers = {int(x) for x in pids.read_text().split()} - {proc.pid}
    assert workers and not [p for p in workers if _alive(p)], "workers outlived their parent"
    assert intact()
    assert tmp_leftovers(work, "c.zarr"), "expected the killed run's temporary folder"
    r = cli("ingest", base["big"], "--out", out, "--size", SIZE, "--force")
    assert r.exit_code == 0, r.output
    assert not tmp_leftovers(work, "c.zarr"), "the next run did not clean the leftover"


def test_live_runs_temporaries_are_left_alone(tmp_path: Path) -> None:
    from lymph.atomic import clean_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f".x.h5.tmp-{os.getpid()}-0123abcd"
    gone = tmp_path / f".x.h5.tmp-{dead.pid}-0123abcd"
    other = tmp_path / f".x.h5.tmp-{dead.pid}-nothex!!"
    user = tmp_path / "x.h5.tmp-1-0123abcd"
    for p in (mine, gone, other, user):
        p.write_text("")
    assert clean_stale(tmp_path, ".x.h5.") == [gone]
    assert mine.exists() and other.exists() and user.exists() and not gone.exists()
