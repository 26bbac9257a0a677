"""`lymph fit-head` through the CLI: outputs, JSON schema, variants, errors, fast --help."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_bags
from lymph.cli import app
from lymph.store import write_store

runner = CliRunner()
FAST = ["--folds", "3", "--epochs", "12", "--patience", "5"]
KEYS = ("pooling", "folds", "repeats", "n_patients", "seconds")
METRICS = ("balanced_accuracy", "accuracy", "f1", "roc_auc", "pr_auc")


def test_fit_head_writes_table_json_oof_plot_and_model(bag_store: Path, tmp_path: Path) -> None:
    js, model = tmp_path / "m.json", tmp_path / "model"
    r = runner.invoke(app, ["fit-head", "--store", str(bag_store), "--pooling", "attention",
                            "--repeats", "2", "--seed", "1", "--json", str(js), "--out",
                            str(model), *FAST])
    assert r.exit_code == 0, r.output
    assert "balanced_accuracy" in r.output and "attention+clinical" in r.output
    rep = json.loads(js.read_text())
    for k in KEYS:
        assert k in rep, k
    assert (rep["pooling"], rep["folds"], rep["repeats"], rep["n_patients"]) == ("attention", 3, 2, 40)
    for m in METRICS:
        assert set(rep[m]) == {"mean", "std"} and 0 <= rep[m]["mean"] <= 1
    assert len(rep["per_fold"]) == 6
    oof = list(csv.DictReader(open(tmp_path / "m.oof.csv")))
    assert len(oof) == 80 and set(oof[0]) >= {"id", "repeat", "fold", "probability", "predicted"}
    assert (tmp_path / "m.pr.png").read_bytes()[:4] == b"\x89PNG"
    for f in ("model.json", "head.pt", "cv/metrics.json", "cv/oof.csv", "cv/pr.png"):
        assert (model / f).is_file(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


@pytest.mark.parametrize("flags,model", [(["--no-images"], "clinical-mlp"),
                                         (["--no-clinical", "--pooling", "max"], "max-images-only"),
                                         (["--pooling", "gated", "--threshold", "0.5"], "gated+clinical"),
                                         (["--pooling", "mean"], "mean+clinical")])
def test_fit_head_variants(bag_store: Path, tmp_path: Path, flags: list[str], model: str) -> None:
    js = tmp_path / "v.json"
    r = runner.invoke(app, ["fit-head", "--store", str(bag_store), "--json", str(js), *FAST, *flags])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["model"] == model
    if "0.5" in flags:
        assert rep["threshold"] == {"mean": 0.5, "std": 0.0}


def test_store_without_clinical_columns_fits_images_only(tmp_path: Path) -> None:
    st = write_store(tmp_path / "noclin.h5", **make_bags(n_clinical=0))
    js = tmp_path / "n.json"
    r = runner.invoke(app, ["fit-head", "--store", str(st), "--json", str(js), *FAST])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["model"] == "attention-images-only"


@pytest.mark.parametrize("args,message", [
    (["--pooling", "sum"], "pooling: expected one of attention, gated, mean, max"),
    (["--threshold", "high"], "--threshold: expected 'inner' or a number"),
    (["--folds", "30"], "needs at least 30 patients of each class"),
    (["--no-images", "--no-clinical"], "expected at least one input"),
])
def test_fit_head_errors_are_one_line(bag_store: Path, args: list[str], message: str) -> None:
    r = runner.invoke(app, ["fit-head", "--store", str(bag_store), *args])
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output


def test_fit_head_missing_store_and_unlabelled_store(tmp_path: Path) -> None:
    r = runner.invoke(app, ["fit-head", "--store", str(tmp_path / "nope.h5")])
    assert r.exit_code == 1 and "no such store file" in r.output
    d = make_bags()
    d["labels"] = np.full(40, -1, np.int8)
    st = write_store(tmp_path / "u.h5", **d)
    r = runner.invoke(app, ["fit-head", "--store", str(st)])
    assert r.exit_code == 1 and "empty selection" in r.output


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, lymph.cli; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
