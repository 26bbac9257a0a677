"""Concurrent use: two `fit-head` processes on one store; a reader racing a writer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_bags
from lymph.store import open_store, write_store
from reliability_helpers import ENV, HEAD, child, kill9, wait_for


def _strip_timing(report: dict) -> dict:
    out = {k: v for k, v in report.items() if not k.startswith("seconds")}
    out["per_fold"] = [{k: v for k, v in f.items() if k != "seconds"} for f in report["per_fold"]]
    return out


@pytest.mark.slow
def test_two_fit_heads_read_one_store_at_once(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.h5", **make_bags(n_patients=16, dim=4, sizes=(2, 5)))
    procs = [
        subprocess.Popen([sys.executable, "-m", "lymph.cli", "fit-head", "--store", str(store),
                          *HEAD, "--json", str(tmp_path / f"m{k}.json"), "--out",
                          str(tmp_path / f"model{k}")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for k in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    a, b = (json.loads((tmp_path / f"m{k}.json").read_text()) for k in range(2))
    assert _strip_timing(a) == _strip_timing(b)  # same store, same seed: the same result
    heads = [(tmp_path / f"model{k}" / "head.pt").read_bytes() for k in range(2)]
    assert heads[0] == heads[1]


WRITER = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from conftest import make_bags
from lymph.store import write_store
a = make_bags(n_patients=60, dim=32, sizes=(20, 40), seed=1)
b = make_bags(n_patients=60, dim=32, sizes=(20, 40), seed=2)
b["ids"] = ["Q" + i[1:] for i in b["ids"]]
print("writing", flush=True)
k = 0
while True:
    write_store({out!r}, **(a if k % 2 == 0 else b))
    k += 1
"""


def test_reader_sees_old_or_new_store_while_writer_replaces(tmp_path: Path) -> None:
    """A writer replaces the store over and over (A, B, A, ...); every open sees one whole
    store, A or B, and the fingerprint of exactly the file it read."""
    tests = str(Path(__file__).resolve().parents[1])
    a = make_bags(n_patients=60, dim=32, sizes=(20, 40), seed=1)
    b = make_bags(n_patients=60, dim=32, sizes=(20, 40), seed=2)
    b["ids"] = ["Q" + i[1:] for i in b["ids"]]
    ref = {}
    for name, arrays in (("A", a), ("B", b)):
        p = write_store(tmp_path / f"{name}.h5", **arrays)
        ref[name] = (arrays, hashlib.sha256(p.read_bytes()).hexdigest())
    out = tmp_path / "s.h5"
    write_store(out, **a)
    proc = child(WRITER.format(tests=tests, out=str(out)))
    try:
        wait_for(proc, "writing")
        seen = {"A": 0, "B": 0}
        end = time.monotonic() + 3.0
        while time.monotonic() < end or min(seen.values()) == 0:
            s = open_store(out)
            name = "A" if s.ids[0].startswith("P") else "B"
            arrays, fp = ref[name]
            np.testing.assert_array_equal(s.embeddings, arrays["embeddings"])
            np.testing.assert_array_equal(s.labels, arrays["labels"])
            assert list(s.ids) == list(arrays["ids"])
            assert s.fingerprint == fp  # the fingerprint of the bytes read, not of a newer file
            seen[name] += 1
            assert time.monotonic() < end + 30, f"the reader saw only {seen}"
        assert proc.poll() is None, "the writer died"
    finally:
        kill9(proc)
    assert sum(seen.values()) > 20


@pytest.mark.slow
def test_two_runs_differing_in_a_setting_share_a_stage_safely(tmp_path: Path) -> None:
    """Two `lymph run` on one artifacts folder, differing in a head setting; the second
    starts while the first is writing the embed stage (the stage both need). The second
    waits on the stage's lock (it says so), then reuses the first's complete stage: one
    embed folder, a valid store, both runs succeed with their own head stage."""
    from reliability_helpers import SIZE, child_stderr, make_tiny, slowed_child

    data = make_tiny(tmp_path / "data")
    pipe = tmp_path / "p.toml"
    pipe.write_text(f"[ingest]\nsize = {SIZE}\n"
                    '[embed]\nepochs = 2\ndim = 4\nbatch_size = 8\ndevice = "cpu"\n'
                    "[head]\nmax_epochs = 3\npatience = 2\nfolds = 2\nbatch_size = 8\n"
                    "[compare]\nenabled = false\n")
    art = tmp_path / "artifacts"
    runs = []
    for k, seed in enumerate((0, 1)):
        work = tmp_path / f"w{k}"
        work.mkdir()
        args = ["run", pipe, "--data", data, "--artifacts", art, "--set", f"head.seed={seed}"]
        proc, _ = slowed_child(work, args, "lymph.encoder.train", "train_step", 1.5)
        runs.append(proc)
        if k == 0:
            wait_for(proc, "BUSY", timeout=120)  # the first is inside the embed stage
    for proc in runs:
        assert proc.wait(timeout=300) == 0, child_stderr(proc)[-3000:]
    first, second = (child_stderr(p) for p in runs)
    assert "another lymph run is writing this stage; waiting" in second, second
    assert "[embed] cached" in second and "[embed] ran" in first, second
    embeds = [d for d in (art / "embed").iterdir() if d.is_dir()]
    assert len(embeds) == 1
    s = open_store(embeds[0] / "store.h5")
    assert np.isfinite(s.embeddings).all()
    heads = [d for d in (art / "head").iterdir() if d.is_dir()]
    assert len(heads) == 2 and all((d / "stage.json").is_file() for d in heads)
    assert not [p for p in art.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
