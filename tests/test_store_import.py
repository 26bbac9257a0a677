"""`lymph store import`: per-bag .h5/.pt files and instance tables to a format-1 store."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lymph.cli import app
from lymph.errors import LymphError
from lymph.store import open_store
from lymph.store_import import import_store


def bags(n: int = 5, d: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"slide{i}": rng.normal(size=(int(rng.integers(1, 7)), d)).astype(np.float32)
            for i in range(n)}


def write_h5(folder: Path, data: dict[str, np.ndarray], key: str = "features") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for bid, x in data.items():
        with h5py.File(folder / f"{bid}.h5", "w") as f:
            f[key] = x
            f["coords"] = np.zeros((len(x), 2))


def labels_csv(path: Path, rows: list[str], header: str = "id,label,age") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_h5_and_pt_bags_round_trip(tmp_path: Path) -> None:
    data = bags()
    write_h5(tmp_path / "h5", dict(list(data.items())[:3]))
    for bid, x in list(data.items())[3:]:
        torch.save({"features": torch.from_numpy(x)} if bid == "slide3" else torch.from_numpy(x),
                   tmp_path / "h5" / f"{bid}.pt")
    lab = labels_csv(tmp_path / "l.csv", ["slide0,1,50", "slide1,0,61", "slide2,,70",
                                          "slide3,1,40", "slide4,0,33"])
    r = import_store([tmp_path / "h5"], tmp_path / "s.h5", labels=lab, clinical=["age"])
    s = open_store(tmp_path / "s.h5")  # verifies both checksums
    assert r["bags"] == 5 and r["labelled"] == 4 and s.dim == 4
    assert list(s.ids) == list(data) and list(s.labels) == [1, 0, -1, 1, 0]
    for bid, x in data.items():
        np.testing.assert_array_equal(s.bag(bid), x)
    assert s.clinical_columns == ["age"] and s.clinical[:, 0].tolist() == [50, 61, 70, 40, 33]
    assert s.provenance["method"] == "import"


def test_table_streams_in_blocks_and_matches(tmp_path: Path) -> None:
    data = bags(n=6, d=3)
    lines = ["bag,label,f0,f1,f2"]
    for k, (bid, x) in enumerate(data.items()):
        lines += [f"{bid},{k % 2}," + ",".join(repr(float(v)) for v in row) for row in x]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for block in (2, 3, 1000):  # bags cut across blocks give the same store
        out = tmp_path / f"s{block}.h5"
        import_store([tmp_path / "t.csv"], out, id_column="bag", block_rows=block)
        s = open_store(out)
        assert list(s.ids) == list(data) and s.feature_columns == ["f0", "f1", "f2"]
        assert list(s.labels) == [k % 2 for k in range(6)]
        for bid, x in data.items():
            np.testing.assert_array_equal(s.bag(bid), x)
    assert (tmp_path / "s2.h5").read_bytes() == (tmp_path / "s1000.h5").read_bytes()


def test_cli_and_positive_label(tmp_path: Path) -> None:
    write_h5(tmp_path / "b", bags(n=3))
    lab = labels_csv(tmp_path / "l.csv", ["slide0,tumor", "slide1,normal", "slide2,tumor"],
                     header="slide_id,label")
    res = CliRunner().invoke(app, ["store", "import", str(tmp_path / "b"), "--out",
                                   str(tmp_path / "s.h5"), "--labels", str(lab),
                                   "--id-column", "slide_id", "--positive", "tumor"])
    assert res.exit_code == 0, res.output
    assert "3 bags (3 labelled)" in res.output
    assert list(open_store(tmp_path / "s.h5").labels) == [1, 0, 1]
    bad = CliRunner().invoke(app, ["store", "import", str(tmp_path / "b"), "--out",
                                   str(tmp_path / "s2.h5"), "--labels", str(lab),
                                   "--id-column", "slide_id"])
    assert bad.exit_code == 1 and "error:" in bad.output and "--positive" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "s2.h5").exists()


@pytest.mark.parametrize("case, match", [
    ("nan", "non-finite value at instance 1"),
    ("dim", "3 features per instance, expected 4"),
    ("empty", "empty bag"),
    ("1d", "2-d"),
    ("nokey", "missing dataset /features"),
    ("label", "label '2'"),
    ("unknown_id", "with no features"),
    ("dup_label", "appears twice"),
    ("pickle", "weights_only"),
    ("clinical_nan", "expected a finite number"),
])
def test_bad_bag_files(tmp_path: Path, case: str, match: str) -> None:
    data = bags(n=3)
    rows = ["slide0,1,1", "slide1,0,2", "slide2,1,3"]
    if case == "nan":
        data["slide1"] = np.ones((3, 4), np.float32)
        data["slide1"][1, 2] = np.nan
    elif case == "dim":
        data["slide2"] = np.ones((2, 3), np.float32)
    elif case == "empty":
        data["slide1"] = np.zeros((0, 4), np.float32)
    elif case == "1d":
        data["slide1"] = np.ones(4, np.float32)
    elif case == "label":
        rows[1] = "slide1,2,2"
    elif case == "unknown_id":
        rows.append("slide9,1,4")
    elif case == "dup_label":
        rows.append("slide0,1,4")
    elif case == "clinical_nan":
        rows[2] = "slide2,1,abc"
    write_h5(tmp_path / "b", data, key="other" if case == "nokey" else "features")
    if case == "pickle":
        torch.save({"features": torch.zeros(2, 4), "x": Path("p")}, tmp_path / "b" / "slide3.pt")
    lab = labels_csv(tmp_path / "l.csv", rows)
    with pytest.raises(LymphError, match=match):
        import_store([tmp_path / "b"], tmp_path / "s.h5", labels=lab, clinical=["age"])
    assert not (tmp_path / "s.h5").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.h5")] == []


@pytest.mark.parametrize("body, match", [
    ("bag,f0\na,1\nb,2\na,3\n", "appears again after other bags"),
    ("bag,label,f0\na,1,1\na,0,2\n", "different labels"),
    ("bag,f0\na,1\nb,x\n", "line 3: f0 = 'x'"),
    ("bag,f0\na,1\nb,inf\n", "non-finite value at line 3"),
    ("bag,f0\na,1\nb\n", "line 3: 1 fields, expected 2"),
    ("id,f0\na,1\n", "no 'bag' column"),
    ("", "empty file"),
])
def test_bad_tables(tmp_path: Path, body: str, match: str) -> None:
    (tmp_path / "t.csv").write_text(body, encoding="utf-8")
    with pytest.raises(LymphError, match=match):
        import_store([tmp_path / "t.csv"], tmp_path / "s.h5", id_column="bag", block_rows=2)
    assert not (tmp_path / "s.h5").exists()


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(LymphError, match="pyarrow"):
            import_store([tmp_path / "t.parquet"], tmp_path / "s.h5")
    foreign = tmp_path / "mine.h5"
    foreign.write_bytes(b"not lymph")
    write_h5(tmp_path / "b", bags(n=2))
    with pytest.raises(LymphError, match="not a lymph embedding store; refusing"):
        import_store([tmp_path / "b"], foreign)
    assert foreign.read_bytes() == b"not lymph"
    with pytest.raises(LymphError, match="only source"):
        import_store([tmp_path / "b", tmp_path / "t.parquet"], tmp_path / "s.h5")
    with pytest.raises(LymphError, match="no such file or folder"):
        import_store([tmp_path / "nothing"], tmp_path / "s.h5")
