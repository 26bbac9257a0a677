"""`compare-baselines`: every model on identical folds; the JSON rows' schema; paired
comparison; skipping models that need clinical data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_bags
from lymph.cli import app
from lymph.compare import CLINICAL, compare, default_models, paired, select_models
from lymph.errors import LymphError
from lymph.head.evaluate import METRICS, make_folds
from lymph.store import open_store, write_store

MODEL_NAMES = ("adaboost", "logistic", "clinical-mlp", "mean+clinical", "max+clinical",
               "attention+clinical", "gated+clinical", "attention-images-only",
               "mixture-of-experts", "late-fusion", "bag-stats-forest",
               "composition+clinical")  # the report's order

FAST = "adaboost,logistic,clinical-mlp,mean+clinical,mixture-of-experts,late-fusion"


@pytest.fixture
def store(tmp_path: Path):
    return open_store(write_store(tmp_path / "b.h5", **make_bags(n_patients=40, seed=2)))


def _quick(specs: dict) -> dict:
    """Shrink the MIL models' training for the tests (same estimators, fewer epochs)."""
    out = {}
    for name, spec in specs.items():
        def make(spec=spec):
            est = spec.make()
            if "max_epochs" in est.get_params():
                est.set_params(max_epochs=6, patience=3)
            if "n_estimators" in est.get_params() and est.get_params()["n_estimators"] > 50:
                est.set_params(n_estimators=50)
            return est
        out[name] = type(spec)(make, spec.inputs, spec.pooling, spec.description)
    return out


def test_default_models_order(store) -> None:
    specs, notes = default_models(store)
    assert tuple(specs) == MODEL_NAMES and notes == []
    assert [n for n, s in specs.items() if s.inputs == CLINICAL] == ["adaboost", "logistic",
                                                                     "clinical-mlp"]


def test_identical_folds_for_every_model(store) -> None:
    specs, _ = default_models(store)
    res = compare(store, _quick(specs), folds=3, repeats=2, seed=5)
    expected = make_folds(store.labels, 3, 2, 5)
    assert len(res.models) == len(MODEL_NAMES)
    for m in res.models.values():
        assert len(m.cv.folds) == len(expected)
        for f, (r, k, tr, te) in zip(m.cv.folds, expected):
            assert (f.repeat, f.fold) == (r, k)
            assert np.array_equal(f.train_rows, tr) and np.array_equal(f.test_rows, te)
        # every labelled patient scored once per repeat
        assert (m.cv.oof_fold >= 0).all()
    # models with weights recorded them out of fold, for every patient
    assert set(res.models["attention+clinical"].attention) == set(map(str, store.ids))
    p = res.paired[0]
    assert p["primary"] and res.models[p["baseline"]].spec.inputs == CLINICAL
    for m in ("balanced_accuracy", "roc_auc"):
        d = p[m]
        assert d["won"] + d["tied"] + d["lost"] == 6
        per = [f[m] for f in p["per_fold"]]
        assert d["mean_difference"] == pytest.approx(np.mean(per))


def test_paired_refuses_different_folds(store) -> None:
    specs, _ = default_models(store)
    a = compare(store, {"logistic": specs["logistic"]}, folds=3, seed=0).models["logistic"]
    b = compare(store, {"logistic": specs["logistic"]}, folds=3, seed=1).models["logistic"]
    with pytest.raises(LymphError, match="same folds"):
        paired(a, b)


def test_no_clinical_store_skips_with_note(tmp_path: Path) -> None:
    s = open_store(write_store(tmp_path / "n.h5", **make_bags(n_patients=20, n_clinical=0)))
    specs, notes = default_models(s)
    assert list(specs) == ["attention-images-only", "bag-stats-forest"]
    assert notes and "adaboost" in notes[0] and "late-fusion" in notes[0]
    with pytest.raises(LymphError, match="cannot run"):
        select_models(specs, "logistic")


def test_select_models(store) -> None:
    specs, _ = default_models(store)
    assert list(select_models(specs, "late-fusion,adaboost")) == ["late-fusion", "adaboost"]
    with pytest.raises(LymphError, match="unknown model"):
        select_models(specs, "svm")


def test_cli_json_schema(store, tmp_path: Path) -> None:
    out_json = tmp_path / "cmp.json"
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(store.path), "--folds", "3",
                                 "--models", FAST, "--json", str(out_json), "--seed", "1"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out_json.read_text())
    assert isinstance(rows, list) and len(rows) == len(FAST.split(","))
    assert [x["model"] for x in rows] == sorted(
        [x["model"] for x in rows], key=lambda n: -next(
            x["balanced_accuracy"]["mean"] for x in rows if x["model"] == n))
    for row in rows:
        for key in ("model", "pooling", "folds", "repeats", "n_patients", "seconds", *METRICS):
            assert key in row, key
        assert row["folds"] == 3 and row["repeats"] == 1 and row["n_patients"] == 40
        assert isinstance(row["seconds"], float)
        for m in METRICS:
            assert set(row[m]) == {"mean", "std"} and 0 <= row[m]["mean"] <= 1
        assert len(row["per_fold"]) == 3
    pool = {x["model"]: x["pooling"] for x in rows}
    assert pool["adaboost"] is None and pool["late-fusion"] is None
    assert pool["mean+clinical"] == "mean"
    for name in FAST.split(","):
        assert name in r.output  # the rich table
    assert "paired:" in r.output
