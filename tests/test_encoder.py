"""Stage one: the autoencoder, augmentation, input pipeline, training loop and checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lymph.data.cache import open_cache
from lymph.encoder import distributed as D
from lymph.encoder.augment import random_dihedral
from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
from lymph.encoder.model import AEConfig, ConvAutoencoder, forward_flops_per_image
from lymph.encoder.feed import ChunkFeeder, epoch_plan
from lymph.encoder.train import TrainConfig, train
from lymph.errors import LymphError

FAST = dict(batch_size=16, lr=3e-3)


def test_model_shapes() -> None:
    m = ConvAutoencoder(AEConfig())
    x = torch.randn(2, 3, 112, 112)
    assert m.encode(x).shape == (2, 60)
    assert m(x).shape == (2, 3, 112, 112)
    small = ConvAutoencoder(AEConfig(dim=8, size=32))
    assert small.encode(torch.randn(5, 3, 32, 32)).shape == (5, 8)
    assert small(torch.randn(5, 3, 32, 32)).shape == (5, 3, 32, 32)
    with pytest.raises(LymphError, match="divisible by 8"):
        ConvAutoencoder(AEConfig(size=100))
    with pytest.raises(LymphError, match="dim"):
        ConvAutoencoder(AEConfig(dim=0))


def test_flops_count_matches_hand_count() -> None:
    # encoder convs: 56^2*16*27 + 28^2*32*144 + 14^2*64*288 MACs, linear 12544*60; decoder mirrors
    enc = 56**2 * 16 * 27 + 28**2 * 32 * 144 + 14**2 * 64 * 288 + 12544 * 60
    dec = 12544 * 60 + 14**2 * 64 * 32 * 9 + 28**2 * 32 * 16 * 9 + 56**2 * 16 * 3 * 9
    assert forward_flops_per_image(ConvAutoencoder(AEConfig()), 112) == 2.0 * (enc + dec)


def test_augment_is_a_dihedral_map_per_image() -> None:
    x = torch.arange(6 * 3 * 4 * 4, dtype=torch.uint8).reshape(6, 3, 4, 4)
    y = random_dihedral(x, torch.Generator().manual_seed(1))
    assert y.dtype == x.dtype and y.shape == x.shape
    for a, b in zip(x, y):
        views = [torch.rot90(v, k, (-2, -1)) for v in (a, a.flip(-1)) for k in range(4)]
        assert any(torch.equal(b, v) for v in views)
    y2 = random_dihedral(x, torch.Generator().manual_seed(1))
    assert torch.equal(y, y2)
    many = random_dihedral(x.repeat(20, 1, 1, 1), torch.Generator().manual_seed(2))
    assert not torch.equal(many, x.repeat(20, 1, 1, 1))


def test_feeder_yields_every_image_once() -> None:
    ids = np.arange(1000)

    def read(a: int, b: int) -> np.ndarray:
        return ids[a:b].copy()

    assert D.blocks(1000, 1, 256)[-1] == (768, 1000)
    plan = epoch_plan(1000, 256, 64, seed=0, epoch=0, buffer=2)
    assert plan.steps == -(-1000 // 64)
    feeder = ChunkFeeder(read, plan, threaded=False)
    got = torch.cat([x for x, _, _ in feeder]).numpy()
    assert sorted(got.tolist()) == list(range(1000))
    assert not np.array_equal(got, ids)  # shuffled


def test_epoch_plan_blocks() -> None:
    # tiny data (embedding): blocks smaller than a chunk so that every rank gets some
    assert D.blocks(100, 2, 256) == [(0, 50), (50, 100)]
    assert D.blocks(100, 2, 256, align=32) == [(0, 64), (64, 100)]


def test_short_training_lowers_loss_and_is_reproducible(synth_cache: Path, tmp_path: Path) -> None:
    cache = open_cache(synth_cache)
    cfg = TrainConfig(epochs=4, seed=1, **FAST)
    a = train(cache, tmp_path / "a.pt", model_config=AEConfig(dim=8, size=32), config=cfg,
              device="cpu", progress=False, loss_curve=tmp_path / "a.png")
    assert len(a.losses) == 4 and a.losses[-1] < 0.8 * a.losses[0]
    assert a.loss_curve is not None and a.loss_curve.stat().st_size > 1000
    b = train(cache, tmp_path / "b.pt", model_config=AEConfig(dim=8, size=32), config=cfg,
              device="cpu", progress=False)
    assert a.losses == b.losses
    wa, wb = load_checkpoint(a.checkpoint)["model"], load_checkpoint(b.checkpoint)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_round_trip(synth_cache: Path, tmp_path: Path) -> None:
    cache = open_cache(synth_cache)
    res = train(cache, tmp_path / "enc.pt", model_config=AEConfig(dim=8, size=32),
                config=TrainConfig(epochs=1, **FAST), device="cpu", progress=False)
    raw = torch.load(res.checkpoint, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "model_config", "train_config", "normalisation", "cache",
                "data_fingerprint", "method", "epoch", "losses", "lymph_version"):
        assert key in raw, key
    assert raw["method"] == "ae" and raw["epoch"] == 1
    assert raw["data_fingerprint"] == cache.fingerprint
    assert raw["cache"] == {"size": 32, "crop": None}
    np.testing.assert_allclose(raw["normalisation"]["mean"], cache.channel_mean)
    model = ConvAutoencoder(AEConfig.from_dict(raw["model_config"]))
    model.load_state_dict(raw["model"])
    assert model.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 8)
    # refused: foreign dicts, wrong versions, garbage
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    with pytest.raises(LymphError, match="not a lymph encoder"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "v9.pt", {**{k: v for k, v in raw.items() if k not in ("format", "version")}})
    ck = torch.load(tmp_path / "v9.pt", weights_only=True)
    ck["version"] = 9
    torch.save(ck, tmp_path / "v9.pt")
    with pytest.raises(LymphError, match="version 9"):
        load_checkpoint(tmp_path / "v9.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LymphError, match="not a loadable"):
        load_checkpoint(tmp_path / "junk.pt")


def test_resume_continues_from_last_epoch(synth_cache: Path, tmp_path: Path) -> None:
    cache = open_cache(synth_cache)
    mc = AEConfig(dim=8, size=32)
    full = train(cache, tmp_path / "full.pt", model_config=mc,
                 config=TrainConfig(epochs=2, **FAST), device="cpu", progress=False)
    part = train(cache, tmp_path / "part.pt", model_config=mc,
                 config=TrainConfig(epochs=1, **FAST), device="cpu", progress=False)
    assert load_checkpoint(part.checkpoint)["epoch"] == 1
    more = train(cache, tmp_path / "part.pt", model_config=mc, config=TrainConfig(epochs=2, **FAST),
                 device="cpu", resume=True, progress=False)
    assert more.epochs_run == 1 and len(more.losses) == 2
    assert more.losses == full.losses
    wf, wp = load_checkpoint(full.checkpoint)["model"], load_checkpoint(more.checkpoint)["model"]
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    with pytest.raises(LymphError, match="resume.*lr"):
        train(cache, tmp_path / "part.pt", model_config=mc,
              config=TrainConfig(epochs=3, batch_size=16, lr=1e-4), device="cpu", resume=True,
              progress=False)
