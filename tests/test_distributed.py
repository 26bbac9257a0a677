"""The torchrun path's pieces, in one process: batch semantics, device and precision
choices, fp32 where promised, resume equality (issue 19). The multi-process runs are in
``test_distributed_torchrun.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lymph.data.cache import open_cache
from lymph.encoder import distributed as D
from lymph.encoder import feed as F
from lymph.encoder import train as T
from lymph.encoder.checkpoint import load_checkpoint
from lymph.encoder.embed import exact_fp32
from lymph.encoder.methods.contrastive import nt_xent
from lymph.encoder.methods.weak import WeakConfig
from lymph.encoder.weak_folds import image_targets
from lymph.errors import LymphError


@pytest.mark.parametrize("keep_every", [1, 3])
def test_any_world_takes_the_same_steps_on_the_same_images(keep_every: int) -> None:
    n, chunk, bs = 1000, 64, 48
    keep = np.arange(n) % keep_every == 0
    for epoch in (0, 1):
        plan = F.epoch_plan(n, chunk, bs, seed=5, epoch=epoch, keep=keep, buffer=3)
        batches = [b for _, bb, _ in plan.groups for b in bb]
        assert plan.steps == len(batches) == -(-int(keep.sum()) // bs)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == np.flatnonzero(keep).tolist()  # each image once
        for world in (1, 2, 3, 4, 7):
            for b in batches:
                shares = [F.batch_share(b, r, world) for r in range(world)]
                real = [p for p, w in shares if w > 0]
                np.testing.assert_array_equal(np.concatenate(real), b)  # the whole batch, once
                assert all(len(p) >= 2 for p in real) or len(b) < 2
                assert sum(w for _, w in shares) == pytest.approx(world)
                assert all(len(p) > 0 for p, _ in shares)  # every rank steps (DDP)


def test_short_last_batch_is_split_among_fewer_ranks() -> None:
    b = np.arange(5)
    shares = [F.batch_share(b, r, 4) for r in range(4)]
    assert [len(p) for p, _ in shares[:2]] == [3, 2]
    assert [w for _, w in shares] == [pytest.approx(12 / 5), pytest.approx(8 / 5), 0.0, 0.0]
    assert all(len(p) == 2 for p, _ in shares[2:])  # stand-ins with weight 0


def test_share_weights_give_the_global_batch_gradient() -> None:
    """DDP averages the ranks' gradients: with the share weights that average is the
    gradient of the mean loss over the whole global batch, however unevenly split."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 4, generator=g), torch.randn(11, generator=g)
    w0 = torch.randn(4, generator=g)

    def grad(rows: np.ndarray, weight: float) -> torch.Tensor:
        w = w0.clone().requires_grad_()
        loss = ((x[rows] @ w - y[rows]) ** 2).mean()
        (loss * weight).backward()
        return w.grad  # type: ignore[return-value]

    full = grad(np.arange(11), 1.0)
    for world in (2, 3, 4, 8):
        shares = [F.batch_share(np.arange(11), r, world) for r in range(world)]
        ddp = sum(grad(p, w) for p, w in shares) / world
        torch.testing.assert_close(ddp, full)


def _pixels(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64)[:, None, None, None] % 251).astype(np.uint8) \
        * np.ones((1, 3, 2, 2), dtype=np.uint8)


def test_feeder_from_ram_and_from_chunks_agree() -> None:
    n = 700
    px = _pixels(n)
    plan = F.epoch_plan(n, 64, 40, seed=1, epoch=2, keep=np.arange(n) % 5 != 0, buffer=2)
    targets = np.arange(n, dtype=np.float32)[:, None]
    for world in (1, 3):
        for rank in range(world):
            ram = list(F.ChunkFeeder(F._InRam(px), plan, rank=rank, world=world,
                                     threaded=False, targets=targets))
            chunks = list(F.ChunkFeeder(lambda a, b: px[a:b].copy(), plan, rank=rank,
                                        world=world, threaded=True, targets=targets))
            assert len(ram) == len(chunks) == plan.steps
            for (x1, t1, w1), (x2, t2, w2) in zip(ram, chunks):
                assert torch.equal(x1, x2) and torch.equal(t1, t2) and w1 == w2
                # the targets belong to the images
                assert torch.equal(x1[:, 0, 0, 0], (t1[:, 0].long() % 251).to(torch.uint8))


def test_in_ram_limit_is_shared_by_the_machine_s_processes(synth_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = open_cache(synth_cache)
    size = cache.n_images * 3 * cache.size * cache.size
    monkeypatch.setattr(F, "CACHE_RAM_BYTES", int(size * 1.5))
    assert hasattr(F.cache_reader(cache), "pixels")
    assert not hasattr(F.cache_reader(cache, local_world=2), "pixels")  # 0.75x each: Zarr


def test_torchrun_device_choices_are_checked() -> None:
    with pytest.raises(LymphError, match=r"`device` cuda:1 under torchrun.*`device` cuda"):
        D.check_device("cuda:1", world=2, local_rank=0, local_world=2, n_gpus=4)
    with pytest.raises(LymphError, match="4 processes on this machine but it has 2 visible GPU"):
        D.check_device("cuda", world=8, local_rank=3, local_world=4, n_gpus=2)
    with pytest.raises(LymphError, match="2 processes on this machine but it has 1"):
        D.check_device("auto", world=2, local_rank=0, local_world=2, n_gpus=1)
    D.check_device("cuda:1", world=1, local_rank=0, local_world=1, n_gpus=2)  # one process: fine
    D.check_device("auto", world=4, local_rank=1, local_world=4, n_gpus=0)  # CPU (gloo)
    D.check_device("cuda", world=8, local_rank=3, local_world=4, n_gpus=4)


def test_bf16_only_on_the_chosen_gpu_of_compute_capability_8(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def capability(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return {0: (7, 5), 1: (8, 0)}[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated says yes
    assert T.resolve_precision("auto", torch.device("cuda", 0)) is None  # Turing: fp32
    assert T.resolve_precision("auto", torch.device("cuda", 1)) is torch.bfloat16  # Ampere
    assert [d.index for d in asked] == [0, 1]  # the chosen device, not the current one
    assert T.resolve_precision("fp32", torch.device("cuda", 1)) is None


def test_nt_xent_is_fp32_inside_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(64, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)  # bf16, as the projection head's output in a bf16 step
        inside = nt_xent(z, 0.2)
    outside = nt_xent(z.detach().float(), 0.2)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)


def test_embedding_pass_turns_tf32_off_on_cuda() -> None:
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, mm.fp32_precision)
    with exact_fp32(torch.device("cuda", 0)):  # only flags: no GPU needed
        assert (conv.fp32_precision, mm.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, mm.fp32_precision) == before
    with exact_fp32(torch.device("cpu")):
        assert (conv.fp32_precision, mm.fp32_precision) == before


def test_resumed_weak_training_continues_exactly(synth_cache: Path, tmp_path: Path) -> None:
    """Dropout draws are seeded per epoch (and rank): one epoch + resume == two epochs."""
    cache = open_cache(synth_cache)
    labelled = np.flatnonzero(cache.labels >= 0)
    rows, targets = image_targets(cache.patient_ptr, cache.labels, labelled)
    mcfg = WeakConfig(size=32, channels=(4, 8, 8, 8), dropout=0.5)

    def run(path: Path, epochs: int, resume: bool = False) -> dict:
        cfg = T.TrainConfig(epochs=epochs, batch_size=16, seed=2, weight_decay=1e-4)
        T.train(cache, path, method="weak", model_config=mcfg, config=cfg, device="cpu",
                progress=False, rows=rows, targets=targets, resume=resume)
        return load_checkpoint(path)

    straight = run(tmp_path / "a.pt", 3)
    run(tmp_path / "b.pt", 1)
    resumed = run(tmp_path / "b.pt", 3, resume=True)
    assert resumed["losses"] == straight["losses"]
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert straight["steps_per_epoch"] == -(-rows.size // 16) and straight["world_size"] == 1


_WATCHDOG = r'''
import sys, time
import torch.distributed as dist
from lymph.encoder import distributed as D

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
env = D.DistEnv(rank=1, world=2, local_rank=0, node=0)  # this process plays rank 1 of 2
env._watch = D._Watchdog(env)
t0 = time.monotonic()
try:
    D._store().set(D._FAIL_KEY, "1\x00rank 0 (host-b) failed: boom")  # as rank 0 would
    time.sleep(30)  # busy in Python: the watchdog must interrupt this
    print("not stopped")
except D.RankStopped as e:
    print(f"stopped after {time.monotonic() - t0:.1f} s; quiet={e.quiet}; {e}")
finally:
    D.teardown(env)
    dist.destroy_process_group()
'''


def test_watchdog_stops_this_rank_when_another_failed(tmp_path: Path) -> None:
    """The failure recorded in the rendezvous store by another rank (on another machine)
    reaches this rank's main thread as RankStopped within a couple of seconds, printed
    (local rank 0 of another machine than the failing one)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _WATCHDOG, str(tmp_path / "store")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.endswith("quiet=False; stopped because rank 0 (host-b) failed: boom"), line
    assert float(line.split()[2]) < 5


def test_a_one_image_last_batch_joins_the_previous_one_for_contrastive(synth_cache: Path,
                                                                        tmp_path: Path) -> None:
    """NT-Xent needs 2 images: with ``min_batch`` 2 a 1-image tail is merged (it used to
    crash the run); the feeder's two paths still agree and every image is fed once."""
    # 1000 % 111 == 1 (chunks of 64, buffers of 2 or 16 chunks); 112 % 111 == 1 with the
    # last image alone in the last buffer (merged into the buffer before)
    for n, chunk, buffer in ((1000, 64, 2), (1000, 64, 16), (112, 111, 1)):
        plan = F.epoch_plan(n, chunk, 111, seed=0, epoch=0, buffer=buffer, min_batch=2)
        batches = [b for _, bb, _ in plan.groups for b in bb]
        assert plan.steps == len(batches) == n // 111 and min(len(b) for b in batches) >= 2
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))
        px = _pixels(n)
        for world in (1, 3):
            ram = list(F.ChunkFeeder(F._InRam(px), plan, rank=world - 1, world=world, threaded=False))
            chunks = list(F.ChunkFeeder(lambda a, b, px=px: px[a:b], plan, rank=world - 1, world=world,
                                        threaded=False))
            assert all(torch.equal(a[0], b[0]) for a, b in zip(ram, chunks))
    assert F.epoch_plan(1000, 64, 111, seed=0, epoch=0).steps == 10  # other methods: unchanged
    from lymph.encoder.methods.contrastive import ContrastiveConfig

    cache = open_cache(synth_cache)
    bs = next(b for b in range(9, 40) if cache.n_images % b == 1)
    res = T.train(cache, tmp_path / "c.pt", method="contrastive", device="cpu", progress=False,
                  model_config=ContrastiveConfig(dim=4, size=32, channels=(4, 4, 4, 4),
                                                 proj_hidden=8, proj_dim=4),
                  config=T.TrainConfig(epochs=1, batch_size=bs))
    assert load_checkpoint(res.checkpoint)["steps_per_epoch"] == cache.n_images // bs
