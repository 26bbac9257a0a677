"""Late fusion (issue 9, stage two): recovers an image signal the clinical data lacks; saves
to a model directory as JSON; `fit-head --fusion late` and `predict` use it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from lymph.baselines import LateFusion, LogisticClinical, logit_column
from lymph.cli import app
from lymph.store import open_store, write_store
from conftest import make_bags


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """Image signal planted (feature 0 of malignant bags), clinical features pure noise."""
    return write_store(tmp_path / "planted.h5", **make_bags(n_patients=80, signal=2.0, seed=4))


def test_recovers_planted_image_signal(planted: Path) -> None:
    s = open_store(planted)
    tr, te = np.arange(56), np.arange(56, 80)
    y = s.labels[te]
    late = LateFusion().fit(s.subset(tr))
    clin = LogisticClinical().fit(s.subset(tr))
    auc_late = roc_auc_score(y, late.predict_proba(s.subset(te))[:, 1])
    auc_clin = roc_auc_score(y, clin.predict_proba(s.subset(te))[:, 1])
    assert auc_late > 0.9, auc_late
    assert auc_late > auc_clin + 0.2, (auc_late, auc_clin)
    coef = late.coefficients()
    image = abs(coef["image_mean"]) + abs(coef["image_q75"])
    assert image > max(abs(coef[c]) for c in s.clinical_columns)
    assert late.logit_column_ is None and late.projection_ is not None


def test_uses_cell_logit_column(tmp_path: Path) -> None:
    """A weak store's cell logits are used directly (no projection learned)."""
    arrays = make_bags(n_patients=60, dim=3, signal=2.0, seed=5)
    arrays["feature_columns"] = ["weak:logit", "weak:p1", "weak:p2"]
    s = open_store(write_store(tmp_path / "weak.h5", **arrays))
    assert logit_column(s) == "weak:logit"
    m = LateFusion().fit(s.subset(np.arange(40)))
    assert m.projection_ is None and m.instance_scaler_ is None
    te = np.arange(40, 60)
    assert roc_auc_score(s.labels[te], m.predict_proba(s.subset(te))[:, 1]) > 0.85
    scores = m.cell_scores(s.subset(te[:2]))
    assert np.allclose(scores[0], s.bag(int(te[0]))[:, 0])


def test_nested_projection_scores_are_out_of_fold(planted: Path) -> None:
    """With labels shuffled, in-sample projection scores would look informative; the nested
    out-of-fold scores the fusion trains on must not (no optimistic stacking)."""
    arrays = make_bags(n_patients=60, signal=0.0, seed=6)
    s = open_store(write_store(planted.with_name("null.h5"), **arrays))
    m = LateFusion(Cs=(100.0,), threshold=0.5).fit(s)
    p = m.predict_proba(s)[:, 1]
    # a fusion fitted on optimistic scores would separate its own training patients well
    assert roc_auc_score(s.labels, p) < 0.85


def test_saved_model_predicts_the_same(planted: Path, tmp_path: Path) -> None:
    from lymph.head.modeldir import load_model, save_model

    s = open_store(planted)
    m = LateFusion().fit(s)
    save_model(m, tmp_path / "model", store=s)
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["estimator"] == "LateFusion" and meta["fusion"] == "late"
    assert not list((tmp_path / "model").glob("*.pt")) and not list((tmp_path / "model").glob("*.pkl"))
    loaded = load_model(tmp_path / "model").estimator
    assert np.allclose(loaded.predict_proba(s), m.predict_proba(s))
    assert loaded.threshold_ == m.threshold_


def test_cli_fit_head_late_and_predict(planted: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["fit-head", "--store", str(planted), "--fusion", "late", "--folds", "3",
                            "--out", str(tmp_path / "m"), "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "m.json").read_text())
    assert rep["model"] == "late-fusion" and rep["fusion"] == "late" and rep["pooling"] is None
    assert rep["roc_auc"]["mean"] > 0.8
    r = runner.invoke(app, ["predict", "--model", str(tmp_path / "m"), "--store", str(planted),
                            "--out", str(tmp_path / "pred.csv")])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "pred.csv").read_text().splitlines()
    assert lines[0] == "id,probability,predicted" and len(lines) == 81
    # the per-image CSV carries each cell's score (its weight in a mean is only 1 / n)
    import csv

    from lymph.head.modeldir import load_model

    att = list(csv.DictReader(open(tmp_path / "pred.attention.csv")))
    s = open_store(planted)
    want = np.concatenate(load_model(tmp_path / "m").estimator.cell_scores(s))
    assert len(att) == s.n_images == want.size
    got = np.array([float(a["cell_score"]) for a in att])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.std() > 0 and {a["weight"] for a in att if a["id"] == att[0]["id"]} == {
        f"{1 / s.bag_sizes[0]:.6g}"}
    r = runner.invoke(app, ["fit-head", "--store", str(planted), "--fusion", "early"])
    assert r.exit_code == 1 and "--fusion" in r.output


def test_inner_folds_take_their_rows_of_the_standardised_cells(planted: Path) -> None:
    # the fit standardises the fit patients' cells once and each inner fold takes its
    # patients' rows: the same numbers, in the same order, as standardising them apart
    from lymph.head.bags import instances_of

    s = open_store(planted)
    m = LateFusion().fit(s)
    rows = np.arange(s.n_patients)
    cells = m._standardised(s, rows)
    ptr = np.concatenate([[0], np.cumsum(s.bag_sizes[rows])])
    rng = np.random.default_rng(0)
    for idx in (np.sort(rng.choice(rows.size, 20, replace=False)), rng.permutation(rows.size)[:7],
                np.array([rows.size - 1]), np.array([], dtype=np.int64)):
        np.testing.assert_array_equal(instances_of(cells, ptr, idx), m._standardised(s, rows[idx]))
