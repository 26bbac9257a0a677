"""The machine's state: OSErrors on user paths are one ``error:`` line, never a traceback.

Permission denied, a read-only file system and a full disk are injected where lymph puts
an artifact in place (``lymph.atomic``), for every writing command; a name too long, an
``--artifacts`` that is a file and a pipeline file that is not UTF-8 are real. Each
gives exit code 1, one line naming the path and the cause, and leaves no temporary file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from reliability_helpers import HEAD, SIZE, cli, train_tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("oserrors")
    b = train_tiny(d)
    r = cli("ingest", b["data"], "--out", d / "c.zarr", "--size", SIZE, "--workers", "1")
    assert r.exit_code == 0, r.output
    return {**b, "cache": d / "c.zarr"}


COMMANDS = {
    "synth": lambda b, w: ["synth", w / "d", "--patients", 2, "--test-patients", 0,
                           "--images", "1:1", "--size", 16],
    "ingest": lambda b, w: ["ingest", b["data"], "--out", w / "c.zarr", "--size", SIZE,
                            "--workers", 1],
    "embed": lambda b, w: ["embed", "--images", b["cache"], "--out", w / "s.h5",
                           "--encoder", b["encoder"], "--device", "cpu"],
    "store-concat": lambda b, w: ["store", "concat", b["store"], b["store"], "--out", w / "s.h5"],
    "fit-head": lambda b, w: ["fit-head", "--store", b["store"], "--json", w / "m.json", *HEAD],
    "predict": lambda b, w: ["predict", "--model", b["model"], "--store", b["store"],
                             "--out", w / "p.csv"],
    "compare-baselines": lambda b, w: ["compare-baselines", "--store", b["store"], "--json",
                                       w / "c.json", "--folds", 2, "--models", "adaboost"],
    "explain": lambda b, w: ["explain", "P9", "--model", b["model"], "--store", b["store"],
                             "--out", w / "e.png"],
}
ERRNOS = {"permission-denied": errno.EACCES, "read-only-fs": errno.EROFS,
          "disk-full": errno.ENOSPC}


@pytest.mark.parametrize("fault", sorted(ERRNOS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_os_error_when_writing_is_one_error_line(base: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, command: str,
                                                 fault: str) -> None:
    import lymph.atomic

    code = ERRNOS[fault]
    work = tmp_path / "w"
    work.mkdir()

    def failing(real: object) -> object:
        def fail(src: object, dst: object, *a: object, **k: object) -> object:
            if str(work) in str(dst):  # only the command's own outputs
                raise OSError(code, os.strerror(code), str(dst))
            return real(src, dst, *a, **k)  # type: ignore[operator]
        return fail

    monkeypatch.setattr(lymph.atomic.os, "replace", failing(os.replace))
    monkeypatch.setattr(lymph.atomic.os, "rename", failing(os.rename))
    monkeypatch.setattr(lymph.atomic, "_exchange", failing(lymph.atomic._exchange))
    r = cli(*COMMANDS[command](base, work))
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.output
    assert os.strerror(code) in lines[0] and str(work) in lines[0], lines[0]
    left = [str(p.relative_to(work)) for p in work.rglob("*")]
    assert not left, f"left behind: {left}"


def test_name_too_long(base: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / ("x" * 300 + ".csv")
    r = cli("predict", "--model", base["model"], "--store", base["store"], "--out", out)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "error: " in r.output and "too long" in r.output.lower()


def test_artifacts_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "artifacts"
    f.write_text("mine\n")
    p = tmp_path / "p.toml"
    p.write_text("[ingest]\nsize = 16\n")
    r = cli("run", p, "--artifacts", f)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"error: --artifacts {f}: refused" in r.output
    assert f.read_text() == "mine\n"


def test_pipeline_file_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_bytes("[ingest]\nsize = 16 # café\n".encode("latin-1"))
    r = cli("run", p, "--artifacts", tmp_path / "a")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"error: {p}: not a UTF-8 text file" in r.output


def test_missing_input_store_and_data_folder_as_file(base: dict[str, Path], tmp_path: Path
                                                     ) -> None:
    for args in (["fit-head", "--store", tmp_path / "none.h5"],
                 ["ingest", base["store"], "--out", tmp_path / "c.zarr"],
                 ["predict", "--model", base["store"], "--store", base["store"], "--out",
                  tmp_path / "p.csv"],
                 ["store", "info", base["data"]]):
        r = cli(*args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert sum(ln.startswith("error: ") for ln in r.output.splitlines()) == 1, r.output
