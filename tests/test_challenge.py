"""Reading the challenge layout: the real data's quirks and every bad input."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lymph.cli import app
from lymph.data.challenge import REFERENCE_DATE, parse_dob, read_challenge
from lymph.errors import LymphError

HEADER = "ID,LABEL,GENDER,DOB,LYMPH_COUNT\n"


def make_split(tmp: Path, rows: list[str], images: dict[str, int] | None = None,
               header: str = HEADER, name: str = "trainset_true.csv") -> Path:
    folder = tmp / "trainset"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(header + "".join(r + "\n" for r in rows))
    from lymph.data.synth import draw_cell
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for r in rows:
        pid = r.split(",")[0]
        n = (images or {}).get(pid, 2)
        d = folder / pid
        if ".." in pid or "/" in pid:
            continue
        d.mkdir(exist_ok=True)
        for j in range(n):
            Image.fromarray(draw_cell(rng, 24, False)).save(d / f"{j:06d}.jpg")
    return folder


def test_both_dob_formats_by_separator() -> None:
    assert parse_dob("11/3/1933", "x") == dt.date(1933, 11, 3)  # M/D/YYYY
    assert parse_dob("28-04-1943", "x") == dt.date(1943, 4, 28)  # DD-MM-YYYY
    assert parse_dob("03-11-1933", "x") == dt.date(1933, 11, 3)  # never swapped
    assert parse_dob("1/2/1950", "x") == dt.date(1950, 1, 2)


@pytest.mark.parametrize("bad", ["31/31/1950", "1950", "abc", "30-02-1950", ""])
def test_unparseable_dob(bad: str) -> None:
    with pytest.raises(LymphError, match="DOB"):
        parse_dob(bad, "f.csv, line 2")


def test_future_dob(tmp_path: Path) -> None:
    future = dt.date.today() + dt.timedelta(days=400)
    make_split(tmp_path, [f"P1,1,M,{future.month}/{future.day}/{future.year},5"])
    with pytest.raises(LymphError, match=r"line 2.*P1.*DOB.*future"):
        read_challenge(tmp_path)


@pytest.mark.parametrize(
    "row, field",
    [
        ("P1,2,M,1/1/1950,5", "LABEL"),
        ("P1,1,X,1/1/1950,5", "GENDER"),
        ("P1,1,M,1/1/1950,", "LYMPH_COUNT"),
        ("P1,1,M,1/1/1950,abc", "LYMPH_COUNT"),
        ("P1,1,M,1/1/1950,-3", "LYMPH_COUNT"),
        ("P1,1,M,1/1/1950,nan", "LYMPH_COUNT"),
        ("../P1,1,M,1/1/1950,5", "ID"),
        ("a/b,1,M,1/1/1950,5", "ID"),
    ],
)
def test_bad_fields_name_file_line_and_field(tmp_path: Path, row: str, field: str) -> None:
    make_split(tmp_path, [row])
    with pytest.raises(LymphError) as e:
        read_challenge(tmp_path)
    msg = str(e.value)
    assert "trainset_true.csv" in msg and "line 2" in msg and field in msg


def test_duplicate_id(tmp_path: Path) -> None:
    make_split(tmp_path, ["P1,1,M,1/1/1950,5", "P1,0,F,1/1/1960,5"])
    with pytest.raises(LymphError, match=r"line 3.*duplicate.*line 2"):
        read_challenge(tmp_path)


def test_missing_column(tmp_path: Path) -> None:
    make_split(tmp_path, ["P1,1,M,1/1/1950"], header="ID,LABEL,GENDER,DOB\n")
    with pytest.raises(LymphError, match="missing required column.*LYMPH_COUNT"):
        read_challenge(tmp_path)


def test_missing_csv(tmp_path: Path) -> None:
    (tmp_path / "trainset" / "P1").mkdir(parents=True)
    with pytest.raises(LymphError, match="no CSV"):
        read_challenge(tmp_path)


def test_missing_and_empty_patient_folders(tmp_path: Path) -> None:
    folder = make_split(tmp_path, ["P1,1,M,1/1/1950,5", "P2,0,F,1/1/1960,5"])
    shutil.rmtree(folder / "P2")
    with pytest.raises(LymphError, match="P2.*no image folder"):
        read_challenge(tmp_path)
    (folder / "P2").mkdir()
    with pytest.raises(LymphError, match="P2 has no images"):
        read_challenge(tmp_path)


def test_folder_without_row_warns_and_is_ignored(tmp_path: Path, caplog) -> None:
    folder = make_split(tmp_path, ["P1,1,M,1/1/1950,5"])
    (folder / "P99").mkdir()
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "P1" / ".DS_Store").write_bytes(b"junk")
    d = read_challenge(tmp_path)
    assert d.ids == ["P1"] and len(d.patients[0].image_paths) == 2
    assert "P99" in caplog.text


def test_lowercase_gender_and_latin1_bom_csv(tmp_path: Path) -> None:
    folder = make_split(tmp_path, ["P1,1,f,1/1/1950,5"])
    raw = ("\u00ef\u00bb\u00bf" + HEADER + "P1,1,f,1/1/1950,5\n").encode("latin-1")
    (folder / "trainset_true.csv").write_bytes(raw)
    d = read_challenge(tmp_path)
    assert d.patients[0].gender == "F"


def test_single_split_folder_and_unnamed_index(tmp_path: Path) -> None:
    folder = make_split(tmp_path, ["P1,1,M,1/1/1950,5"], header=",ID,LABEL,GENDER,DOB,LYMPH_COUNT\n")
    (folder / "trainset_true.csv").write_text(",ID,LABEL,GENDER,DOB,LYMPH_COUNT\n0,P1,-1,M,1/1/1950,5\n")
    d = read_challenge(folder)
    assert d.ids == ["P1"] and d.patients[0].label == -1


def test_synth_layout_is_read(synth_data: Path) -> None:
    d = read_challenge(synth_data)
    t = d.table()
    assert len(t) == 19 and set(t.split) == {"trainset", "testset"}
    assert (t[t.split == "testset"].label == -1).all()
    assert set(t[t.split == "trainset"].label) == {0, 1}
    ptr = d.patient_ptr()
    assert ptr[-1] == d.n_images == len(d.image_paths())


def test_real_data_table(real_data: Path) -> None:
    import pandas as pd

    d = read_challenge(real_data)
    t = d.table().set_index("id")
    assert len(t) == 135 and d.n_images == 10850
    assert (t.split == "trainset").sum() == 123
    train = pd.read_csv(real_data / "trainset" / "trainset_true.csv").set_index("ID")
    assert (t.loc[train.index, "label"] == train.LABEL).all()
    assert t.loc["P26", "dob"] == "1933-11-03"  # 11/3/1933 is M/D/YYYY
    assert t.loc["P165", "gender"] == "F"  # the lowercase 'f'
    dash = [r for r in train.itertuples() if "-" in r.DOB]
    assert dash, "the real data has DD-MM-YYYY dates"
    r = dash[0]
    dd, mm, yy = (int(x) for x in r.DOB.split("-"))
    assert t.loc[r.Index, "dob"] == dt.date(yy, mm, dd).isoformat()
    assert abs(t.loc[r.Index, "age"] - (REFERENCE_DATE - dt.date(yy, mm, dd)).days / 365.25) < 1e-3


def test_cli_error_is_one_line_exit_1(tmp_path: Path) -> None:
    make_split(tmp_path, ["P1,7,M,1/1/1950,5"])
    res = CliRunner().invoke(app, ["ingest", str(tmp_path), "--out", str(tmp_path / "c.zarr")])
    assert res.exit_code == 1
    assert "LABEL" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "c.zarr").exists()
