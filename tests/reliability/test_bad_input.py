"""Bad data through every command that reads the challenge layout.

Each fault is applied to a fresh copy of a tiny synthetic dataset and fed to `lymph ingest`,
`lymph embed --data`, `lymph predict --data` and `lymph run`. The documented outcomes
(``docs/data-format.md``, ``docs/reliability.md``):

- a field or layout fault: exit code 1, one line ``error: ...`` naming the file, line,
  field or patient, no traceback, and nothing left behind that opens as an artifact;
- an unreadable image: a warning naming the file, the image skipped, exit code 0;
- grayscale / RGBA / another size: converted, exit code 0;
- a latin-1 CSV (behind a UTF-8 BOM): a warning, read, exit code 0.
"""

from __future__ import annotations

import csv
import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lymph.data.cache import open_cache
from lymph.data.challenge import read_challenge
from lymph.errors import LymphError
from lymph.store import open_store
from reliability_helpers import PIPELINE, SIZE, TRAIN, cli, copy_data, train_tiny

PID = "P9"  # the first row of the tiny dataset's trainset CSV
ROW = rf"trainset_true\.csv, line 2 \(patient {PID}\)"  # how errors name that row


def _csv_path(root: Path) -> Path:
    return root / "trainset" / "trainset_true.csv"


def _edit_rows(root: Path, fn: Callable[[list[dict[str, str]]], list[dict[str, str]]],
               fields: list[str] | None = None) -> None:
    path = _csv_path(root)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = fn(rows)
    cols = fields or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _set_field(field: str, value: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        def fn(rows: list[dict[str, str]]) -> list[dict[str, str]]:
            assert rows[0]["ID"] == PID
            rows[0][field] = value
            return rows
        _edit_rows(root, fn)
    return apply


def _first_image(root: Path, pid: str) -> Path:
    return sorted((root / "trainset" / pid).glob("*.jpg"))[0]


def missing_folder(root: Path) -> None:
    shutil.rmtree(root / "trainset" / PID)


def empty_folder(root: Path) -> None:
    for p in (root / "trainset" / PID).iterdir():
        p.unlink()


def all_unreadable(root: Path) -> None:
    for p in (root / "trainset" / PID).iterdir():
        p.write_bytes(b"")


def no_lymph_count(root: Path) -> None:
    _edit_rows(root, lambda rows: rows, fields=["ID", "LABEL", "GENDER", "DOB"])


def future_dob(root: Path) -> None:
    d = dt.date.today() + dt.timedelta(days=400)
    _set_field("DOB", f"{d.month}/{d.day}/{d.year}")(root)


def duplicate_id(root: Path) -> None:
    _edit_rows(root, lambda rows: rows + [dict(rows[0])])


def truncated_jpeg(root: Path, pid: str = PID) -> None:
    p = _first_image(root, pid)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def zero_bytes(root: Path, pid: str = PID) -> None:
    _first_image(root, pid).write_bytes(b"")


def text_as_jpg(root: Path, pid: str = PID) -> None:
    _first_image(root, pid).write_text("ID,LABEL\nthis is not an image\n")


def grayscale(root: Path, pid: str = PID) -> None:
    p = _first_image(root, pid)
    with Image.open(p) as im:
        im.convert("L").save(p)


def rgba(root: Path, pid: str = PID) -> None:
    p = _first_image(root, pid)
    with Image.open(p) as im:
        rgba_im = im.convert("RGBA")
    rgba_im.putalpha(200)
    p.unlink()
    rgba_im.save(p.with_suffix(".png"))  # JPEG holds no alpha: an RGBA PNG in its place


def other_size(root: Path, pid: str = PID) -> None:
    p = _first_image(root, pid)
    with Image.open(p) as im:
        im.resize((41, 29)).save(p)


def latin1_bom(root: Path) -> None:
    """A spreadsheet export: UTF-8 BOM, then latin-1 text (a comment column with accents)."""
    path = _csv_path(root)
    lines = path.read_text().splitlines()
    lines = [lines[0] + ",COMMENT"] + [ln + ",réactif? à revoir" for ln in lines[1:]]
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("latin-1"))


def stray_folder(root: Path) -> None:
    src = root / "trainset" / PID
    shutil.copytree(src, root / "trainset" / "P99")


# (fault, mutation, pattern the error message must match)
ERRORS: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing-patient-folder", missing_folder,
     f"patient {PID} is in the CSV but has no image folder"),
    ("empty-patient-folder", empty_folder, f"patient {PID} has no images"),
    ("all-images-unreadable", all_unreadable, f"patient {PID} has no readable image"),
    ("csv-without-lymph-count", no_lymph_count,
     r"trainset_true\.csv: missing required column\(s\) LYMPH_COUNT"),
    ("non-numeric-lymph-count", _set_field("LYMPH_COUNT", "12,5x"),
     rf"{ROW}, field LYMPH_COUNT: '12,5x' is not a number"),
    ("negative-lymph-count", _set_field("LYMPH_COUNT", "-3.2"),
     rf"{ROW}, field LYMPH_COUNT: '-3.2' must be a positive"),
    ("unparseable-dob", _set_field("DOB", "31/31/1950"),
     rf"{ROW}, field DOB: '31/31/1950' is not a date"),
    ("future-dob", future_dob, rf"{ROW}, field DOB: .* lies in the future"),
    ("duplicate-id", duplicate_id,
     rf"line 10 \(patient {PID}\), field ID: duplicate patient id \(first on line 2\)"),
    ("label-2", _set_field("LABEL", "2"), rf"{ROW}, field LABEL: '2' is not one of"),
    ("id-with-dotdot", _set_field("ID", "../P9"),
     r"line 2, field ID: '\.\./P9' is not a plain patient name"),
    # what a lab system would not mean (issue 15)
    ("underscored-lymph-count", _set_field("LYMPH_COUNT", "1_389"),
     rf"{ROW}, field LYMPH_COUNT: '1_389' is not a number"),
    ("infinite-lymph-count", _set_field("LYMPH_COUNT", "inf"),
     rf"{ROW}, field LYMPH_COUNT: 'inf' is not a number"),
    ("nan-lymph-count", _set_field("LYMPH_COUNT", "NaN"),
     rf"{ROW}, field LYMPH_COUNT: 'NaN' is not a number"),
    ("underscored-dob", _set_field("DOB", "1/1/1_950"),
     rf"{ROW}, field DOB: '1/1/1_950' is not a date"),
    ("age-over-120", _set_field("DOB", "1/1/1890"),
     rf"{ROW}, field DOB: '1/1/1890' gives an age of 132 years .* expected 0 to 120"),
    ("underscored-label", _set_field("LABEL", "0_1"), rf"{ROW}, field LABEL: '0_1' is not one of"),
    ("duplicated-column", lambda root: _csv_path(root).write_text(
        _csv_path(root).read_text().replace("LYMPH_COUNT", "LYMPH_COUNT,LABEL", 1).replace(
            "\n", ",1\n").replace("LYMPH_COUNT,LABEL,1\n", "LYMPH_COUNT,LABEL\n", 1)),
     r"trainset_true\.csv, line 1, column 6: duplicated column name 'LABEL'"),
    ("row-with-an-extra-field", lambda root: _csv_path(root).write_text(
        "\n".join(ln + (",2" if k == 1 else "") for k, ln in
                  enumerate(_csv_path(root).read_text().splitlines())) + "\n"),
     r"trainset_true\.csv, line 2: 6 fields, the header names 5"),
    ("binary-csv", lambda root: _csv_path(root).write_bytes(b"ID,LABEL\n\"P1\rx\x00\"\"z\n"),
     r"trainset_true\.csv: (not a readable CSV|missing required column)"),
]
# (fault, mutation, expected change in the number of cached images, file named in a warning)
ACCEPTED: list[tuple[str, Callable[[Path], None], int, str | None]] = [
    ("truncated-jpeg", truncated_jpeg, -1, "000000.jpg"),
    ("zero-byte-file", zero_bytes, -1, "000000.jpg"),
    ("text-file-as-jpg", text_as_jpg, -1, "000000.jpg"),
    ("grayscale-image", grayscale, 0, None),
    ("rgba-image", rgba, 0, None),
    ("image-of-another-size", other_size, 0, None),
    ("latin1-csv-with-bom", latin1_bom, 0, "trainset_true.csv: not UTF-8; read as latin-1"),
    ("patient-folder-without-csv-row", stray_folder, 0, "P99: patient folder with no CSV row"),
]
COMMANDS = ("ingest", "embed", "predict", "run")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The clean dataset, an encoder trained on it and a model directory (with the encoder)."""
    d = tmp_path_factory.mktemp("bad-input")
    (d / "p.toml").write_text(PIPELINE)
    return {**train_tiny(d), "pipeline": d / "p.toml"}


def invoke(command: str, data: Path, work: Path, base: dict[str, Path], *, train: bool = False):
    """Run ``command`` on ``data``, writing only under ``work``."""
    work.mkdir()
    if command == "ingest":
        return cli("ingest", data, "--out", work / "c.zarr", "--size", SIZE, "--workers", "1")
    if command == "embed":  # embed only (the encoder is given) unless ``train``
        how = (["--size", SIZE, *TRAIN] if train
               else ["--encoder", base["encoder"], "--device", "cpu"])
        return cli("embed", "--data", data, "--out", work / "s.h5", *how)
    if command == "predict":
        return cli("predict", "--model", base["model"], "--data", data, "--out", work / "p.csv",
                   "--device", "cpu")
    return cli("run", base["pipeline"], "--data", data, "--artifacts", work / "artifacts")


def assert_nothing_valid(work: Path) -> None:
    """A failed command leaves no artifact: nothing at all under its output folder."""
    left = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert not left, f"a failed run left files behind: {left}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault, mutate, pattern", ERRORS, ids=[e[0] for e in ERRORS])
def test_field_and_layout_faults_are_errors(base: dict[str, Path], tmp_path: Path, command: str,
                                            fault: str, mutate: Callable[[Path], None],
                                            pattern: str) -> None:
    data = copy_data(base["data"], tmp_path / "data")
    mutate(data)
    r = invoke(command, data, tmp_path / "work", base)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.output
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert_nothing_valid(tmp_path / "work")


@pytest.mark.parametrize("command", ("ingest", "embed", "predict"))
@pytest.mark.parametrize("fault, mutate, delta, warned", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_image_and_encoding_faults_are_handled(base: dict[str, Path], tmp_path: Path,
                                               command: str, fault: str,
                                               mutate: Callable[[Path], None], delta: int,
                                               warned: str | None) -> None:
    data = copy_data(base["data"], tmp_path / "data")
    n_clean = read_challenge(data).n_images
    mutate(data)
    work = tmp_path / "work"
    r = invoke(command, data, work, base)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "error:" not in r.output
    if warned:
        lines = r.output.splitlines()
        assert any(ln.startswith("WARNING: ") and warned in ln for ln in lines), r.output
    else:
        assert "WARNING" not in r.output, r.output
    n = n_clean + delta
    if command == "ingest":
        c = open_cache(work / "c.zarr")
        assert c.n_images == n and c.n_patients == 10
        assert c.read_all().shape == (n, 3, SIZE, SIZE)
        if delta < 0:
            assert not any(p.endswith(f"{PID}/000000.jpg") for p in c.paths)
    elif command == "embed":
        s = open_store(work / "s.h5")
        assert s.n_images == n and s.n_patients == 10 and np.isfinite(s.embeddings).all()
    else:
        rows = list(csv.DictReader(open(work / "p.csv")))
        assert len(rows) == 10 and all(0 <= float(x["probability"]) <= 1 for x in rows)
        assert open_store(work / "p.store.h5").n_images == n


def all_accepted_faults(root: Path) -> int:
    """Every accepted fault at once, each on another patient; returns the images skipped."""
    pids = [r["ID"] for r in csv.DictReader(open(_csv_path(root)))]
    for k, (_, mutate, _, _) in enumerate(ACCEPTED):
        if mutate in (latin1_bom, stray_folder):
            mutate(root)
            continue
        mutate(root, pids[k])  # type: ignore[call-arg]
    return -sum(a[2] for a in ACCEPTED)


@pytest.mark.parametrize("command", ("embed", "run"))
def test_accepted_faults_through_training(base: dict[str, Path], tmp_path: Path,
                                          command: str) -> None:
    """`embed --data` with training and the whole `run` on data with every accepted fault."""
    data = copy_data(base["data"], tmp_path / "data")
    n_clean = read_challenge(data).n_images
    skipped = all_accepted_faults(data)
    work = tmp_path / "work"
    r = invoke(command, data, work, base, train=True)
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("WARNING: ")]
    assert sum("skipped unreadable image" in w for w in warnings) == skipped, r.output
    assert any("read as latin-1" in w for w in warnings) and any("P99" in w for w in warnings)
    if command == "embed":
        assert open_store(work / "s.h5").n_images == n_clean - skipped
    else:
        from lymph.pipeline.stages import list_stages

        stages = {row["stage"] for row in list_stages(work / "artifacts")}
        assert stages == {"ingest", "embed", "head"}
        store = next((work / "artifacts" / "embed").glob("*/store.h5"))
        assert open_store(store).n_images == n_clean - skipped


def test_strict_ingest_refuses_unreadable_image(base: dict[str, Path], tmp_path: Path) -> None:
    data = copy_data(base["data"], tmp_path / "data")
    truncated_jpeg(data)
    work = tmp_path / "work"
    work.mkdir()
    r = cli("ingest", data, "--out", work / "c.zarr", "--size", SIZE, "--workers", "1", "--strict")
    assert r.exit_code == 1 and "error: unreadable image(s) with --strict" in r.output
    assert f"{PID}/000000.jpg" in r.output
    assert_nothing_valid(work)
    with pytest.raises(LymphError):
        open_cache(work / "c.zarr")
