"""Contrastive stage one (SimCLR): augmentations, loss, store, --data, the combination."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lymph.cli import app
from lymph.data.cache import open_cache
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint
from lymph.encoder.methods.contrastive import ContrastiveConfig, ContrastiveNet, augment_views, nt_xent
from lymph.encoder.run import embed_dataset, run_embed
from lymph.encoder.registry import get_method
from lymph.store import open_store

runner = CliRunner()
# a small net for the synthetic 32 px images (the default widths work too, just slower)
SMALL = dict(dim=16, channels=(8, 16, 32, 32), proj_hidden=32, proj_dim=16)
TRAIN = ["--epochs", "1", "--batch-size", "32", "--dim", "16", "--device", "cpu",
         "--size", "32", "--crop", "40"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One torch thread: on the shared 2-core machine, tiny ops on 2 threads are far slower."""
    monkeypatch.setattr(D, "cpu_cores", lambda: 1)
    torch.set_num_threads(1)


def test_augment_views_keep_shape_dtype_device_and_are_seeded(synth_cache: Path) -> None:
    px = torch.from_numpy(open_cache(synth_cache).read(0, 12))  # (12, 3, 32, 32) uint8
    cfg = ContrastiveConfig(size=32)
    a = augment_views(px, cfg, torch.Generator().manual_seed(5))
    b = augment_views(px, cfg, torch.Generator().manual_seed(5))
    c = augment_views(px, cfg, torch.Generator().manual_seed(6))
    assert a.shape == px.shape and a.dtype == torch.float32 and a.device == px.device
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed, same views
    assert not torch.equal(a, c)
    assert not torch.allclose(a, px.float() / 255, atol=0.05)  # a view differs from the image
    # neutral colour and blur settings keep the image's mean brightness
    ident = ContrastiveConfig(size=32, scale=(1.0, 1.0), shift=0.0, brightness=0.0, contrast=0.0,
                              saturation=0.0, hue=0.0, blur_p=0.0)
    out = augment_views(px, ident, torch.Generator().manual_seed(0))
    assert abs(float(out.mean()) - float(px.float().mean() / 255)) < 0.02


def test_nt_xent_chance_and_perfect() -> None:
    torch.manual_seed(0)
    b = 16
    rand = nt_xent(torch.randn(2 * b, 32), 0.5)
    assert abs(float(rand) - math.log(2 * b - 1)) < 0.5  # chance: log(2B - 1)
    e = torch.eye(32)[:b] * 10
    assert float(nt_xent(torch.cat([e, e]), 0.1)) < 2e-3  # log(1 + 30 e^-10): partners match
    with pytest.raises(ValueError):
        nt_xent(torch.randn(5, 4), 0.5)


def test_features_drop_the_projection_head() -> None:
    cfg = ContrastiveConfig(size=32, **SMALL)
    net = ContrastiveNet(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = get_method("contrastive").features(net, x)
        z = net(x)
    assert f.shape == (3, cfg.dim) and z.shape == (3, cfg.proj_dim)
    torch.testing.assert_close(f, net.backbone(x))
    assert ContrastiveConfig.from_dict(cfg.to_dict()) == cfg


def test_loss_decreases_on_synthetic_cells(synth_cache: Path, tmp_path: Path) -> None:
    from lymph.encoder.train import TrainConfig, train

    res = train(open_cache(synth_cache), tmp_path / "c.pt", method="contrastive",
                model_config=ContrastiveConfig(size=32, **SMALL),
                config=TrainConfig(epochs=5, batch_size=32, lr=3e-3, precision="fp32"),
                device="cpu", progress=False)
    assert len(res.losses) == 5 and all(np.isfinite(res.losses))
    assert res.losses[-1] < res.losses[0] - 0.2, res.losses


@pytest.fixture(scope="module")
def con_store(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lymph embed --method contrastive --data ... --size 32 --crop 40` (1 epoch)."""
    D.cpu_cores, saved = (lambda: 1), D.cpu_cores  # module scope: the autouse patch is not active
    try:
        out = tmp_path_factory.mktemp("con") / "con.h5"
        s = run_embed(out=out, data=synth_data, method="contrastive", dim=16, epochs=1,
                      batch_size=32, size=32, crop=40, device="cpu", progress=False)
        assert s.store == out and s.dim == 16
        return out
    finally:
        D.cpu_cores = saved


def test_contrastive_store_and_embed_dataset_recomputes_it(con_store: Path, synth_data: Path,
                                                           tmp_path: Path) -> None:
    s = open_store(con_store)
    assert s.dim == 16 and np.isfinite(s.embeddings).all()
    assert s.provenance["method"] == "contrastive"
    ck = load_checkpoint(con_store.with_name("con.encoder.pt"))
    assert ck["cache"] == {"size": 32, "crop": 40}  # how --data is to be ingested again
    assert ck["train_config"]["batch_size"] == 32 and ck["train_config"]["weight_decay"] == 1e-6
    again = embed_dataset(synth_data, con_store.with_name("con.encoder.pt"), tmp_path / "p.h5",
                          work_dir=tmp_path / "w", device="cpu")
    np.testing.assert_array_equal(open_store(again).embeddings, s.embeddings)


def test_combination_store_model_dir_and_predict_data(synth_data: Path, tmp_path: Path) -> None:
    from lymph.head.fit import fit_head
    from lymph.head.predict import predict

    out = tmp_path / "cm.h5"
    r = runner.invoke(app, ["embed", "--method", "contrastive+morphometry", "--data",
                            str(synth_data), "--out", str(out), *TRAIN])
    assert r.exit_code == 0, r.output
    s = open_store(out)
    cols = s.feature_columns
    assert s.dim == 16 + 33 and len(cols) == s.dim
    assert cols[:2] == ["con:0", "con:1"] and "morph:nucleus_area" in cols
    assert all(c.startswith("con:") for c in cols[:16])
    assert all(c.startswith("morph:") for c in cols[16:])
    np.testing.assert_array_equal(s.embeddings[:, :16], open_store(tmp_path / "cm.contrastive.h5").embeddings)
    np.testing.assert_array_equal(s.embeddings[:, 16:], open_store(tmp_path / "cm.morphometry.h5").embeddings)
    # each part on its own cache: contrastive at 32 px (crop 40), morphometry whole at 112 px
    assert open_cache(tmp_path / "cm.contrastive.images-32px.zarr").crop == 40
    assert open_cache(tmp_path / "cm.morphometry.images-112px.zarr").crop is None
    combined = tmp_path / "cm.encoder.pt"
    ck = load_checkpoint(combined)
    assert ck["method"] == "contrastive+morphometry"
    assert [p["method"] for p in ck["parts"]] == ["contrastive", "morphometry"]
    assert s.provenance["encoder_checkpoint"] == str(combined.resolve())

    # a model directory made from it is self-contained: predict --data == predict --store
    fit_head(out, out=tmp_path / "model", folds=2, max_epochs=4, patience=2)
    moved = tmp_path / "moved" / "model"
    shutil.move(tmp_path / "model", moved)
    assert (moved / "encoder" / combined.name).is_file()
    for f in (combined, tmp_path / "cm.contrastive.encoder.pt"):
        f.unlink()  # the model directory must not need the originals
    by_store = predict(moved, tmp_path / "s.csv", store=out)
    by_data = predict(moved, tmp_path / "d.csv", data=synth_data, device="cpu")
    np.testing.assert_array_equal(open_store(by_data.store_path).embeddings, s.embeddings)
    np.testing.assert_allclose(by_data.probability, by_store.probability, rtol=0, atol=1e-6)

    # embedding again with the combined checkpoint (the model directory's copy) reuses it
    r = runner.invoke(app, ["embed", "--encoder", str(moved / "encoder" / combined.name),
                            "--images", str(tmp_path / "cm.contrastive.images-32px.zarr"),
                            "--out", str(tmp_path / "again.h5"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(open_store(tmp_path / "again.h5").embeddings[:, :16],
                                  s.embeddings[:, :16])


@pytest.mark.parametrize("args, message", [
    (["--method", "contrastive+contrastive"], "distinct methods"),
    (["--method", "contrastive+nope"], "expected one of"),
    (["--method", "contrastive+morphometry", "--folds", "3"], "--folds"),
])
def test_combination_errors(args: list[str], message: str, synth_cache: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["embed", "--images", str(synth_cache), "--out",
                            str(tmp_path / "x.h5"), *args])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
