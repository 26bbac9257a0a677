"""Pipelines: config resolution, fingerprints, the stage cache, `lymph demo` end to end."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lymph.cli import app
from lymph.errors import LymphError
from lymph.pipeline.config import DEFAULTS, DEMO, parse_set, resolve
from lymph.pipeline.stages import fingerprint, list_stages, make_stage

ROOT = Path(__file__).resolve().parents[1]


def test_resolution_order(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text('[embed]\ndim = 32\nlr = 1\n[head]\npooling = "mean"\n')
    cfg = resolve(p, ["head.pooling=max", "embed.epochs=3"], data=tmp_path)
    assert cfg["embed"]["dim"] == 32  # file over default
    assert cfg["embed"]["lr"] == 1.0 and isinstance(cfg["embed"]["lr"], float)  # int -> float
    assert cfg["head"]["pooling"] == "max"  # --set over file
    assert cfg["embed"]["epochs"] == 3
    assert cfg["ingest"]["size"] == DEFAULTS["ingest"]["size"]  # default kept
    assert cfg["data"]["path"] == str(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("[embedd]\ndim = 3\n", r"unknown section \[embedd\]"),
    ("[embed]\ndims = 3\n", "unknown key embed.dims"),
    ("[embed]\ndim = \"big\"\n", "embed.dim: expected an integer"),
    ("[head]\nclinical = 1\n", "head.clinical: expected a boolean"),
    ("[head]\nmlp = [1.5]\n", "head.mlp: expected a list"),
    ("[head\n", "not valid TOML"),
])
def test_file_errors_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(LymphError, match=match):
        resolve(p)


def test_set_parsing() -> None:
    assert parse_set("head.pooling=gated") == {"head": {"pooling": "gated"}}
    assert parse_set("head.mlp=[64, 32]") == {"head": {"mlp": [64, 32]}}
    assert parse_set("embed.lr=3e-4") == {"embed": {"lr": 3e-4}}
    with pytest.raises(LymphError, match="section.key=value"):
        parse_set("pooling")
    with pytest.raises(LymphError, match="unknown key"):
        resolve(None, ["head.nope=1"])


def test_shipped_pipelines_resolve_and_demo_matches_its_file() -> None:
    for p in sorted((ROOT / "pipelines").glob("*.toml")):
        resolve(p)
    assert tomllib.loads((ROOT / "pipelines" / "demo.toml").read_text()) == DEMO


def test_fingerprint_changes_exactly_with_settings_and_inputs(tmp_path: Path) -> None:
    base = fingerprint("head", {"a": 1, "b": [1, 2]}, ["x"])
    assert fingerprint("head", {"b": [1, 2], "a": 1}, ["x"]) == base  # key order irrelevant
    assert fingerprint("head", {"a": 2, "b": [1, 2]}, ["x"]) != base
    assert fingerprint("head", {"a": 1, "b": [1, 2]}, ["y"]) != base
    assert fingerprint("embed", {"a": 1, "b": [1, 2]}, ["x"]) != base
    st = make_stage(tmp_path, "head", {"a": 1}, ["x"])
    assert not st.is_complete()
    st.begin()
    (st.folder / "partial").write_text("x")
    assert not st.is_complete()  # no manifest: an interrupted stage is never reused
    st.finish({}, {}, 0.1)
    assert st.is_complete()
    assert [r["stage"] for r in list_stages(tmp_path)] == ["head"]


def test_demo_end_to_end_and_cache_reuse(tmp_path: Path) -> None:
    r = CliRunner()
    small = ["--set", "data.synth_patients=12", "--set", "data.synth_images=3:5",
             "--set", "data.synth_size=32", "--set", "ingest.size=16", "--set", "embed.epochs=1",
             "--set", "head.max_epochs=5", "--set", "head.folds=2", "--set", "compare.folds=2"]
    art = ["--artifacts", str(tmp_path / "art")]
    first = r.invoke(app, ["demo", *art, *small])
    assert first.exit_code == 0, first.output
    assert "late-fusion" in first.output and "adaboost" in first.output  # the comparison table
    report = next((tmp_path / "art" / "compare").glob("*/report/report.md"))
    assert (report.parent / "roc.png").is_file() and (report.parent / "pr.png").is_file()
    assert "[embed] ran" in first.output
    again = r.invoke(app, ["demo", *art, *small])
    assert again.exit_code == 0
    assert again.output.count("cached:") == 5
    head_only = r.invoke(app, ["demo", *art, *small, "--set", "head.pooling=mean"])
    assert head_only.exit_code == 0
    assert "[head] ran" in head_only.output
    for stage in ("data", "ingest", "embed"):
        assert f"[{stage}] cached" in head_only.output
    # the report reads the head: its chosen model and the test patients' predictions
    assert "[compare] ran" in head_only.output
    ls = r.invoke(app, ["ls", *art])
    assert ls.exit_code == 0 and "embed" in ls.output


def test_embed_channels_is_checked_and_changes_the_fingerprint_only_when_set() -> None:
    from lymph.pipeline.run import _embed_settings

    plain = _embed_settings(resolve(None, ["embed.method=weak"])["embed"])
    assert "channels" not in plain  # stores cached before the setting existed stay valid
    wide = resolve(None, ["embed.method=weak", "embed.channels=[32, 64, 128, 128]"])
    assert wide["embed"]["channels"] == [32, 64, 128, 128]
    assert _embed_settings(wide["embed"]) == {**plain, "channels": [32, 64, 128, 128]}
    for bad, msg in (("[8, 0]", "embed.channels: expected 1 to 6"),
                     ("[1, 2, 3, 4, 5, 6, 7]", "embed.channels: expected 1 to 6"),
                     ("[16.0, 32.0]", "embed.channels: expected a list"),
                     ("[true]", "embed.channels: expected a list"),
                     ("32", "embed.channels: expected a list")):
        with pytest.raises(LymphError, match=msg):
            resolve(None, ["embed.method=weak", f"embed.channels={bad}"])
    with pytest.raises(LymphError, match="embed.channels: only for embed.method"):
        resolve(None, ["embed.channels=[32, 64]"])  # the default method is ae


def test_embed_channels_reach_the_weak_scorer(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import lymph.encoder.run
    from lymph.pipeline.run import run_pipeline

    seen: dict[str, object] = {}

    def fake_embed(**kw: object) -> None:
        seen.update(kw)
        raise LymphError("stopped after the embed call")

    monkeypatch.setattr(lymph.encoder.run, "run_embed", fake_embed)
    sets = ["data.synth=true", "data.synth_patients=4", "data.synth_test_patients=0",
            "data.synth_images=2:3", "data.synth_size=16", "ingest.size=16",
            "embed.method=weak", "embed.channels=[8, 16]"]
    with pytest.raises(LymphError, match="stopped after the embed call"):
        run_pipeline(None, sets=sets, artifacts=tmp_path / "art", progress=False)
    assert seen["method"] == "weak" and seen["channels"] == (8, 16)
    seen.clear()
    with pytest.raises(LymphError, match="stopped after the embed call"):
        run_pipeline(None, sets=sets[:-1], artifacts=tmp_path / "art", progress=False)
    assert seen["channels"] is None  # unset: the method's own widths


def test_run_requires_data(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["run", str(ROOT / "pipelines" / "default.toml"),
                                   "--artifacts", str(tmp_path)])
    assert res.exit_code == 1 and "data.path" in res.output


def test_embed_lr_schedule_is_checked_and_changes_the_fingerprint_only_when_set() -> None:
    from lymph.pipeline.run import _embed_settings

    cfg = resolve(None, ["embed.method=weak"])
    assert cfg["embed"]["lr_schedule"] == ""
    plain = _embed_settings(cfg["embed"])
    assert "lr_schedule" not in plain  # stores cached before the setting existed stay valid
    cos = _embed_settings(resolve(None, ["embed.method=weak", "embed.lr_schedule=cosine"])["embed"])
    assert cos == {**plain, "lr_schedule": "cosine"}
    with pytest.raises(LymphError, match="embed.lr_schedule: expected one of"):
        resolve(None, ["embed.lr_schedule=linear"])
    # computed features have no training: the setting does not reach their fingerprint
    assert _embed_settings(resolve(None, ["embed.method=morphometry",
                                          "embed.lr_schedule=cosine"])["embed"]) == {
        "method": "morphometry"}
