"""Issue 18: cell-composition features (k-means prototypes fitted on the training patients'
cells, per-patient log proportions) fused with clinical data in compare-baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_bags
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from lymph.baselines.composition import CompositionFusion, bag_proportions
from lymph.cli import app
from lymph.store import EmbeddingStore, open_store, write_store


def _composition_store(n: int = 60, seed: int = 0) -> EmbeddingStore:
    """Three cell types (well separated clusters); malignant patients hold 30 % of type 2,
    reactive ones 5 %. The average cell barely differs; the proportions do."""
    rng = np.random.default_rng(seed)
    labels = np.array([1, 0] * (n // 2), dtype=np.int8)
    sizes = rng.integers(20, 40, n)
    centres = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    share2 = np.where(labels == 1, 0.3, 0.05)
    kinds = np.concatenate([rng.choice(3, s, p=[(1 - q) / 2, (1 - q) / 2, q])
                            for s, q in zip(sizes, share2)])
    emb = (centres[kinds] + rng.normal(0, 0.5, (kinds.size, 3))).astype(np.float32)
    return EmbeddingStore(
        path=None, embeddings=emb, patient_ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        ids=np.array([f"P{i}" for i in range(n)], dtype=object), labels=labels,
        clinical=rng.normal(0, 1, (n, 2)).astype(np.float32), clinical_columns=["a", "b"])


def test_bag_proportions_matches_a_loop() -> None:
    rng = np.random.default_rng(1)
    sizes = np.array([3, 1, 5, 2])
    assign = rng.integers(0, 4, sizes.sum())
    got = bag_proportions(assign, sizes, 4)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    want = np.stack([np.bincount(assign[ptr[i]:ptr[i + 1]], minlength=4) for i in range(4)])
    np.testing.assert_array_equal(got, want)


def test_nearest_centre_in_blocks_equals_the_whole_matrix() -> None:
    from lymph.baselines.composition import _nearest

    rng = np.random.default_rng(2)
    x = rng.normal(size=(1000, 5)).astype(np.float32)
    c = rng.normal(size=(7, 5))
    xd = x.astype(np.float64)
    want = np.argmin(((xd[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    for block in (1, 64, 999, 1 << 16):
        np.testing.assert_array_equal(_nearest(x, c, block=block), want)


def test_composition_finds_a_planted_proportion_signal() -> None:
    train, test = _composition_store(seed=0), _composition_store(seed=1)
    for clinical in (True, False):
        est = CompositionFusion(n_prototypes=3, clinical=clinical, seed=0).fit(train)
        p = est.predict_proba(test)[:, 1]
        assert np.isfinite(p).all() and roc_auc_score(test.labels, p) > 0.9
    # the clinical columns are noise: the shuffled-label model is near chance
    shuffled = _composition_store(seed=0)
    shuffled.labels = np.random.default_rng(5).permutation(shuffled.labels)
    p = CompositionFusion(n_prototypes=3, seed=0).fit(shuffled).predict_proba(test)[:, 1]
    assert roc_auc_score(test.labels, p) < 0.8


def test_prototypes_come_from_the_fit_patients_only_and_are_seeded() -> None:
    s = _composition_store()
    tr, te = np.arange(0, 40), np.arange(40, 60)
    a = CompositionFusion(n_prototypes=3, seed=0).fit(s.subset(tr))
    b = CompositionFusion(n_prototypes=3, seed=0).fit(s.subset(tr))
    np.testing.assert_array_equal(a.centres_, b.centres_)
    before = a.centres_.copy()
    a.predict_proba(s.subset(te))  # predicting never refits the prototypes
    np.testing.assert_array_equal(a.centres_, before)
    protos = a.prototype_of(s.subset(te))
    assert [len(x) for x in protos] == list(s.bag_sizes[te])
    assert set(a.coefficients()) == {"a", "b", "proto0", "proto1", "proto2"}


def test_compare_runs_composition_and_opt_in_variants(tmp_path: Path) -> None:
    p = write_store(tmp_path / "b.h5", **make_bags(n_patients=30, seed=2))
    js = tmp_path / "c.json"
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(p), "--folds", "3", "--json",
                                 str(js), "--models",
                                 ("logistic,composition+clinical,composition4+clinical,"
                                  "composition-images-only,late-fusion+composition")])
    assert r.exit_code == 0, r.output
    rows = {x["model"]: x for x in json.loads(js.read_text())}
    assert rows["composition-images-only"]["inputs"] == "images"
    assert rows["composition4+clinical"]["params"]["n_prototypes"] == 4
    assert rows["late-fusion+composition"]["params"]["n_prototypes"] == 8
    assert all(len(x["per_fold"]) == 3 for x in rows.values())
    assert open_store(p).n_patients == 30


def test_corrected_interval_is_wider_than_the_naive_one() -> None:
    from lymph.intervals import corrected_interval, naive_interval

    d = np.random.default_rng(0).normal(0.02, 0.05, 25)
    lo_n, hi_n = naive_interval(d)
    lo_c, hi_c = corrected_interval(d, 0.25)
    assert lo_c < lo_n < d.mean() < hi_n < hi_c
    # sd * sqrt(1/25 + 1/4) against sd / 5: 2.69 times wider
    assert abs((hi_c - lo_c) / (hi_n - lo_n) - np.sqrt((1 / 25 + 0.25) * 25)) < 1e-9


def test_prototype_montage_and_table() -> None:
    from lymph.report.prototypes import prototype_montage

    s = _composition_store()

    class Source:
        def read(self, row: int) -> np.ndarray:
            return np.full((16, 16, 3), row % 255, dtype=np.uint8)

    est = CompositionFusion(n_prototypes=3, seed=0).fit(s)
    img, table = prototype_montage(s, est, Source(), per=4)
    assert img.size[0] >= 4 * 16 and len(table) == 3
    # the planted type (30 % of malignant, 5 % of reactive cells) is one prototype
    gaps = [t["share_malignant"] - t["share_reactive"] for t in table]
    top = int(np.argmax(gaps))
    assert gaps[top] > 0.15 and table[top]["coefficient"] > 0


# ---- K chosen in the folds (n_prototypes="auto") ----------------------------------------------
def test_auto_chooses_k_from_the_grid_by_inner_cv_and_records_it() -> None:
    s = _composition_store()
    a = CompositionFusion(seed=0).fit(s)  # the default: "auto" over (4, 8, 16)
    assert a.get_params()["n_prototypes"] == "auto"
    assert a.n_prototypes_ in (4, 8, 16) and a.centres_.shape == (a.n_prototypes_, s.dim)
    assert set(a.prototype_losses_) == {"4", "8", "16"}
    # the chosen K is the one of least inner-CV log loss (ties to the smaller K)
    losses = {int(k): v for k, v in a.prototype_losses_.items()}
    assert a.n_prototypes_ == min(losses, key=lambda k: (losses[k], k))
    assert a.C_ in a.Cs and len(a.coef_) == 2 + a.n_prototypes_
    info = a.fold_info()
    assert info["n_prototypes"] == a.n_prototypes_ and info["C"] == a.C_
    # deterministic for a seed
    b = CompositionFusion(seed=0).fit(s)
    np.testing.assert_array_equal(a.centres_, b.centres_)
    np.testing.assert_array_equal(a.predict_proba(s), b.predict_proba(s))
    # a fixed K is that K, with the same features as auto would have built for it
    f = CompositionFusion(n_prototypes=a.n_prototypes_, seed=0).fit(s)
    np.testing.assert_array_equal(f.centres_, a.centres_)
    assert f.prototype_losses_ == {} and f.fold_info() == {"n_prototypes": a.n_prototypes_,
                                                           "C": f.C_}


def test_auto_grid_and_n_prototypes_are_checked() -> None:
    from lymph.errors import LymphError

    s = _composition_store(n=20)
    for bad in ({"n_prototypes": "many"}, {"n_prototypes": 1}, {"n_prototypes": True},
                {"prototype_grid": ()}, {"prototype_grid": (4, 1)}):
        try:
            CompositionFusion(**bad).fit(s)
        except LymphError as e:
            assert ("n_prototypes" in str(e)) or ("prototype_grid" in str(e))
        else:
            raise AssertionError(f"{bad} accepted")
    # a grid K above the number of cells is skipped; the rest still compete
    est = CompositionFusion(prototype_grid=(2, 3, 10**6), seed=0).fit(s)
    assert est.n_prototypes_ in (2, 3) and set(est.prototype_losses_) == {"2", "3"}


def test_compare_records_the_chosen_k_per_fold(tmp_path: Path) -> None:
    p = write_store(tmp_path / "b.h5", **make_bags(n_patients=30, seed=2))
    js = tmp_path / "c.json"
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(p), "--folds", "3", "--json",
                                 str(js), "--models", "logistic,composition+clinical"])
    assert r.exit_code == 0, r.output
    row = {x["model"]: x for x in json.loads(js.read_text())}["composition+clinical"]
    assert row["params"]["n_prototypes"] == "auto"
    assert [f["n_prototypes"] in (4, 8, 16) for f in row["per_fold"]] == [True] * 3
    assert all(set(f["prototype_losses"]) == {"4", "8", "16"} for f in row["per_fold"])


# ---- saved composition models (fit-head --fusion composition, predict) -----------------------
@pytest.fixture(scope="module")
def _fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbeddingStore, CompositionFusion, Path]:
    """One composition model fitted and saved for the module (tests copy the directory)."""
    from lymph.head.modeldir import save_model

    s = _composition_store(n=40)
    est = CompositionFusion(seed=0, inner_folds=3).fit(s)
    return s, est, save_model(est, tmp_path_factory.mktemp("saved") / "model", store=s)


@pytest.fixture
def saved(_fitted: tuple, tmp_path: Path) -> tuple[EmbeddingStore, CompositionFusion, Path]:
    import shutil

    s, est, path = _fitted
    return s, est, Path(shutil.copytree(path, tmp_path / "model"))


def test_saved_composition_model_predicts_the_same(saved: tuple) -> None:
    from lymph.head.modeldir import load_model

    s, est, path = saved
    meta = json.loads((path / "model.json").read_text())
    assert meta["estimator"] == "CompositionFusion" and meta["fusion"] == "composition"
    state = meta["composition"]
    assert state["n_prototypes"] == est.n_prototypes_ in (4, 8, 16)
    assert len(state["centres"]) == est.n_prototypes_ and state["C"] == est.C_
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))
    loaded = load_model(path).estimator
    np.testing.assert_array_equal(loaded.predict_proba(s), est.predict_proba(s))
    assert loaded.threshold_ == est.threshold_ and loaded.prototype_losses_ == est.prototype_losses_


def _corrupt(state: dict, what: str) -> None:
    if what == "centres shape":
        state["centres"] = state["centres"][:-1]
    elif what == "centre width":
        state["centres"][0] = state["centres"][0][:-1]
    elif what == "coef length":
        state["coef"].append(0.5)
    elif what == "scaler std":
        state["fusion_scaler"]["std"][0] = 0.0
    elif what == "K off the grid":
        state["n_prototypes"] = 5
    elif what == "C":
        state["C"] = -1.0
    elif what == "threshold":
        state["threshold"] = 1.5
    elif what == "unknown param":
        state["params"]["bogus"] = 1
    elif what == "missing":
        del state["instance_scaler"]


@pytest.mark.parametrize("what, field", [
    ("centres shape", "composition.centres"), ("centre width", "composition.centres.0"),
    ("coef length", "composition.coef"), ("scaler std", "composition.fusion_scaler.std"),
    ("K off the grid", "composition.n_prototypes"), ("C", "composition.C"),
    ("threshold", "composition.threshold"), ("unknown param", "composition.params"),
    ("missing", "composition.instance_scaler")])
def test_corrupted_composition_model_is_refused(saved: tuple, what: str, field: str) -> None:
    from lymph.errors import LymphError
    from lymph.head.modeldir import load_model

    _, _, path = saved
    mj = path / "model.json"
    meta = json.loads(mj.read_text())
    _corrupt(meta["composition"], what)
    mj.write_text(json.dumps(meta))
    with pytest.raises(LymphError) as e:
        load_model(path)
    assert str(mj) in str(e.value) and f"'{field}'" in str(e.value), str(e.value)


def test_nan_in_a_saved_composition_model_is_refused(saved: tuple) -> None:
    from lymph.errors import LymphError
    from lymph.head.modeldir import load_model

    _, _, path = saved
    mj = path / "model.json"
    mj.write_text(json.dumps(_with_nan(json.loads(mj.read_text()))))
    with pytest.raises(LymphError, match="NaN or infinity"):
        load_model(path)


def _with_nan(meta: dict) -> dict:
    meta["composition"]["centres"][0][0] = float("nan")
    return meta


def test_cli_fit_head_composition_and_predict(tmp_path: Path) -> None:
    s = _composition_store(n=40)
    p = write_store(tmp_path / "s.h5", embeddings=s.embeddings, patient_ptr=s.patient_ptr,
                    ids=list(s.ids), labels=s.labels, clinical=s.clinical,
                    clinical_columns=list(s.clinical_columns))
    runner = CliRunner()
    r = runner.invoke(app, ["fit-head", "--store", str(p), "--fusion", "composition", "--folds",
                            "3", "--out", str(tmp_path / "m"), "--json", str(tmp_path / "f.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "f.json").read_text())
    assert rep["model"] == "composition+clinical" and rep["fusion"] == "composition"
    assert all(f["n_prototypes"] in (4, 8, 16) for f in rep["per_fold"])
    r = runner.invoke(app, ["predict", "--model", str(tmp_path / "m"), "--store", str(p),
                            "--out", str(tmp_path / "pred.csv")])
    assert r.exit_code == 0, r.output
    got = np.loadtxt(tmp_path / "pred.csv", delimiter=",", skiprows=1, usecols=1)
    want = CompositionFusion(seed=0).fit(open_store(p)).predict_proba(open_store(p))[:, 1]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # a corrupted model.json: one error line naming the file and the field, exit 1
    mj = tmp_path / "m" / "model.json"
    meta = json.loads(mj.read_text())
    meta["composition"]["coef"] = meta["composition"]["coef"][:1]
    mj.write_text(json.dumps(meta))
    r = runner.invoke(app, ["predict", "--model", str(tmp_path / "m"), "--store", str(p),
                            "--out", str(tmp_path / "pred2.csv")])
    assert r.exit_code == 1 and "error:" in r.output and "composition.coef" in r.output
    assert not (tmp_path / "pred2.csv").exists()


def test_cell_scores_are_each_cells_leave_one_out_push_on_the_logit() -> None:
    s = _composition_store(n=40)
    m = CompositionFusion(seed=0).fit(s)
    scores = m.cell_scores(s)
    proto = m.prototype_of(s)
    assert [len(c) for c in scores] == list(s.bag_sizes)
    for row in (0, 1, 7):
        sc, pr = scores[row], proto[row]
        for j in {int(np.flatnonzero(pr == q)[0]) for q in np.unique(pr)}:  # one cell per prototype
            keep = np.delete(np.arange(s.bag_sizes[row]), j)
            one = EmbeddingStore(path=None, embeddings=s.bag(row)[keep],
                                 patient_ptr=np.array([0, keep.size], dtype=np.int64),
                                 ids=s.ids[[row]], labels=s.labels[[row]],
                                 clinical=s.clinical[[row]], clinical_columns=s.clinical_columns)
            want = m.decision_function(s.subset([row]))[0] - m.decision_function(one)[0]
            assert abs(sc[j] - want) < 1e-4, (row, j, sc[j], want)
            assert np.all(sc[pr == pr[j]] == sc[j])  # a prototype's cells share the score
    # the planted malignant cell type (cluster 2) pushes towards malignant, the others do not
    kind2 = np.concatenate(scores)[np.argmax(s.embeddings, axis=1) == 2]
    others = np.concatenate(scores)[np.argmax(s.embeddings, axis=1) != 2]
    assert np.median(kind2) > 0 > np.median(others)

