"""kill -9 of `ingest`, `embed` (training and embedding pass) and `fit-head` at random points.

Each test keeps a previous, complete artifact at the target, starts a child process that
replaces it (slowed down by a monkeypatched step so that the kill lands mid-phase), kills it
with SIGKILL after a random delay (several seeds), then checks: the artifact at the target is
the previous one or a complete new one (never partial); temporary leftovers are never
accepted as artifacts; a rerun completes (`embed --resume` from the last checkpoint, and to
the same result as an uninterrupted run).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest

from lymph.data.cache import ingest, open_cache
from lymph.encoder.checkpoint import load_checkpoint
from lymph.errors import LymphError
from lymph.head.modeldir import load_model
from lymph.store import open_store
from reliability_helpers import (HEAD, SIZE, child, cli, kill9, make_tiny, tmp_leftovers,
                                 wait_for)

pytestmark = pytest.mark.slow
EMBED = ["--dim", "4", "--batch-size", "8", "--device", "cpu", "--seed", "0"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- ingest ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ingest_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("kill-ingest") / "data", images=(5, 6))


def _ingest_child(data: Path, out: Path, *, chunk: int = 4, pause: float = 0.05) -> str:
    """A child that re-ingests ``data`` into ``out`` in chunks of ``chunk`` images, printing
    ``chunk`` after each and pausing ``pause`` s (the whole run then takes ~0.5 s)."""
    return (
        "import time, lymph.data.cache as c\n"
        f"c.CHUNK = {chunk}\n"
        "orig = c._decode_chunk\n"
        "def slow(a):\n"
        f"    r = orig(a); print('chunk', flush=True); time.sleep({pause}); return r\n"
        "c._decode_chunk = slow\n"
        f"c.ingest({str(data)!r}, {str(out)!r}, size={SIZE}, workers=1, force=True)\n"
        "print('done', flush=True)\n"
    )


def _check_cache_folder(folder: Path, name: str, old_fp: str) -> None:
    """The cache at ``folder/name`` is complete; a leftover is refused or the old cache."""
    c = open_cache(folder / name)
    assert c.fingerprint == old_fp  # force=True on unchanged data: same fingerprint
    assert c.read_all().shape == (c.n_images, 3, SIZE, SIZE)
    for p in tmp_leftovers(folder, name):
        try:
            left = open_cache(p)
        except LymphError:
            continue
        # after the swap, the old cache waits under the temporary name to be removed
        assert left.n_images == c.n_images and left.fingerprint == old_fp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_ingest_at_random_point(ingest_data: Path, tmp_path: Path, seed: int) -> None:
    out = tmp_path / "c.zarr"
    old = ingest(ingest_data, out, size=SIZE, workers=1)
    pixels = open_cache(out).read_all()
    fp = open_cache(out).fingerprint
    proc = child(_ingest_child(ingest_data, out))
    wait_for(proc, "chunk")
    time.sleep(random.Random(seed).uniform(0.0, 0.6))
    kill9(proc)
    _check_cache_folder(tmp_path, "c.zarr", fp)
    assert np.array_equal(open_cache(out).read_all(), pixels)
    res = ingest(ingest_data, out, size=SIZE, workers=1, force=True)  # a rerun completes
    assert not res.cached and res.n_images == old.n_images
    assert np.array_equal(open_cache(out).read_all(), pixels)


def test_kill_during_folder_swap_keeps_an_artifact(ingest_data: Path, tmp_path: Path) -> None:
    """The worst moment: the kill lands right after the first rename that touches the target
    while a folder artifact (here the cache) is being replaced."""
    out = tmp_path / "c.zarr"
    ingest(ingest_data, out, size=SIZE, workers=1)
    fp = open_cache(out).fingerprint
    code = (
        "import os, time\n"
        f"target = {str(out)!r}\n"
        "for name in ('rename', 'replace'):\n"
        "    def wrap(orig):\n"
        "        def f(a, b, *k, **kw):\n"
        "            r = orig(a, b, *k, **kw)\n"
        "            if target in (os.fspath(a), os.fspath(b)):\n"
        "                print('swapped', flush=True); time.sleep(60)\n"
        "            return r\n"
        "        return f\n"
        "    setattr(os, name, wrap(getattr(os, name)))\n"
        + _ingest_child(ingest_data, out, chunk=256, pause=0.0)
    )
    proc = child(code)
    line = wait_for(proc, ("swapped", "done"))
    kill9(proc)
    assert line in ("swapped", "done")
    _check_cache_folder(tmp_path, "c.zarr", fp)


# ---- embed -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embed_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A cache, and the store of an uninterrupted 3-epoch training (the reference)."""
    d = tmp_path_factory.mktemp("kill-embed")
    data = make_tiny(d / "data")
    cache = d / "c.zarr"
    ingest(data, cache, size=SIZE, workers=1)
    ref = d / "ref" / "s.h5"
    r = cli("embed", "--images", cache, "--out", ref, "--epochs", "3", *EMBED)
    assert r.exit_code == 0, r.output
    return {"cache": cache, "ref": open_store(ref).embeddings}


def _embed_child(cache: Path, out: Path, epochs: int, *, step_pause: float,
                 embed_pause: float) -> str:
    """`lymph embed` in a child: prints ``epoch N`` after each checkpoint and ``embedding``
    when the embedding pass starts; each training step and the embedding pass are slowed."""
    args = ["embed", "--images", str(cache), "--out", str(out), "--epochs", str(epochs), *EMBED]
    return (
        "import time\n"
        "import lymph.encoder.train as t\n"
        "from lymph.encoder.methods.ae import AutoencoderMethod as A\n"
        "loss, feats, save = A.loss, A.features, t.save_checkpoint\n"
        f"def slow_loss(self, *a):\n    time.sleep({step_pause}); return loss(self, *a)\n"
        "def slow_features(self, *a):\n"
        "    print('embedding', flush=True); r = feats(self, *a)\n"
        f"    time.sleep({embed_pause}); return r\n"
        "def saved(path, ck):\n"
        "    r = save(path, ck); print('epoch', ck['epoch'], flush=True); return r\n"
        "A.loss, A.features, t.save_checkpoint = slow_loss, slow_features, saved\n"
        "from lymph.cli import app\n"
        f"app({args!r})\n"
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_kill_embed_during_training_then_resume(embed_setup: dict, tmp_path: Path,
                                                seed: int) -> None:
    cache, ref = embed_setup["cache"], embed_setup["ref"]
    out = tmp_path / "s.h5"
    ck = tmp_path / "s.encoder.pt"
    r = cli("embed", "--images", cache, "--out", out, "--epochs", "1", *EMBED)  # previous store
    assert r.exit_code == 0, r.output
    before = sha(out)
    # 4 images per step of 8 over ~25 images: ~4 steps an epoch, 0.1 s each
    proc = child(_embed_child(cache, out, 3, step_pause=0.1, embed_pause=0.0))
    wait_for(proc, "epoch 1")
    time.sleep(random.Random(seed).uniform(0.0, 0.8))
    kill9(proc)
    assert sha(out) == before  # the previous store is untouched until the new one is complete
    epoch = int(load_checkpoint(ck)["epoch"])  # the checkpoint is complete, whatever the moment
    assert 1 <= epoch <= 3
    for p in tmp_leftovers(tmp_path, "s.h5"):
        with pytest.raises(LymphError):
            open_store(p)
    r = cli("embed", "--images", cache, "--out", out, "--epochs", "3", "--resume", *EMBED)
    assert r.exit_code == 0, r.output
    assert f"trained ae for {3 - epoch} epoch(s)" in r.output  # continued from the checkpoint
    assert load_checkpoint(ck)["epoch"] == 3
    # ... exactly as the uninterrupted run (the CPU is deterministic)
    np.testing.assert_array_equal(open_store(out).embeddings, ref)


def test_kill_embed_during_embedding_pass_then_rerun(embed_setup: dict, tmp_path: Path) -> None:
    cache = embed_setup["cache"]
    out = tmp_path / "s.h5"
    ck = tmp_path / "s.encoder.pt"
    r = cli("embed", "--images", cache, "--out", out, "--epochs", "1", *EMBED)
    assert r.exit_code == 0, r.output
    before, emb = sha(out), open_store(out).embeddings
    proc = child(_embed_child(cache, out, 1, step_pause=0.0, embed_pause=0.5))
    wait_for(proc, "embedding")
    time.sleep(random.Random(7).uniform(0.0, 0.6))
    kill9(proc)
    s = open_store(out)  # the old store or the complete new one (identical content)
    np.testing.assert_array_equal(s.embeddings, emb)
    if sha(out) != before:
        assert s.provenance["encoder_sha256"] == sha(ck)
    assert load_checkpoint(ck)["epoch"] == 1
    for p in tmp_leftovers(tmp_path, "s.h5"):
        with pytest.raises(LymphError):
            open_store(p)
    r = cli("embed", "--images", cache, "--out", out, "--epochs", "1", "--resume", *EMBED)
    assert r.exit_code == 0, r.output
    assert "trained ae for 0 epoch(s)" in r.output  # training was complete: embedding only
    np.testing.assert_array_equal(open_store(out).embeddings, emb)


# ---- fit-head ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_fit_head_at_random_point(tmp_path: Path, seed: int) -> None:
    from conftest import make_bags
    from lymph.store import write_store

    store = write_store(tmp_path / "s.h5", **make_bags(n_patients=16, dim=4, sizes=(2, 5)))
    model, metrics = tmp_path / "model", tmp_path / "m.json"
    r = cli("fit-head", "--store", store, "--out", model, "--json", metrics, *HEAD)
    assert r.exit_code == 0, r.output
    old_meta = (model / "model.json").read_text()
    old_metrics = metrics.read_text()
    args = ["fit-head", "--store", str(store), "--out", str(model), "--json", str(metrics),
            *HEAD, "--seed", "5"]
    code = (
        "import time\n"
        "from lymph.head.estimator import MILClassifier as M\n"
        "fit = M.fit\n"
        "def slow_fit(self, *a, **k):\n"
        "    print('fit', flush=True); r = fit(self, *a, **k); time.sleep(0.3); return r\n"
        "M.fit = slow_fit\n"
        "from lymph.cli import app\n"
        f"app({args!r})\n"
    )
    proc = child(code)
    wait_for(proc, "fit")
    time.sleep(random.Random(seed).uniform(0.0, 1.2))
    kill9(proc)
    meta = (model / "model.json").read_text()  # the old model or the complete new one
    assert json.loads(meta)["params"]["seed"] in (0, 5)
    load_model(model)
    m = json.loads(metrics.read_text())  # the old metrics or the complete new ones
    assert m["n_patients"] == 16 and (metrics.read_text() == old_metrics or m["seed"] == 5)
    for p in tmp_leftovers(tmp_path, "model"):
        try:
            load_model(p)
        except LymphError:
            continue
        assert (p / "model.json").read_text() in (old_meta, meta)
    r = cli("fit-head", "--store", store, "--out", model, "--json", metrics, *HEAD, "--seed", "5")
    assert r.exit_code == 0, r.output
    assert json.loads(metrics.read_text())["seed"] == 5
    assert re.search(r'"seed": 5', (model / "cv" / "metrics.json").read_text())
