"""`lymph embed`: train + embed through the CLI, reuse of an encoder, the public API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lymph.cli import app
from lymph.data.cache import open_cache
from lymph.encoder.embed import embed_cache
from lymph.encoder.run import embed_dataset
from lymph.store import open_store

runner = CliRunner()
TRAIN = ["--epochs", "1", "--batch-size", "16", "--dim", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lymph embed --images CACHE --out ae.h5` (1 epoch): the store; its encoder beside it."""
    out = tmp_path_factory.mktemp("embed") / "ae.h5"
    r = runner.invoke(app, ["embed", "--images", str(synth_cache), "--out", str(out), *TRAIN])
    assert r.exit_code == 0, r.output
    assert "saved encoder checkpoint to" in r.output and str(out.with_name("ae.encoder.pt")) in r.output
    return out


def test_embed_trains_and_writes_a_full_store(trained: Path, synth_cache: Path) -> None:
    cache = open_cache(synth_cache)
    s = open_store(trained)
    assert s.embeddings.shape == (cache.n_images, 8)
    assert np.isfinite(s.embeddings).all()
    np.testing.assert_array_equal(s.patient_ptr, cache.patient_ptr)
    assert list(s.ids) == cache.ids
    np.testing.assert_array_equal(s.labels, cache.labels)
    clin, cols = cache.clinical()
    np.testing.assert_array_equal(s.clinical, clin)
    assert s.clinical_columns == cols
    assert list(s.image_paths) == cache.paths
    p = s.provenance
    for key in ("method", "encoder_checkpoint", "encoder_sha256", "data_fingerprint",
                "lymph_version", "config", "dim"):
        assert key in p, key
    ckpt = trained.with_name("ae.encoder.pt")
    assert p["method"] == "ae" and p["dim"] == 8
    assert p["encoder_checkpoint"] == str(ckpt.resolve())
    assert p["data_fingerprint"] == cache.fingerprint
    assert trained.with_name("ae.encoder.loss.png").is_file()


def test_encoder_reuse_gives_identical_embeddings(trained: Path, synth_cache: Path,
                                                  tmp_path: Path) -> None:
    ckpt = trained.with_name("ae.encoder.pt")
    out = tmp_path / "again.h5"
    r = runner.invoke(app, ["embed", "--images", str(synth_cache), "--out", str(out),
                            "--encoder", str(ckpt), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "using encoder" in r.output and not out.with_name("again.encoder.pt").exists()
    np.testing.assert_array_equal(open_store(out).embeddings, open_store(trained).embeddings)
    # the Python API gives the same
    api = embed_cache(open_cache(synth_cache), ckpt, tmp_path / "api.h5", device="cpu",
                      progress=False)
    np.testing.assert_array_equal(open_store(api).embeddings, open_store(trained).embeddings)


def test_embed_dataset_ingests_with_the_encoder_settings(trained: Path, synth_data: Path,
                                                         tmp_path: Path) -> None:
    ckpt = trained.with_name("ae.encoder.pt")
    out = embed_dataset(synth_data, ckpt, tmp_path / "new.h5", work_dir=tmp_path / "work",
                        device="cpu")
    assert (tmp_path / "work" / "new.images-32px.zarr").is_dir()  # 32 px: the encoder's size
    np.testing.assert_allclose(open_store(out).embeddings, open_store(trained).embeddings,
                               rtol=0, atol=0)


def test_embed_from_data_ingests_beside_the_store(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.h5"
    r = runner.invoke(app, ["embed", "--data", str(synth_data), "--size", "32", "--out", str(out),
                            *TRAIN])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d.images-32px.zarr").is_dir()
    assert open_store(out).n_images == open_cache(tmp_path / "d.images-32px.zarr").n_images
    # second run with --resume: training already complete, the cache is reused
    r = runner.invoke(app, ["embed", "--data", str(synth_data), "--size", "32", "--out", str(out),
                            "--resume", *TRAIN])
    assert r.exit_code == 0, r.output
    assert "up to date, reused" in r.output and "trained ae for 0 epoch(s)" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "x.h5"], "exactly one of --data"),
        (["--out", "x.h5", "--images", "a.zarr", "--data", "d"], "exactly one of --data"),
        (["--out", "x.h5", "--images", "{cache}", "--method", "vae"], "--method: expected one of"),
        (["--out", "x.h5", "--images", "{cache}", "--epochs", "0"], "--epochs"),
        (["--out", "x.h5", "--images", "{cache}", "--device", "tpu"], "--device"),
        (["--out", "x.h5", "--images", "{cache}", "--encoder", "missing.pt"], "not found"),
        (["--out", "x.h5", "--images", "{cache}", "--encoder", "e.pt", "--resume"], "--resume"),
    ],
)
def test_embed_errors_are_one_line(args: list[str], message: str, synth_cache: Path,
                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{cache}", str(synth_cache)) for a in args]
    r = runner.invoke(app, ["embed", *args])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output


def test_encoder_trained_on_other_size_is_refused(trained: Path, synth_data: Path,
                                                  tmp_path: Path) -> None:
    from lymph.data.cache import ingest

    ingest(synth_data, tmp_path / "c16.zarr", size=16, workers=1)
    r = runner.invoke(app, ["embed", "--images", str(tmp_path / "c16.zarr"), "--out",
                            str(tmp_path / "x.h5"), "--encoder", str(trained.with_name("ae.encoder.pt"))])
    assert r.exit_code == 1 and "trained on 32 px" in r.output and "--size 32" in r.output
