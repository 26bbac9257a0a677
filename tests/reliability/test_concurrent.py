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
