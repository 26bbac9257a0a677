"""Combining and inspecting stores: `lymph store concat` and `lymph store info`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_bags
from lymph.atomic import sha256_file
from lymph.cli import app
from lymph.errors import LymphError
from lymph.store import open_store, write_store
from lymph.store_ops import concat_stores, store_summary


def _pair(tmp_path: Path, **change: object) -> tuple[Path, Path]:
    """An 'ae' store (dim 4, unnamed columns) and a 'morphometry' store (dim 2, named) of
    the same images; ``change`` overrides arrays of the second one."""
    a = make_bags(n_patients=6, dim=4, seed=1)
    n = int(a["patient_ptr"][-1])
    paths = [f"P{k}/{k:06d}.jpg" for k in range(n)]
    pa = write_store(tmp_path / "ae.h5", **a, image_paths=paths,
                     provenance={"method": "ae", "data_fingerprint": "fp"})
    b = dict(a, embeddings=np.arange(n * 2, dtype=np.float32).reshape(n, 2))
    b.update(image_paths=paths)
    b.update(change)
    pb = write_store(tmp_path / "morph.h5", **b, feature_columns=["nucleus_area", "nc_ratio"],
                     provenance={"method": "morphometry", "data_fingerprint": "fp"})
    return pa, pb


def test_concat_round_trip(tmp_path: Path) -> None:
    pa, pb = _pair(tmp_path)
    out = concat_stores([pa, pb], tmp_path / "both.h5")
    s, a, b = open_store(out), open_store(pa), open_store(pb)
    assert s.dim == 6 and np.array_equal(s.embeddings, np.hstack([a.embeddings, b.embeddings]))
    assert s.feature_columns == ["ae:0", "ae:1", "ae:2", "ae:3",
                                 "morph:nucleus_area", "morph:nc_ratio"]
    assert np.array_equal(s.patient_ptr, a.patient_ptr) and list(s.ids) == list(a.ids)
    assert np.array_equal(s.labels, a.labels) and np.array_equal(s.clinical, a.clinical)
    assert list(s.image_paths) == list(a.image_paths)
    prov = s.provenance
    assert prov["method"] == "concat" and prov["dim"] == 6 and prov["data_fingerprint"] == "fp"
    src = prov["sources"]
    assert [x["sha256"] for x in src] == [sha256_file(pa), sha256_file(pb)]
    assert [x["provenance"]["method"] for x in src] == ["ae", "morphometry"]
    assert [x["columns"] for x in src] == [[0, 4], [4, 6]]
    # concat of a concat keeps the prefixed names; the same method twice gets a new prefix
    again = open_store(concat_stores([out, pb], tmp_path / "again.h5"))
    assert again.feature_columns == s.feature_columns + ["morph2:nucleus_area", "morph2:nc_ratio"]
    twice = open_store(concat_stores([pb, pb], tmp_path / "twice.h5"))
    assert twice.feature_columns == ["morph:nucleus_area", "morph:nc_ratio",
                                     "morph2:nucleus_area", "morph2:nc_ratio"]


@pytest.mark.parametrize(
    "change, field",
    [
        ({"ids": [f"Q{i}" for i in range(6)]}, "/patients/id"),
        ({"image_paths": None}, None),  # absent paths on one side: not compared
        ({"labels": "flip"}, "/patients/label"),
        ({"clinical": "shift"}, "/patients/clinical"),
        ({"image_paths": "swap"}, "/images/path"),
    ],
)
def test_concat_mismatch_names_file_and_field(tmp_path: Path, change: dict,
                                              field: str | None) -> None:
    a = make_bags(n_patients=6, dim=4, seed=1)
    n = int(a["patient_ptr"][-1])
    key, val = next(iter(change.items()))
    if val == "flip":
        change = {key: 1 - a["labels"]}
    elif val == "shift":
        change = {key: a["clinical"] + 1}
    elif val == "swap":
        paths = [f"P{k}/{k:06d}.jpg" for k in range(n)]
        paths[0], paths[1] = paths[1], paths[0]
        change = {key: paths}
    pa, pb = _pair(tmp_path, **change)
    if field is None:
        assert open_store(concat_stores([pa, pb], tmp_path / "c.h5")).image_paths is not None
        return
    with pytest.raises(LymphError) as e:
        concat_stores([pa, pb], tmp_path / "c.h5")
    assert str(pb) in str(e.value) and field in str(e.value) and str(pa) in str(e.value)
    assert not (tmp_path / "c.h5").exists()


def test_concat_different_images(tmp_path: Path) -> None:
    pa, _ = _pair(tmp_path)
    other = make_bags(n_patients=6, dim=2, seed=5)  # same ids, other bag sizes
    pc = write_store(tmp_path / "other.h5", **other)
    with pytest.raises(LymphError, match="/patient_ptr"):
        concat_stores([pa, pc], tmp_path / "c.h5")
    with pytest.raises(LymphError, match="at least 2"):
        concat_stores([pa], tmp_path / "c.h5")
    with pytest.raises(LymphError, match="must not be one of the input"):
        concat_stores([pa, pa], pa)


def test_cli_concat_and_info(tmp_path: Path) -> None:
    pa, pb = _pair(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["store", "concat", str(pa), str(pb), "--out", str(tmp_path / "c.h5")])
    assert r.exit_code == 0, r.output
    assert "dim 6" in r.output and "ae (4)" in r.output and "morph (2)" in r.output
    r = runner.invoke(app, ["store", "info", str(tmp_path / "c.h5")])
    assert r.exit_code == 0, r.output
    assert "concat" in r.output and "morph:nc_ratio" in r.output and "images" in r.output
    summary = store_summary(tmp_path / "c.h5")
    assert summary["patients"] == 6 and summary["dim"] == 6
    r = runner.invoke(app, ["store", "concat", str(pa), str(tmp_path / "nope.h5"), "--out",
                            str(tmp_path / "d.h5")])
    assert r.exit_code == 1 and "nope.h5" in r.output
