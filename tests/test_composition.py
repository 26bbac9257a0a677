"""Issue 18: cell-composition features (k-means prototypes fitted on the training patients'
cells, per-patient log proportions) fused with clinical data in compare-baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
