"""Corrupted artifacts: flipped bytes, truncation, a future format version, pickles.

Every corruption is refused with a clear error (a :class:`LymphError`; exit code 1 from the
CLI, no traceback); no flipped byte is ever accepted as different content; nothing a file
holds is executed (checkpoints and head weights load with ``weights_only=True``; stores
hold only number arrays, strings and JSON).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import make_bags
from lymph.atomic import sha256_file
from lymph.encoder.checkpoint import load_checkpoint
from lymph.errors import LymphError
from lymph.store import open_store, write_store
from reliability_helpers import HEAD, SIZE, TRAIN, cli, train_tiny


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with every optional part (image paths, feature columns, provenance)."""
    d = tmp_path_factory.mktemp("corrupt")
    a = make_bags(n_patients=12, dim=4, sizes=(2, 6))
    n = int(a["patient_ptr"][-1])
    return write_store(d / "s.h5", **a, image_paths=[f"/data/P{i}/{i:06d}.jpg" for i in range(n)],
                       feature_columns=[f"ae:{j}" for j in range(4)],
                       provenance={"method": "ae", "encoder_sha256": "ab" * 32})


def same_content(a, b) -> bool:
    return (np.array_equal(a.embeddings, b.embeddings)
            and np.array_equal(a.patient_ptr, b.patient_ptr)
            and list(a.ids) == list(b.ids) and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.clinical, b.clinical) and a.clinical_columns == b.clinical_columns
            and a.feature_columns == b.feature_columns and a.provenance == b.provenance
            and list(a.image_paths) == list(b.image_paths))


def flipped(src: Path, dst: Path, offset: int, mask: int = 0x01) -> Path:
    raw = bytearray(src.read_bytes())
    raw[offset] ^= mask
    dst.write_bytes(bytes(raw))
    return dst


def _offsets(path: Path) -> dict[str, int]:
    """File offsets of one byte in each part of the store's content."""
    raw = path.read_bytes()
    with h5py.File(path, "r") as f:
        out = {
            "embeddings": f["embeddings"].id.get_chunk_info(0).byte_offset + 5,
            "patient_ptr": f["patient_ptr"].id.get_offset() + 8,  # second offset, low byte
            "label": f["patients/label"].id.get_offset() + 3,
            "clinical": f["patients/clinical"].id.get_offset() + 6,
        }
    for part, needle in (("patient id", b"P11"), ("image path", b"/data/P7/"),
                         ("provenance", b'"method"'), ("feature columns", b"ae:3"),
                         ("clinical columns", b"c2")):
        assert raw.count(needle) >= 1, part
        out[part] = raw.index(needle) + len(needle) - 1
    return out


PARTS = ["embeddings", "patient_ptr", "label", "clinical", "patient id", "image path",
         "provenance", "feature columns", "clinical columns"]


@pytest.mark.parametrize("part", PARTS)
def test_flipped_byte_in_each_part_is_refused(store: Path, tmp_path: Path, part: str) -> None:
    bad = flipped(store, tmp_path / "f.h5", _offsets(store)[part])
    with pytest.raises(LymphError, match="corrupt"):
        open_store(bad)


@pytest.mark.parametrize("seed", range(4))
def test_random_flipped_bytes_are_refused_or_harmless(store: Path, tmp_path: Path,
                                                       seed: int) -> None:
    """A byte flipped anywhere: a LymphError, or (in unused space) the very same content."""
    ref = open_store(store)
    size = store.stat().st_size
    rng = random.Random(seed)
    refused = 0
    for _ in range(40):
        off, mask = rng.randrange(size), 1 << rng.randrange(8)
        bad = flipped(store, tmp_path / "f.h5", off, mask)
        try:
            s = open_store(bad)
        except LymphError:
            refused += 1
            continue
        assert same_content(s, ref), f"byte {off} (mask {mask:#x}) changed the content unnoticed"
    assert refused > 0


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.7, 0.999])
def test_truncated_store_is_refused(store: Path, tmp_path: Path, fraction: float) -> None:
    raw = store.read_bytes()
    bad = tmp_path / "t.h5"
    bad.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(LymphError, match="store"):
        open_store(bad)


def test_truncated_store_refused_by_cli(store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "t.h5"
    bad.write_bytes(store.read_bytes()[:-100])
    r = cli("fit-head", "--store", bad, *HEAD)
    assert r.exit_code == 1 and r.output.startswith("error: ") and "Traceback" not in r.output


@pytest.fixture(scope="module")
def future(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bad = tmp_path_factory.mktemp("future") / "v2.h5"
    bad.write_bytes(store.read_bytes())
    with h5py.File(bad, "r+") as f:
        f.attrs["encoding-version"] = "2"
    return bad


@pytest.mark.parametrize("command", ["fit-head", "compare-baselines", "predict", "store-info"])
def test_future_format_version_refused_by_every_reader(future: Path, tmp_path: Path,
                                                       command: str) -> None:
    args = {"fit-head": ["fit-head", "--store", future, *HEAD],
            "compare-baselines": ["compare-baselines", "--store", future, "--folds", "2"],
            "predict": ["predict", "--model", tmp_path / "m", "--store", future,
                        "--out", tmp_path / "p.csv"],
            "store-info": ["store", "info", future]}[command]
    if command == "predict":  # a real model directory, so that the store is what is refused
        ok = write_store(tmp_path / "ok.h5", **make_bags(n_patients=12, dim=4, sizes=(2, 6)))
        assert cli("fit-head", "--store", ok, "--out", tmp_path / "m", *HEAD).exit_code == 0
    r = cli(*args)
    assert r.exit_code == 1, r.output
    assert "encoding-version' is '2'" in r.output and "Upgrade lymph" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "p.csv").exists()


def test_stores_hold_no_pickles(store: Path) -> None:
    """Every dataset and attribute is numbers or strings (no object / opaque / pickled bytes)."""
    def check(obj: h5py.HLObject) -> None:
        for k, v in obj.attrs.items():
            assert isinstance(v, (str, bytes, np.ndarray, np.generic)), (obj.name, k)
            if isinstance(v, np.ndarray) and v.dtype == object:  # h5py's string arrays
                assert all(isinstance(x, (str, bytes)) for x in v.ravel()), (obj.name, k)
            elif isinstance(v, np.ndarray):
                assert v.dtype.kind in "iufSU", (obj.name, k, v.dtype)
    with h5py.File(store, "r") as f:
        check(f)

        def visit(name: str, obj: h5py.HLObject) -> None:
            check(obj)
            if isinstance(obj, h5py.Dataset):
                kind = obj.dtype.kind
                assert kind in "iuf" or h5py.check_string_dtype(obj.dtype), (name, obj.dtype)
        f.visititems(visit)


# ---- checkpoints and model directories: nothing in a file is executed ----------------------
class Payload:
    """Unpickling this creates a folder: the proof that a file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_tiny(tmp_path_factory.mktemp("ckpt"), "s.h5")


def evil_checkpoint(src: Path, dst: Path, marker: Path) -> Path:
    """A real checkpoint with one extra pickled object in it."""
    ck = torch.load(src, weights_only=True)
    ck["note"] = Payload(marker)
    torch.save(ck, dst)
    return dst


def test_checkpoint_with_pickled_object_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "EXECUTED"
    evil = evil_checkpoint(trained["encoder"], tmp_path / "evil.pt", marker)
    with pytest.raises(LymphError, match="not a loadable encoder checkpoint"):
        load_checkpoint(evil)
    r = cli("embed", "--data", trained["data"], "--out", tmp_path / "e.h5", "--encoder", evil,
            "--device", "cpu")
    assert r.exit_code == 1 and "not a loadable encoder checkpoint" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "e.h5").exists()
    # `embed --resume` finds it where its own checkpoint would be
    evil_checkpoint(trained["encoder"], tmp_path / "r.encoder.pt", marker)
    r = cli("embed", "--data", trained["data"], "--out", tmp_path / "r.h5", "--size", SIZE,
            *TRAIN, "--resume")
    assert r.exit_code == 1 and "not a loadable encoder checkpoint" in r.output, r.output
    assert not marker.exists()


def test_checkpoint_with_non_finite_weights_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    # a diverged training's NaN weights would make every embedding, every prediction, NaN
    ck = torch.load(trained["encoder"], weights_only=True)
    name = next(k for k, t in ck["model"].items() if t.is_floating_point() and t.numel() > 1)
    t = ck["model"][name].clone().contiguous()
    t.view(-1)[1] = float("nan")
    ck["model"][name] = t
    torch.save(ck, tmp_path / "nan.pt")
    with pytest.raises(LymphError, match=f"tensor model.{name} holds NaN or infinite"):
        load_checkpoint(tmp_path / "nan.pt")
    r = cli("embed", "--data", trained["data"], "--out", tmp_path / "e.h5", "--encoder",
            tmp_path / "nan.pt", "--device", "cpu")
    assert r.exit_code == 1 and "NaN or infinite" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "e.h5").exists()
    ck = torch.load(trained["encoder"], weights_only=True)
    ck["normalisation"]["std"][0] = float("inf")
    torch.save(ck, tmp_path / "inf.pt")
    with pytest.raises(LymphError, match="'normalisation.std': expected finite"):
        load_checkpoint(tmp_path / "inf.pt")
    load_checkpoint(trained["encoder"])  # the real one loads


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_model_dir_with_pickled_head_weights_refused(trained: dict[str, Path],
                                                     tmp_path: Path) -> None:
    marker = tmp_path / "EXECUTED"
    model = _copy_model(trained["model"], tmp_path / "model")
    state = torch.load(model / "head.pt", weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, model / "head.pt")
    meta = json.loads((model / "model.json").read_text())  # a consistent forgery: sha updated
    meta["weights"]["sha256"] = sha256_file(model / "head.pt")
    (model / "model.json").write_text(json.dumps(meta))
    r = cli("predict", "--model", model, "--store", trained["store"], "--out", tmp_path / "p.csv")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "head.pt" in r.output
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_model_dir_with_pickled_encoder_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "EXECUTED"
    model = _copy_model(trained["model"], tmp_path / "model")
    enc = model / json.loads((model / "model.json").read_text())["encoder"]["file"]
    evil_checkpoint(enc, enc, marker)
    r = cli("predict", "--model", model, "--data", trained["data"], "--out", tmp_path / "p.csv",
            "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and enc.name in r.output
    assert not marker.exists()
    assert not list(tmp_path.glob("p*.csv")) and not list(tmp_path.glob("*.h5"))


@pytest.mark.parametrize("file", ["head.pt", "encoder"])
def test_model_dir_with_flipped_byte_refused(trained: dict[str, Path], tmp_path: Path,
                                             file: str) -> None:
    model = _copy_model(trained["model"], tmp_path / "model")
    meta = json.loads((model / "model.json").read_text())
    target = model / ("head.pt" if file == "head.pt" else meta["encoder"]["file"])
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    target.write_bytes(bytes(raw))
    r = cli("predict", "--model", model, "--data", trained["data"], "--out", tmp_path / "p.csv",
            "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "sha256" in r.output
    assert not list(tmp_path.glob("p*"))
