"""`lymph embed` under torchrun: 2 CPU processes (gloo) on the tiny synthetic cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lymph.data.cache import open_cache
from lymph.encoder.checkpoint import load_checkpoint
from lymph.encoder.embed import embed_cache
from lymph.encoder.model import AEConfig
from lymph.encoder.train import TrainConfig, train
from lymph.store import open_store


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # torchrun's own logs beside the test's folder, not in a /tmp/torchelastic_* it keeps
    logs = cwd.parent / f"{cwd.name}-torchrun-logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--log-dir", str(logs),
           "--nproc_per_node", "2", "-m", "lymph.cli", "embed", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def encoder(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "enc.pt"
    train(open_cache(synth_cache), out, model_config=AEConfig(dim=8, size=32),
          config=TrainConfig(epochs=1, batch_size=16), device="cpu", progress=False)
    return out


def test_two_process_embedding_equals_single_process(synth_cache: Path, encoder: Path,
                                                     tmp_path: Path) -> None:
    cache = open_cache(synth_cache)
    single = open_store(embed_cache(cache, encoder, tmp_path / "one.h5", device="cpu",
                                    progress=False))
    r = torchrun("--images", str(synth_cache), "--out", str(tmp_path / "two.h5"),
                 "--encoder", str(encoder), "--device", "cpu", cwd=tmp_path)
    assert r.stdout.count("wrote ") == 1  # only rank 0 reports (and writes)
    two = open_store(tmp_path / "two.h5")
    assert two.n_images == cache.n_images
    assert list(two.image_paths) == cache.paths  # every image once, in single-process order
    np.testing.assert_array_equal(two.patient_ptr, single.patient_ptr)
    assert list(two.ids) == list(single.ids)
    # values differ only by float rounding (1 vs 2 CPU threads)
    np.testing.assert_allclose(two.embeddings, single.embeddings, rtol=1e-5, atol=1e-5)


def test_two_process_training_writes_one_store(synth_cache: Path, encoder: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "ddp.h5"
    r = torchrun("--images", str(synth_cache), "--out", str(out), "--epochs", "2",
                 "--batch-size", "16", "--dim", "8", "--device", "cpu", cwd=tmp_path)
    assert "2 process(es)" in r.stdout
    cache = open_cache(synth_cache)
    s = open_store(out)
    assert s.embeddings.shape == (cache.n_images, 8) and np.isfinite(s.embeddings).all()
    assert list(s.image_paths) == cache.paths
    assert s.provenance["epochs"] == 2
    # --batch-size is the global batch: the single-process encoder (batch 16) took as many
    # optimiser steps per epoch
    assert s.provenance["world_size"] == 2
    assert s.provenance["steps_per_epoch"] == load_checkpoint(encoder)["steps_per_epoch"]
    assert load_checkpoint(encoder)["world_size"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary files from a second writer
