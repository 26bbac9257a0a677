"""The clinical report: triage thresholds chosen inside training folds, bootstrap intervals,
calibration, decision curve, and report.json reproducible from oof.csv + comparison.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from lymph.cli import app
from lymph.report import calibration as cal
from lymph.report import decision, triage, uncertainty


def _cv(y: np.ndarray, p: np.ndarray, folds: int = 4, seed: int = 0) -> SimpleNamespace:
    """A one-repeat CV result over ``p`` (stratified folds, like make_folds)."""
    from lymph.head.evaluate import FoldResult, make_folds

    fl = make_folds(y, folds, 1, seed)
    fr = [FoldResult(r, k, tr, te, 0.5, {}, 0.0) for r, k, tr, te in fl]
    oof_f = np.full((1, y.size), -1)
    for f in fr:
        oof_f[0, f.test_rows] = f.fold
    return SimpleNamespace(oof=p[None, :].astype(float), labels=y, folds=fr,
                           oof_fold=oof_f, oof_threshold=np.full((1, y.size), 0.5))


def _data(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    p = 1 / (1 + np.exp(-(2.0 * (y - 0.5) * 2 + rng.normal(0, 1.5, n))))
    return y, p


def test_sensitivity_threshold_is_the_highest_reaching_target() -> None:
    y, p = _data()
    t = triage.sensitivity_threshold(y, p, 0.9)
    assert np.mean(p[y == 1] >= t) >= 0.9
    above = np.unique(p[p > t])
    assert np.mean(p[y == 1] >= above[0]) >= 0.9  # the lowest score sent reaches it ...
    assert np.mean(p[y == 1] >= above[1]) < 0.9  # ... and the next score up misses it
    below = np.unique(p[p < t])
    assert t == pytest.approx((above[0] + below[-1]) / 2)  # halfway between the two scores


def test_fold_threshold_never_sees_its_test_patients() -> None:
    y, p = _data()
    cv = _cv(y, p)
    t0 = triage.fold_thresholds(cv, 0.95)
    te = cv.folds[0].test_rows
    p2 = p.copy()
    p2[te] = np.random.default_rng(1).random(te.size)  # change only fold 1's patients
    t1 = triage.fold_thresholds(_cv(y, p2), 0.95)
    assert np.allclose(t0[0, te], t1[0, te])  # their threshold did not move
    assert not np.allclose(t0, t1, equal_nan=True)  # the other folds' did (they train on fold 1)


def test_operating_point_counts_and_per_100() -> None:
    y, p = _data()
    cv = _cv(y, p)
    op = triage.operating_point(cv, np.full((1, y.size), 0.5))
    c = op["confusion_repeat_1"]
    pred = (p >= 0.5).astype(int)
    assert c["tp"] == int(((pred == 1) & (y == 1)).sum()) and c["fn"] == int(((pred == 0) & (y == 1)).sum())
    assert op["avoided_per_100"] == pytest.approx(100 * np.mean(pred == 0))
    assert op["missed_per_100"] == pytest.approx(100 * c["fn"] / y.size)
    assert op["sensitivity"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))


def test_bootstrap_intervals_and_paired_difference() -> None:
    y, p = _data()
    thr = {"balanced": np.full((1, y.size), 0.5)}
    q = np.clip(p + np.random.default_rng(2).normal(0, 0.2, p.size), 0, 1)
    models = {"a": (p[None], thr), "b": (q[None], thr)}
    r1 = uncertainty.bootstrap(y, models, ("a", "b"), n_boot=200, seed=0)
    r2 = uncertainty.bootstrap(y, models, ("a", "b"), n_boot=200, seed=0)
    assert r1 == r2  # a seed fixes it
    auc = r1["models"]["a"]["roc_auc"]
    from sklearn.metrics import roc_auc_score

    assert auc["estimate"] == pytest.approx(roc_auc_score(y, p))
    assert auc["low"] < auc["estimate"] < auc["high"]
    same = uncertainty.bootstrap(y, {"a": (p[None], thr), "c": (p[None], thr)}, ("a", "c"), n_boot=50)
    d = same["difference"]["figures"]["roc_auc"]
    assert d["low"] == d["high"] == d["estimate"] == 0.0  # paired: identical models differ by 0
    s = uncertainty.plain_sentence(same["difference"], True)
    assert "do not add measurably" in s
    r1["difference"]["figures"]["roc_auc"].update(estimate=0.05, low=0.01, high=0.09)
    assert "add measurably" in uncertainty.plain_sentence(r1["difference"], True)


def test_bootstrap_auc_equals_sklearn_with_sample_weights() -> None:
    from sklearn.metrics import roc_auc_score

    y, p = _data(60)
    p = np.round(p, 1)  # ties count half, as in sklearn
    W = np.random.default_rng(3).multinomial(60, np.full(60, 1 / 60), size=20).astype(float)
    got = uncertainty.weighted_auc(W, y, p)
    want = [roc_auc_score(y, p, sample_weight=w) for w in W]
    assert np.allclose(got, want)
    old = uncertainty.MAX_PAIRS
    try:
        uncertainty.MAX_PAIRS = 0  # the large-cohort path: sklearn per sample
        assert np.allclose(uncertainty.weighted_auc(W, y, p), want)
    finally:
        uncertainty.MAX_PAIRS = old


def test_calibration_slope_intercept_and_refit_in_folds() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 4000)
    y = (rng.random(p.size) < p).astype(int)
    slope, icpt = cal.slope_intercept(y, p)
    assert slope == pytest.approx(1.0, abs=0.12) and icpt == pytest.approx(0.0, abs=0.1)
    shrunk = 1 / (1 + np.exp(-(cal.logit(p) - 1.0)))  # under-predicts malignancy
    _, i2 = cal.slope_intercept(y, shrunk)
    assert i2 == pytest.approx(1.0, abs=0.15)
    c = cal.calibration(_cv(y[:600], shrunk[:600], folds=5))
    assert c["off"] and c["after"]["brier"] < c["before"]["brier"]
    assert abs(c["after"]["intercept"]) < abs(c["before"]["intercept"])


def test_decision_curve_perfect_model_and_treat_all() -> None:
    y = np.array([1] * 30 + [0] * 70)
    p = y.astype(float)
    dc = decision.decision_curve(y, np.ones((1, y.size), bool), {"perfect": p[None]})
    assert np.allclose(dc["models"]["perfect"], 0.3)  # net benefit = prevalence
    t = np.asarray(dc["thresholds"])
    assert np.allclose(dc["treat_all"], 0.3 - 0.7 * t / (1 - t))
    y2, p2 = _data()  # a real model: the counts agree with sklearn's confusion matrix
    nb = decision.net_benefit(y2, p2)
    for j in (4, 29, 69):
        c = triage.counts(y2, (p2 >= t[j]).astype(int))
        assert nb[j] == pytest.approx((c["tp"] - c["fp"] * t[j] / (1 - t[j])) / y2.size)


@pytest.fixture(scope="module")
def morph_store(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lymph.data.cache import open_cache
    from lymph.encoder.methods.morphometry import write_morphometry_store

    return write_morphometry_store(open_cache(synth_cache),
                                   tmp_path_factory.mktemp("repc") / "m.h5", workers=1)


def test_report_json_reproducible_from_oof_csv(morph_store: Path, synth_cache: Path,
                                               tmp_path: Path) -> None:
    """Every triage figure of report.json is recomputed from oof.csv and the folds'
    patients in comparison.json: the threshold from the other folds' rows only."""
    out = tmp_path / "r"
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(morph_store), "--folds", "3",
                                 "--models", "logistic,late-fusion", "--out", str(out),
                                 "--images", str(synth_cache), "--target-sensitivity", "0.9"])
    assert r.exit_code == 0, r.output
    assert "cytometries avoided" in r.output  # the answer on the terminal too
    rep = json.loads((out / "report.json").read_text())
    cmp = json.loads((out / "comparison.json").read_text())
    assert rep["chosen"] == "late-fusion" and rep["clinical_only"] == "logistic"
    assert rep["target_sensitivity"] == 0.9
    with open(out / "oof.csv") as f:
        rows = [x for x in csv.DictReader(f) if x["model"] == "late-fusion"]
    prob = {x["id"]: float(x["probability"]) for x in rows}
    lab = {x["id"]: int(x["label"]) for x in rows}
    tp = fn = tn = fp = 0
    for fold in cmp["fold_patients"]:
        train = [i for i in prob if i not in set(fold["test"])]
        t = triage.sensitivity_threshold(np.array([lab[i] for i in train]),
                                         np.array([prob[i] for i in train]), 0.9)
        for i in fold["test"]:
            pred = prob[i] >= t - 5e-7  # oof.csv rounds to 6 decimals
            tp += pred and lab[i] == 1
            fn += (not pred) and lab[i] == 1
            fp += pred and lab[i] == 0
            tn += (not pred) and lab[i] == 0
    got = rep["triage"]["late-fusion"]["target_sensitivity"]["confusion_repeat_1"]
    assert got == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    for key in ("cohort", "uncertainty", "calibration", "decision_curve", "drivers", "patients",
                "sentence"):
        assert key in rep
    assert len(rep["patients"]) == 19  # every store patient, unlabelled included
    assert rep["drivers"]["coefficients"] and rep["drivers"]["measurements"]
    md = (out / "report.md").read_text()
    for sec in ("## Summary", "## Cohort", "## Triage operating points",
                "## Images against clinical data alone", "## Calibration",
                "## Clinical usefulness", "## What drives it"):
        assert sec in md
    assert (out / "report.html").is_file() and (out / "decision.png").is_file()
    assert (out / "reliability.png").is_file() and (out / "trade.png").is_file()


def test_bad_target_sensitivity_is_one_error_line(morph_store: Path) -> None:
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(morph_store),
                                 "--target-sensitivity", "1.5"])
    assert r.exit_code == 1
    assert "--target-sensitivity: expected a number in (0, 1]" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(morph_store),
                                 "--models", "logistic", "--chosen", "late-fusion"])
    assert r.exit_code == 1 and "--chosen: 'late-fusion' is not among the models" in r.output


def test_ls_says_placeholders_in_words() -> None:
    from lymph.pipeline.listing import describe_settings

    s = describe_settings({"method": "ae", "dim": 0, "lr": 0.0, "seed": 0, "crop": None})
    assert "lr=default" in s and "dim=default" in s and "crop=none" in s and "seed=0" in s
    assert "0.0" not in s and "None" not in s


def test_run_predicts_unlabelled_and_writes_submission(synth_data: Path, tmp_path: Path) -> None:
    """`lymph run` on challenge data: the test patients predicted with the pipeline's model
    (late fusion here), the submission Id,Predicted, and the report with every stage said."""
    art = tmp_path / "art"
    r = CliRunner().invoke(app, ["run", "--data", str(synth_data), "--artifacts", str(art),
                                 "--set", "embed.method=morphometry", "--set", "ingest.size=32",
                                 "--set", "head.fusion=late", "--set", "head.folds=3",
                                 "--set", "compare.folds=3", "--target-sensitivity", "0.9",
                                 str(Path(__file__).resolve().parents[1] / "pipelines" / "default.toml")])
    assert r.exit_code == 0, r.output
    assert "[embed] running" in r.output  # a long stage says it started
    sub = next(art.glob("compare/*/submission.csv"))
    rows = list(csv.reader(sub.read_text().splitlines()))
    assert rows[0] == ["Id", "Predicted"] and len(rows) == 1 + 3  # the 3 test patients
    assert all(x[1] in ("0", "1") for x in rows[1:])
    pred = list(csv.DictReader((sub.parent / "predictions.csv").read_text().splitlines()))
    assert {p["id"] for p in pred} == {x[0] for x in rows[1:]}
    rep = json.loads((sub.parent / "report" / "report.json").read_text())
    assert rep["chosen"] == "late-fusion" and rep["target_sensitivity"] == 0.9
    final = [p for p in rep["patients"] if p["source"] == "final model"]
    assert len(final) == 3 and all(p["probability"] is not None for p in final)


def test_fit_head_without_out_says_nothing_saved_and_predict_says_in_sample(tmp_path: Path) -> None:
    from conftest import make_bags

    from lymph.store import write_store

    st = write_store(tmp_path / "s.h5", **make_bags(n_patients=24))
    base = ["fit-head", "--store", str(st), "--folds", "2", "--epochs", "3", "--patience", "2",
            "--fusion", "late"]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output
    assert "no model saved" in r.output
    r = CliRunner().invoke(app, base + ["--out", str(tmp_path / "m")])
    assert r.exit_code == 0 and "no model saved" not in r.output
    r = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "m"), "--store", str(st),
                                 "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    assert "24 of 24 patients are the model's training patients" in r.output
    assert "in-sample" in r.output


def test_report_without_a_clinical_only_model(morph_store: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(morph_store), "--folds", "3",
                                 "--models", "late-fusion", "--out", str(tmp_path / "r"),
                                 "--no-montages"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "no clinical-only model in this comparison" in md
    assert "No clinical-only model: no paired difference." in md


def test_report_with_repeats_averages_over_repeats(morph_store: Path, tmp_path: Path) -> None:
    from lymph.compare import compare, default_models, select_models
    from lymph.report.analysis import analyse
    from lymph.store import open_store

    s = open_store(morph_store)
    res = compare(s, select_models(default_models(s)[0], "logistic,late-fusion"), folds=3,
                  repeats=2)
    a = analyse(res, s, chosen="late-fusion", n_boot=100)
    op = a["triage"]["late-fusion"]["target_sensitivity"]
    assert [q["repeat"] for q in op["per_repeat"]] == [0, 1]
    assert op["sensitivity"] == pytest.approx(np.mean([q["sensitivity"] for q in op["per_repeat"]]))
    assert len(a["fold_thresholds"]["late-fusion"]["target_sensitivity"]) == 6
    assert len(a["calibration"]["late-fusion"]["before"]["per_repeat"]) == 2
