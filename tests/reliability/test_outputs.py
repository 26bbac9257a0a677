"""Output paths: no command replaces anything lymph did not write (issue 15, class 1).

Every writing command is tried with its output path at (a) a user's file, (b) a folder
holding a user's file, (c) its own input (or a folder holding it), (d) a path shared with
another of its outputs. Each is refused before any work: one ``error:`` line naming the
path, exit code 1, the user's bytes unchanged and nothing new on disk. A lymph artifact of
the same kind is replaced (atomically), and missing parent folders are created.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_helpers import HEAD, SIZE, cli, train_tiny

Args = Callable[[dict[str, Path], Path], list[object]]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("outputs")
    b = train_tiny(d)
    r = cli("ingest", b["data"], "--out", d / "c.zarr", "--size", SIZE, "--workers", "1")
    assert r.exit_code == 0, r.output
    (d / "p.toml").write_text("[ingest]\nsize = 16\n")
    return {**b, "cache": d / "c.zarr", "pipeline": d / "p.toml"}


#: command -> arguments writing ``out`` as its main output
COMMANDS: dict[str, Args] = {
    "synth": lambda b, out: ["synth", out, "--patients", 2, "--test-patients", 0,
                             "--images", "1:1", "--size", 16],
    "ingest": lambda b, out: ["ingest", b["data"], "--out", out, "--size", SIZE],
    "embed": lambda b, out: ["embed", "--images", b["cache"], "--out", out,
                             "--encoder", b["encoder"], "--device", "cpu"],
    "store-concat": lambda b, out: ["store", "concat", b["store"], b["store"], "--out", out],
    "fit-head": lambda b, out: ["fit-head", "--store", b["store"], "--out", out, *HEAD],
    "fit-head-json": lambda b, out: ["fit-head", "--store", b["store"], "--json", out, *HEAD],
    "compare-baselines": lambda b, out: ["compare-baselines", "--store", b["store"], "--out", out,
                                         "--folds", 2, "--models", "adaboost"],
    "compare-json": lambda b, out: ["compare-baselines", "--store", b["store"], "--json", out,
                                    "--folds", 2, "--models", "adaboost"],
    "predict": lambda b, out: ["predict", "--model", b["model"], "--store", b["store"],
                               "--out", out],
    "predict-submission": lambda b, out: ["predict", "--model", b["model"], "--store", b["store"],
                                          "--out", out.parent / "ok.csv", "--submission", out],
    "explain": lambda b, out: ["explain", "P9", "--model", b["model"], "--store", b["store"],
                               "--out", out],
    "run": lambda b, out: ["run", b["pipeline"], "--data", b["data"], "--artifacts", out],
    "demo": lambda b, out: ["demo", "--artifacts", out],
}
#: commands that only ever write inside their output folder (an existing folder is fine)
INSIDE_ONLY = ("run", "demo")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def assert_refused(r, path: Path) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.output
    assert str(path) in lines[0], lines[0]


def _user_file(work: Path) -> Path:
    p = work / "mine.csv"
    p.write_text("id,probability\nmy own notes, do not delete\n")
    return p


def _user_folder(work: Path) -> Path:
    p = work / "mine"
    p.mkdir()
    (p / "thesis.txt").write_text("three years of work\n")
    return p


@pytest.mark.parametrize("target", ("user-file", "folder-with-user-file"))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_foreign_output_is_refused(base: dict[str, Path], tmp_path: Path, command: str,
                                   target: str) -> None:
    if target == "folder-with-user-file" and command in INSIDE_ONLY:
        pytest.skip("run/demo write only their own stage folders inside --artifacts")
    out = _user_file(tmp_path) if target == "user-file" else _user_folder(tmp_path)
    before = snapshot(tmp_path)
    r = cli(*COMMANDS[command](base, out))
    assert_refused(r, out)
    assert "refused" in r.output
    assert snapshot(tmp_path) == before  # the user's bytes, and nothing new


@pytest.mark.parametrize("command, args, named", [
    ("ingest-into-its-input", lambda b, w: ["ingest", b["data"], "--out", b["data"]], "data"),
    ("ingest-over-a-parent-of-its-input",
     lambda b, w: ["ingest", b["data"] / "trainset", "--out", b["data"]], "data"),
    ("concat-over-an-input", lambda b, w: ["store", "concat", b["store"], b["store"], "--out",
                                           b["store"]], "store"),
    ("embed-cache-over-its-data", lambda b, w: ["embed", "--data", b["data"], "--out",
                                                w / "s.h5", "--cache", b["data"],
                                                "--encoder", b["encoder"]], "data"),
    ("predict-over-its-store", lambda b, w: ["predict", "--model", b["model"], "--store",
                                             b["store"], "--out", b["store"]], "store"),
    ("fit-head-json-over-its-store", lambda b, w: ["fit-head", "--store", b["store"], "--json",
                                                   b["store"]], "store"),
    ("predict-into-the-model-folder", lambda b, w: ["predict", "--model", b["model"], "--store",
                                                    b["store"], "--out",
                                                    b["model"] / "model.json"], "model"),
    ("compare-over-its-cache", lambda b, w: ["compare-baselines", "--store", b["store"],
                                             "--images", b["cache"], "--out", b["cache"]],
     "cache"),
])
def test_output_over_an_input_is_refused(base: dict[str, Path], tmp_path: Path, command: str,
                                         args: Callable[..., list[object]], named: str) -> None:
    before = snapshot(base[named].parent)
    r = cli(*args(base, tmp_path))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert re.search(r"^error: .*refused", r.output, re.MULTILINE), r.output
    assert snapshot(base[named].parent) == before


@pytest.mark.parametrize("command, args", [
    ("predict-out-is-submission", lambda b, w: ["predict", "--model", b["model"], "--store",
                                                b["store"], "--out", w / "p.csv",
                                                "--submission", w / "p.csv"]),
    ("predict-submission-is-attention", lambda b, w: ["predict", "--model", b["model"],
                                                      "--store", b["store"], "--out", w / "p.csv",
                                                      "--submission", w / "p.attention.csv"]),
    ("fit-head-json-is-oof", lambda b, w: ["fit-head", "--store", b["store"], "--json",
                                           w / "m.json", "--oof", w / "m.json"]),
    ("fit-head-out-is-json", lambda b, w: ["fit-head", "--store", b["store"], "--out",
                                           w / "m", "--json", w / "m"]),
    ("fit-head-json-inside-out", lambda b, w: ["fit-head", "--store", b["store"], "--out",
                                               w / "m", "--json", w / "m" / "x.json"]),
    ("compare-out-is-json", lambda b, w: ["compare-baselines", "--store", b["store"], "--out",
                                          w / "r", "--json", w / "r"]),
    ("embed-cache-is-out", lambda b, w: ["embed", "--data", b["data"], "--out", w / "s.h5",
                                         "--cache", w / "s.h5", "--encoder", b["encoder"]]),
])
def test_two_outputs_sharing_a_path_are_refused(base: dict[str, Path], tmp_path: Path,
                                                command: str, args: Callable[..., list[object]]
                                                ) -> None:
    r = cli(*args(base, tmp_path))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert re.search(r"^error: .*(same path|inside the output folder)", r.output, re.MULTILINE), r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["synth", "ingest", "embed", "store-concat", "fit-head",
                                     "fit-head-json", "compare-baselines", "compare-json",
                                     "predict", "predict-submission", "explain"])
def test_own_artifact_is_replaced_and_parents_created(base: dict[str, Path], tmp_path: Path,
                                                      command: str) -> None:
    """Twice to a path under missing folders: created, then replaced (no leftovers)."""
    suffix = {"ingest": ".zarr", "embed": ".h5", "store-concat": ".h5", "fit-head-json": ".json",
              "compare-json": ".json", "predict": ".csv", "predict-submission": ".csv",
              "explain": ".png"}.get(command, "")
    out = tmp_path / "new" / "sub" / f"out{suffix}"
    for _ in range(2):
        r = cli(*COMMANDS[command](base, out))
        assert r.exit_code == 0, r.output
        assert out.exists()
    hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert not hidden, hidden


def test_lymph_artifact_of_another_kind_is_refused(base: dict[str, Path], tmp_path: Path) -> None:
    """A model directory is lymph's, but not a predictions CSV or an image cache."""
    r = cli("predict", "--model", base["model"], "--store", base["store"], "--out",
            base["encoder"])
    assert_refused(r, base["encoder"])
    r = cli("ingest", base["data"], "--out", base["model"], "--size", SIZE)
    assert_refused(r, base["model"])
    assert (base["model"] / "model.json").is_file()


def test_output_under_a_file_is_refused(base: dict[str, Path], tmp_path: Path) -> None:
    f = _user_file(tmp_path)
    r = cli("predict", "--model", base["model"], "--store", base["store"], "--out",
            f / "p.csv")
    assert_refused(r, f)
    assert "is a file, not a folder" in r.output


@pytest.mark.parametrize("command, kind", [("fit-head", "model"), ("ingest", "cache"),
                                           ("synth", "synth")])
def test_own_artifact_holding_a_user_file_is_refused(base: dict[str, Path], tmp_path: Path,
                                                     command: str, kind: str) -> None:
    """A lymph folder artifact someone put a file into is not replaced (its swap would
    delete that file)."""
    out = tmp_path / "art"
    assert cli(*COMMANDS[command](base, out)).exit_code == 0
    (out / "config").write_text("my notes\n")  # even a name model.json uses as a key
    before = snapshot(tmp_path)
    r = cli(*COMMANDS[command](base, out))
    assert_refused(r, out)
    assert "holds files lymph did not write (config)" in r.output
    assert snapshot(tmp_path) == before


def test_a_long_legal_name_is_written(base: dict[str, Path], tmp_path: Path) -> None:
    """A 240-byte name fits; its temporary (a shortened name) must fit too."""
    out = tmp_path / ("p" * 236 + ".csv")
    for _ in range(2):
        r = cli("predict", "--model", base["model"], "--store", base["store"], "--out", out)
        assert r.exit_code == 0, r.output
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
