"""Range checks: every numeric option and setting, one message format, before torch.

``NAME: expected ALLOWED, got VALUE``: the CLI names its flag (``--crop``), the pipeline
file its setting (``head.folds``), the library its parameter (``crop``). Option errors
are found before torch is imported: all the bad options below run in one child process
that checks ``sys.modules`` after each.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import ENV, cli

D, S, M, C = "DATA", "S.h5", "MODEL", "C.zarr"
#: (command line, flag named in the error)
BAD: list[tuple[list[str], str]] = [
    (["ingest", D, "--out", "o.zarr", "--crop", "0"], "--crop"),
    (["ingest", D, "--out", "o.zarr", "--crop", "-5"], "--crop"),
    (["ingest", D, "--out", "o.zarr", "--size", "0"], "--size"),
    (["ingest", D, "--out", "o.zarr", "--size", "100000"], "--size"),
    (["ingest", D, "--out", "o.zarr", "--workers", "0"], "--workers"),
    (["embed", "--images", C, "--out", "s.h5", "--epochs", "0"], "--epochs"),
    (["embed", "--images", C, "--out", "s.h5", "--lr", "0"], "--lr"),
    (["embed", "--images", C, "--out", "s.h5", "--lr", "-1e-3"], "--lr"),
    (["embed", "--images", C, "--out", "s.h5", "--lr", "nan"], "--lr"),
    (["embed", "--images", C, "--out", "s.h5", "--lr", "inf"], "--lr"),
    (["embed", "--images", C, "--out", "s.h5", "--batch-size", "0"], "--batch-size"),
    (["embed", "--images", C, "--out", "s.h5", "--dim", "0"], "--dim"),
    (["embed", "--images", C, "--out", "s.h5", "--seed", "-1"], "--seed"),
    (["embed", "--data", D, "--out", "s.h5", "--crop", "0"], "--crop"),
    (["embed", "--images", C, "--out", "s.h5", "--folds", "1"], "--folds"),
    (["embed", "--images", C, "--out", "s.h5", "--device", "gpu"], "--device"),
    (["embed", "--images", C, "--out", "s.h5", "--method", "aee"], "--method"),
    (["embed", "--images", C, "--out", "s.h5", "--method", "ae+morpho"], "--method"),
    (["fit-head", "--store", S, "--pooling", "attn"], "--pooling"),
    (["fit-head", "--store", S, "--fusion", "early"], "--fusion"),
    (["fit-head", "--store", S, "--folds", "1"], "--folds"),
    (["fit-head", "--store", S, "--repeats", "0"], "--repeats"),
    (["fit-head", "--store", S, "--epochs", "0"], "--epochs"),
    (["fit-head", "--store", S, "--patience", "0"], "--patience"),
    (["fit-head", "--store", S, "--lr", "0"], "--lr"),
    (["fit-head", "--store", S, "--weight-decay", "-1"], "--weight-decay"),
    (["fit-head", "--store", S, "--dropout", "1"], "--dropout"),
    (["fit-head", "--store", S, "--dropout", "-0.1"], "--dropout"),
    (["fit-head", "--store", S, "--batch-size", "0"], "--batch-size"),
    (["fit-head", "--store", S, "--attention-hidden", "0"], "--attention-hidden"),
    (["fit-head", "--store", S, "--threads", "0"], "--threads"),
    (["fit-head", "--store", S, "--seed", "-3"], "--seed"),
    (["fit-head", "--store", S, "--seed", str(2**40)], "--seed"),
    (["fit-head", "--store", S, "--threshold", "2.0"], "--threshold"),
    (["fit-head", "--store", S, "--threshold", "0"], "--threshold"),
    (["fit-head", "--store", S, "--threshold", "nan"], "--threshold"),
    (["compare-baselines", "--store", S, "--folds", "1"], "--folds"),
    (["compare-baselines", "--store", S, "--repeats", "0"], "--repeats"),
    (["predict", "--model", M, "--store", S, "--out", "p.csv", "--select", "some"], "--select"),
    (["explain", "P1", "--model", M, "--store", S, "--k", "0"], "--k"),
    (["explain", "../../etc/x", "--model", M, "--store", S], "PATIENT"),
    (["synth", "o", "--size", "0"], "--size"),
    (["synth", "o", "--patients", "0"], "--patients"),
    (["synth", "o", "--seed", "-1"], "--seed"),
]

CHILD = r"""
import json, sys
from typer.testing import CliRunner
from lymph.cli import app
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    out.append([r.exit_code, r.output, "torch" in sys.modules])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str, bool]]:
    d = tmp_path_factory.mktemp("options")
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([a for a, _ in BAD])], check=False,
                       cwd=d, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("k", range(len(BAD)), ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_option_is_one_error_before_torch(results: list[tuple[int, str, bool]],
                                              k: int) -> None:
    code, output, torch_loaded = results[k]
    flag = BAD[k][1]
    assert code == 1, output
    assert "Traceback" not in output
    lines = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, output
    assert re.match(rf"error: {re.escape(flag)}[:,] (expected|.*is not a plain)", lines[0]), lines[0]
    assert ", got " in lines[0] or "plain patient name" in lines[0], lines[0]
    assert not torch_loaded, "torch was imported before the option was checked"


@pytest.mark.parametrize("setting, value", [
    ("head.folds", "1"), ("head.repeats", "0"), ("head.dropout", "1.5"), ("head.lr", "0"),
    ("head.threshold", "2.0"), ("head.batch_size", "0"), ("head.max_epochs", "0"),
    ("head.mlp", "[0, 8]"), ("head.attention_hidden", "-1"), ("head.seed", "-1"),
    ("head.pooling", "'attn'"), ("ingest.size", "4"), ("ingest.crop", "-1"),
    ("embed.lr", "-0.1"), ("embed.folds", "1"), ("embed.device", "'tpu'"),
    ("compare.folds", "1"), ("data.synth_patients", "0"),
])
def test_pipeline_setting_out_of_range(tmp_path: Path, setting: str, value: str) -> None:
    section, key = setting.split(".")
    p = tmp_path / "p.toml"
    p.write_text(f"[{section}]\n{key} = {value}\n")
    for how in (["run", p], ["run", tmp_path / "none.toml", "--set", f"{setting}={value}"]):
        if how[1] != p:
            (tmp_path / "none.toml").write_text("")
        r = cli(*how, "--artifacts", tmp_path / "a")
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert re.search(rf"^error: .*{re.escape(setting)}: expected .*, got ", r.output,
                         re.MULTILINE), r.output
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_library_messages_name_the_setting(tmp_path: Path) -> None:
    from lymph.data.cache import ingest
    from lymph.errors import LymphError

    with pytest.raises(LymphError, match=r"^crop: expected an integer >= 1, got 0$"):
        ingest(tmp_path, tmp_path / "c.zarr", crop=0)
    with pytest.raises(LymphError, match=r"^size: expected an integer from 8 to 1024, got 2$"):
        ingest(tmp_path, tmp_path / "c.zarr", size=2)


def test_early_name_checks_read_the_registries() -> None:
    """The names the CLI checks before importing torch are the registries' own, listed
    without importing torch."""
    import subprocess
    import sys

    from lymph.head.registry import POOLINGS

    code = ("import sys; from lymph.encoder.registry import method_names; "
            "from lymph.head.registry import pooling_names, fusion_names; "
            "print(','.join(method_names())); print(','.join(pooling_names())); "
            "print(','.join(fusion_names())); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    methods, poolings, fusions = out.stdout.split()
    assert methods == "ae,contrastive,morphometry,weak"
    assert tuple(poolings.split(",")) == tuple(POOLINGS)
    assert fusions == "concat,late,composition"
