"""The embedding store, format 1: writer, checking reader, frozen files, Python API."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import make_bags
from lymph.errors import LymphError
from lymph.store import open_store, write_store

DATA = Path(__file__).parent / "data"


def test_round_trip_and_api(tmp_path: Path) -> None:
    arrays = make_bags(n_patients=5, dim=3)
    p = write_store(tmp_path / "s.h5", **arrays, image_paths=[f"i{k}" for k in range(int(arrays["patient_ptr"][-1]))],
                    provenance={"method": "ae"})
    s = open_store(p)
    assert np.array_equal(s.embeddings, arrays["embeddings"])
    assert list(s.ids) == arrays["ids"] and s.clinical_columns == arrays["clinical_columns"]
    ptr = arrays["patient_ptr"]
    assert np.array_equal(s.bag("P2"), arrays["embeddings"][ptr[2]:ptr[3]])
    assert s.bag_image_paths("P0") == [f"i{k}" for k in range(ptr[0], ptr[1])]
    sub = s.subset([3, 1])
    assert list(sub.ids) == ["P3", "P1"] and np.array_equal(sub.bag(0), s.bag(3))
    assert s.provenance == {"method": "ae"} and len(s.fingerprint) == 64
    df = s.patients_frame()
    assert list(df.columns[:3]) == ["id", "label", "n_images"] and len(df) == 5


def test_same_input_same_bytes(tmp_path: Path) -> None:
    a = write_store(tmp_path / "a.h5", **make_bags())
    b = write_store(tmp_path / "b.h5", **make_bags())
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_frozen_v1_stores_still_read() -> None:
    s = open_store(DATA / "store-v1-lymph-0.1.0.h5")
    assert list(s.ids) == ["P1", "P2", "P3"] and s.labels.tolist() == [1, 0, -1]
    assert s.bag("P3").shape == (4, 4) and s.clinical_columns[1] == "log_lymph_count"
    m = open_store(DATA / "store-v1-minimal-foreign.h5")
    assert m.clinical.shape == (2, 0) and m.bag("b").shape == (4, 2)
    assert m.image_paths is None and m.provenance == {}


def _mutate(src: Path, dst: Path, fn) -> Path:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda f: f.attrs.__setitem__("encoding-type", "anndata"), "encoding-type"),
        (lambda f: f.attrs.__setitem__("encoding-version", "2"), "Upgrade lymph"),
        (lambda f: f.attrs.__delitem__("encoding-type"), "encoding-type"),
        (lambda f: f.__delitem__("patient_ptr"), "missing required dataset /patient_ptr"),
        (lambda f: (f.__delitem__("patient_ptr"), f.__setitem__("patient_ptr", np.array([0, 2, 9, 7]))),
         "patient_ptr"),
        (lambda f: (f.__delitem__("patients/label"), f["patients"].__setitem__("label", np.array([1, 0], "i1"))),
         "label"),
        (lambda f: (f.__delitem__("patients/label"), f["patients"].__setitem__("label", np.array([1, 0, 3], "i1"))),
         "values in"),
        (lambda f: (f.__delitem__("embeddings"), f.__setitem__("embeddings", np.zeros((7, 4), "f8"))),
         "float32"),
        (lambda f: f["patients/clinical"].attrs.__setitem__("columns", ["a"]), "columns"),
    ],
)
def test_reader_rejects_malformed(tmp_path: Path, mutation, message: str) -> None:
    bad = _mutate(DATA / "store-v1-lymph-0.1.0.h5", tmp_path / "bad.h5", mutation)
    with pytest.raises(LymphError, match=message):
        open_store(bad)


def test_reader_rejects_non_hdf5_truncated_and_flipped(tmp_path: Path) -> None:
    (tmp_path / "t.h5").write_text("hello")
    with pytest.raises(LymphError, match="not a readable HDF5"):
        open_store(tmp_path / "t.h5")
    with pytest.raises(LymphError, match="no such store"):
        open_store(tmp_path / "missing.h5")
    good = write_store(tmp_path / "g.h5", **make_bags(n_patients=30, dim=16))
    raw = good.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LymphError):
        open_store(tmp_path / "trunc.h5")
    # flip one byte inside the embeddings' data chunks
    with h5py.File(good, "r") as f:
        off = f["embeddings"].id.get_chunk_info(0).byte_offset
    flipped = bytearray(raw)
    flipped[off + 40] ^= 0xFF
    (tmp_path / "flip.h5").write_bytes(bytes(flipped))
    with pytest.raises(LymphError, match="corrupt"):
        open_store(tmp_path / "flip.h5")


def test_writer_validates(tmp_path: Path) -> None:
    a = make_bags(n_patients=3)
    a["labels"] = np.array([0, 1, 5])
    with pytest.raises(LymphError, match="label"):
        write_store(tmp_path / "x.h5", **a)
    assert not (tmp_path / "x.h5").exists()
