"""The torchrun path with 2-4 CPU processes (gloo) on the tiny synthetic cache (issue 19):
steps and provenance equal to one process's, --resume, a failing rank ending every rank
promptly with its message (also on a simulated second machine), ranks that do not see
rank 0's files (a second machine without a shared folder), and the refusals (--data
without a shared cache folder, --device cuda:N)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lymph.data.cache import open_cache
from lymph.store import open_store

ENTRY = str(Path(__file__).with_name("distributed_entry.py"))
PROMPT_S = 60  # "promptly": far below any collective timeout (30 min), above 2-core start-up


def launch(nproc: int, *args: str, cwd: Path, extra_env: dict[str, str] | None = None,
           torchrun: tuple[str, ...] = ("--standalone",)) -> subprocess.Popen[str]:
    # torchrun's own logs go beside the test's folder (pytest removes it), not into a
    # /tmp/torchelastic_* folder that torchrun never deletes
    logs = cwd.parent / f"{cwd.name}-torchrun-logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun, "--log-dir", str(logs),
           "--nproc_per_node", str(nproc), ENTRY, "embed", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def run(nproc: int, *args: str, cwd: Path, **kw: object) -> tuple[int, str, str]:
    return finish(launch(nproc, *args, cwd=cwd, **kw))  # type: ignore[arg-type]


def errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def test_four_processes_take_the_single_process_steps(synth_cache: Path, tmp_path: Path) -> None:
    """Global batch 12 split over 4 ranks; the short last batch leaves ranks without images
    (they step with weight 0). Steps per epoch as for one process; every rank stays in
    step to the end (the store is written)."""
    n = open_cache(synth_cache).n_images
    assert n % 12 < 8  # the last batch has fewer than 2 images per rank
    rc, out, err = run(4, "--images", str(synth_cache), "--out", "four.h5", "--epochs", "2",
                       "--batch-size", "12", "--dim", "8", "--device", "cpu", cwd=tmp_path)
    assert rc == 0, out + err
    prov = open_store(tmp_path / "four.h5").provenance
    assert prov["world_size"] == 4
    assert prov["steps_per_epoch"] == -(-n // 12)  # what one process takes (test_distributed)
    assert "4 process(es)" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tokens, no temps


def test_three_process_weak_scorers_take_the_single_process_steps(synth_cache: Path,
                                                                   tmp_path: Path) -> None:
    """The weak method trains on a subset of the images (its fold's patients): steps per
    epoch are still those of one process on that subset, and the store is fold-safe."""
    from lymph.encoder.weak_checks import check_fold_safety

    rc, out, err = run(3, "--images", str(synth_cache), "--out", "weak.h5", "--method", "weak",
                       "--folds", "2", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                       cwd=tmp_path)
    assert rc == 0, out + err
    cache = open_cache(synth_cache)
    store = open_store(tmp_path / "weak.h5")
    check_fold_safety(store)
    final_rows = int(sum(np.diff(cache.patient_ptr)[cache.labels >= 0]))  # all labelled
    assert store.provenance["steps_per_epoch"] == -(-final_rows // 16)
    assert store.provenance["world_size"] == 3


def test_two_process_resume_continues_like_an_uninterrupted_run(synth_cache: Path,
                                                                tmp_path: Path) -> None:
    """Rank 1 runs as on a second machine that does not see the checkpoint (a relative
    --out, resolved in another folder): rank 0 decides to resume and sends its state."""
    common = ("--images", str(synth_cache), "--batch-size", "16", "--dim", "8", "--device", "cpu")
    own = {"LYMPH_TEST_OWN_FOLDER": "1"}
    rc, out, err = run(2, *common, "--out", "straight.h5", "--epochs", "2", cwd=tmp_path)
    assert rc == 0, out + err
    rc, out, err = run(2, *common, "--out", "resumed.h5", "--epochs", "1", cwd=tmp_path,
                       extra_env=own)
    assert rc == 0, out + err
    rc, out, err = run(2, *common, "--out", "resumed.h5", "--epochs", "2", "--resume",
                       cwd=tmp_path, extra_env=own)
    assert rc == 0, out + err
    assert "trained ae for 1 epoch(s)" in out
    assert not list((tmp_path / "rank1").iterdir())  # rank 1 wrote and saw nothing there
    a, b = open_store(tmp_path / "straight.h5"), open_store(tmp_path / "resumed.h5")
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.provenance["final_loss"] == b.provenance["final_loss"]


@pytest.mark.parametrize("kind", ["error", "crash"])
def test_a_failing_rank_ends_every_rank_promptly_with_its_message(
        synth_cache: Path, tmp_path: Path, kind: str) -> None:
    t0 = time.monotonic()
    rc, _, err = run(2, "--images", str(synth_cache), "--out", "x.h5", "--epochs", "50",
                       "--batch-size", "8", "--dim", "8", "--device", "cpu", cwd=tmp_path,
                       extra_env={"LYMPH_TEST_FAIL_RANK": "1", "LYMPH_TEST_FAIL_KIND": kind})
    assert rc != 0
    assert time.monotonic() - t0 < PROMPT_S
    if kind == "error":
        assert errors(err) == ["error: planted failure on rank 1"]  # once, from rank 1
    else:
        assert "RuntimeError: planted crash on rank 1" in err  # a bug: its traceback
    assert not (tmp_path / "x.h5").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_failure_on_another_machine_stops_this_one(synth_cache: Path, tmp_path: Path) -> None:
    """Two torchrun launchers (--nnodes 2, one process each) as two machines: machine 1's
    rank fails; machine 0's rank stops within seconds and says why, once."""
    port = str(_free_port())
    args = ("--images", str(synth_cache), "--out", "x.h5", "--epochs", "50", "--batch-size",
            "8", "--dim", "8", "--device", "cpu")
    nodes = [launch(1, *args, cwd=tmp_path, extra_env={"LYMPH_TEST_FAIL_RANK": "1"},
                    torchrun=("--nnodes", "2", "--node_rank", str(k), "--master_addr",
                              "127.0.0.1", "--master_port", port)) for k in (0, 1)]
    t0 = time.monotonic()
    (rc0, _, err0), (rc1, _, err1) = finish(nodes[0]), finish(nodes[1])
    assert rc0 != 0 and rc1 != 0
    assert time.monotonic() - t0 < PROMPT_S
    assert errors(err1) == ["error: planted failure on rank 1"]
    assert len(errors(err0)) == 1 and errors(err0)[0].startswith("error: stopped because rank 1 (")
    assert errors(err0)[0].endswith("failed: planted failure on rank 1")


def test_ingesting_without_a_shared_cache_folder_is_refused(synth_data: Path,
                                                            tmp_path: Path) -> None:
    """--data: rank 0 ingests the cache that every rank reads; a rank on a machine that does
    not see its folder (here: the default, beside a relative --out) is named."""
    rc, _, err = run(2, "--data", str(synth_data), "--out", "x.h5", "--epochs", "1",
                     "--device", "cpu", cwd=tmp_path, extra_env={"LYMPH_TEST_OWN_FOLDER": "1"})
    assert rc != 0
    assert len(errors(err)) == 1, err
    assert "rank 1 (" in err and "cannot see the files rank 0" in err and "shared" in err
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".lymph-*"))


def test_long_rank0_work_is_waited_for_without_a_collective_timeout(
        synth_data: Path, tmp_path: Path) -> None:
    """Rank 0 ingests (late by 8 s) and computes morphometry alone, with collectives timing
    out after 3 s: the other rank waits through the store, and the store is the one a
    single process writes."""
    from lymph.encoder.run import run_embed

    rc, out, err = run(2, "--data", str(synth_data), "--out", "m.h5", "--method", "morphometry",
                       "--size", "32", "--device", "cpu", cwd=tmp_path,
                       extra_env={"LYMPH_TEST_SLOW_MAIN": "8", "LYMPH_DIST_TIMEOUT": "3"})
    assert rc == 0, out + err
    one = run_embed(out=tmp_path / "one" / "m.h5", data=synth_data, method="morphometry",
                    size=32, device="cpu", progress=False)
    a, b = open_store(tmp_path / "m.h5"), open_store(one.store)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def test_only_rank0_reads_the_encoder_checkpoint(synth_cache: Path, tmp_path: Path) -> None:
    """A rank whose checkpoint and output folders differ (a relative --encoder and --out,
    resolved on a simulated second machine where they are absent) still embeds: rank 0
    sends the weights and writes the store."""
    from lymph.encoder.embed import embed_cache
    from lymph.encoder.model import AEConfig
    from lymph.encoder.train import TrainConfig, train

    cache = open_cache(synth_cache)
    train(cache, tmp_path / "enc.pt", model_config=AEConfig(dim=8, size=32),
          config=TrainConfig(epochs=1, batch_size=16), device="cpu", progress=False)
    rc, out, err = run(2, "--images", str(synth_cache), "--out", "two.h5",
                       "--encoder", "enc.pt", "--device", "cpu", cwd=tmp_path,
                       extra_env={"LYMPH_TEST_OWN_FOLDER": "1"})
    assert rc == 0, out + err
    assert not (tmp_path / "rank1" / "enc.pt").exists()
    one = open_store(embed_cache(cache, tmp_path / "enc.pt", tmp_path / "one.h5", device="cpu",
                                 progress=False))
    np.testing.assert_allclose(open_store(tmp_path / "two.h5").embeddings, one.embeddings,
                               rtol=1e-5, atol=1e-5)


def test_a_failure_in_rank0_only_work_stops_the_waiting_ranks(tmp_path: Path) -> None:
    """Rank 0 ingests alone (the others wait on the store); its error ends them too."""
    t0 = time.monotonic()
    rc, _, err = run(2, "--data", str(tmp_path / "absent"), "--out", "x.h5", "--device", "cpu",
                     cwd=tmp_path)
    assert rc != 0 and time.monotonic() - t0 < PROMPT_S
    assert len(errors(err)) == 1 and "absent" in errors(err)[0], err


def test_device_cuda_n_under_torchrun_is_refused(synth_cache: Path, tmp_path: Path) -> None:
    rc, _, err = run(2, "--images", str(synth_cache), "--out", "x.h5", "--device", "cuda:1",
                       cwd=tmp_path)
    assert rc != 0
    assert errors(err) == [e for e in errors(err) if "--device cuda:1 under torchrun" in e]
    assert len(errors(err)) == 1
