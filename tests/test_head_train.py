"""The MIL estimator and the CV driver: learning, leakage, determinism, contract, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from conftest import make_bags
from lymph.errors import LymphError
from lymph.head.bags import instances_of
from lymph.head.estimator import MILClassifier
from lymph.head.evaluate import cross_validate, make_folds, metrics, summarise
from lymph.head.train import choose_threshold
from lymph.store import EmbeddingStore

torch.set_num_threads(1)


def store_of(**kw) -> EmbeddingStore:
    d = make_bags(**kw)
    return EmbeddingStore(path=None, embeddings=d["embeddings"], patient_ptr=d["patient_ptr"],
                          ids=np.array(d["ids"], dtype=object), labels=d["labels"],
                          clinical=d["clinical"], clinical_columns=d["clinical_columns"])


@pytest.fixture(scope="module")
def planted() -> EmbeddingStore:
    return store_of(n_patients=60, signal=3.0)


@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_planted_signal_is_learned(planted: EmbeddingStore, pooling: str) -> None:
    cv = cross_validate(lambda: MILClassifier(pooling=pooling), planted,
                        make_folds(planted.labels, 3, 1, 0))
    s = summarise(cv)
    assert s["balanced_accuracy"]["mean"] >= 0.85, s
    assert s["roc_auc"]["mean"] >= 0.9, s


def test_shuffled_labels_are_not_learned() -> None:
    st = store_of(n_patients=60, signal=3.0, shuffle_labels=True)
    cv = cross_validate(lambda: MILClassifier(pooling="attention"), st,
                        make_folds(st.labels, 3, 1, 0))
    s = summarise(cv)
    assert s["balanced_accuracy"]["mean"] < 0.7, s
    assert s["roc_auc"]["mean"] < 0.75, s


def test_scalers_and_threshold_use_training_patients_only(planted: EmbeddingStore) -> None:
    tr = np.arange(40)
    a = MILClassifier(max_epochs=5).fit(planted.subset(tr))
    # the training instances' statistics, exactly
    inst = instances_of(planted.embeddings, planted.patient_ptr, tr)
    np.testing.assert_allclose(a.instance_scaler_.mean, inst.astype(np.float64).mean(0), rtol=1e-9)
    np.testing.assert_allclose(a.clinical_scaler_.mean, planted.clinical[tr].mean(0), rtol=1e-5)
    assert set(a.inner_val_ids_) <= {str(i) for i in planted.ids[tr]}
    # unlabelled patients in the fit store and wild values for other patients change nothing
    other = planted.subset(np.arange(planted.n_patients))
    other.embeddings = other.embeddings.copy()
    other.embeddings[other.patient_ptr[40]:] *= 100.0
    other.clinical = other.clinical.copy()
    other.clinical[40:] += 50.0
    other.labels = other.labels.copy()
    other.labels[40:] = -1
    b = MILClassifier(max_epochs=5).fit(other)
    np.testing.assert_array_equal(a.instance_scaler_.mean, b.instance_scaler_.mean)
    np.testing.assert_array_equal(a.clinical_scaler_.std, b.clinical_scaler_.std)
    assert a.threshold_ == b.threshold_ and a.inner_val_ids_ == b.inner_val_ids_
    np.testing.assert_array_equal(a.predict_proba(planted), b.predict_proba(planted))


def test_threshold_rule() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    assert choose_threshold(y, np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])) == 0.5  # tie -> 0.5
    t = choose_threshold(y, np.array([0.1, 0.2, 0.3, 0.35, 0.7, 0.8]))
    assert 0.3 < t <= 0.35
    assert choose_threshold(np.ones(3), np.array([0.1, 0.2, 0.3])) == 0.5
    m = MILClassifier(threshold=0.5, max_epochs=3).fit(store_of())
    assert m.threshold_ == 0.5


def _threshold_by_matrix(y: np.ndarray, p: np.ndarray) -> float:
    """The rule written out as an (n_candidates, n) matrix, as it first was."""
    y = y.astype(bool)
    if y.all() or not y.any():
        return 0.5
    u = np.unique(p)
    cand = np.concatenate([[0.5], (u[:-1] + u[1:]) / 2.0, [u[0] - 1e-9 if u[0] > 0 else 0.0]])
    pred = p[None, :] >= cand[:, None]
    bacc = 0.5 * (pred[:, y].mean(axis=1) + (~pred[:, ~y]).mean(axis=1))
    best = np.flatnonzero(bacc >= bacc.max() - 1e-12)
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


def test_threshold_by_counting_equals_the_matrix_to_the_bit() -> None:
    # ties, repeated scores, NaN scores and skewed classes: the same cut, not a close one
    rng = np.random.default_rng(0)
    for it in range(400):
        n = int(rng.integers(2, 200))
        y = (rng.random(n) < rng.random()).astype(np.int64)
        p = rng.random(n)
        if it % 3 == 0:
            p = np.round(p, 1)
        if it % 5 == 0:
            p[rng.random(n) < 0.1] = np.nan
        if it % 7 == 0:
            p = np.clip(p + y * rng.normal(0.2, 0.3), 0, 1)
        want, got = _threshold_by_matrix(y, p), choose_threshold(y, p)
        assert got == want or (np.isnan(got) and np.isnan(want)), (it, got, want)


def test_deterministic_and_leaves_global_rng_alone() -> None:
    st = store_of()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    p1 = MILClassifier(max_epochs=8).fit(st).predict_proba(st)
    after = torch.rand(1)
    assert before == after
    p2 = MILClassifier(max_epochs=8).fit(st).predict_proba(st)
    np.testing.assert_array_equal(p1, p2)
    p3 = MILClassifier(max_epochs=8, seed=1).fit(st).predict_proba(st)
    assert not np.array_equal(p1, p3)


def test_estimator_contract() -> None:
    st = store_of()
    m = MILClassifier(pooling="gated", mlp=(16,), max_epochs=3)
    assert clone(m).get_params()["mlp"] == (16,)
    assert not hasattr(m, "model_")
    assert m.fit(st) is m
    p = m.predict_proba(st)
    assert p.shape == (st.n_patients, 2) and np.allclose(p.sum(1), 1)
    assert isinstance(m.threshold_, float)
    np.testing.assert_array_equal(m.predict(st), (p[:, 1] >= m.threshold_).astype(int))
    att = m.attention(st)
    assert len(att) == st.n_patients
    for a, n in zip(att, st.bag_sizes):
        assert a.shape == (n,) and abs(a.sum() - 1) < 1e-5


def test_no_clinical_columns_means_images_only_and_clinical_only_variant() -> None:
    d = make_bags(n_clinical=0)
    st = EmbeddingStore(path=None, embeddings=d["embeddings"], patient_ptr=d["patient_ptr"],
                        ids=np.array(d["ids"], dtype=object), labels=d["labels"],
                        clinical=d["clinical"], clinical_columns=[])
    m = MILClassifier(max_epochs=3).fit(st)
    assert m.config_.n_clinical == 0 and m.predict_proba(st).shape == (40, 2)
    with pytest.raises(LymphError, match="clinical"):
        MILClassifier(images=False).fit(st)
    c = MILClassifier(images=False, max_epochs=3).fit(store_of())
    assert c.config_.dim == 0 and c.predict_proba(store_of()).shape == (40, 2)


def test_bags_from_one_to_over_a_thousand_instances_train() -> None:
    st = store_of(n_patients=24, sizes=(1, 3))
    sizes = st.bag_sizes.copy()
    sizes[0] = 1500
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    emb = np.random.default_rng(0).normal(0, 1, (int(ptr[-1]), st.dim)).astype(np.float32)
    big = EmbeddingStore(path=None, embeddings=emb, patient_ptr=ptr, ids=st.ids, labels=st.labels,
                         clinical=st.clinical, clinical_columns=st.clinical_columns)
    m = MILClassifier(max_epochs=4, batch_size=4).fit(big)
    p = m.predict_proba(big)
    assert np.isfinite(p).all()
    assert m.attention(big)[0].shape == (1500,)


def test_make_folds_stratified_disjoint_and_repeatable() -> None:
    labels = np.array([1, 0] * 15 + [-1] * 4, dtype=np.int8)
    f = make_folds(labels, folds=5, repeats=2, seed=3)
    assert len(f) == 10 and [x[:2] for x in f[:6]] == [(0, k) for k in range(5)] + [(1, 0)]
    for r in range(2):
        test = np.concatenate([te for rr, _, _, te in f if rr == r])
        np.testing.assert_array_equal(np.sort(test), np.arange(30))  # unlabelled left out
    for _, _, tr, te in f:
        assert not set(tr) & set(te) and labels[te].sum() == 3
    assert all(np.array_equal(a[3], b[3]) for a, b in zip(f, make_folds(labels, 5, 2, 3)))
    assert not np.array_equal(f[0][3], f[5][3])
    with pytest.raises(LymphError, match="at least 5"):
        make_folds(np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), 5, 1, 0)


def test_metrics_use_the_threshold() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.2, 0.4, 0.45, 0.9])
    assert metrics(y, p, 0.5)["balanced_accuracy"] == 0.75
    assert metrics(y, p, 0.42)["balanced_accuracy"] == 1.0
    assert metrics(y, p, 0.42)["roc_auc"] == 1.0


def test_errors() -> None:
    st = store_of()
    with pytest.raises(LymphError, match="pooling"):
        MILClassifier(pooling="sum").fit(st)
    one = st.subset(np.flatnonzero(st.labels == 1))
    with pytest.raises(LymphError, match="both classes"):
        MILClassifier().fit(one)
    m = MILClassifier(max_epochs=2).fit(st)
    with pytest.raises(LymphError, match="empty selection"):
        m.predict_proba(st.subset([]))
    renamed = st.subset(np.arange(5))
    renamed.clinical_columns = ["c0", "c1", "other"]
    with pytest.raises(LymphError, match="missing clinical field.*c2"):
        m.predict_proba(renamed)
    nan = st.subset(np.arange(5))
    nan.clinical = nan.clinical.copy()
    nan.clinical[2, 1] = np.nan
    with pytest.raises(LymphError, match="P.* has no value for c1"):
        m.predict_proba(nan)
    cut = int(st.patient_ptr[1])  # patient 0 loses its images
    empty = EmbeddingStore(path=None, embeddings=st.embeddings[cut:],
                           patient_ptr=np.concatenate([[0], st.patient_ptr[1:] - cut]),
                           ids=st.ids, labels=st.labels, clinical=st.clinical,
                           clinical_columns=st.clinical_columns)
    with pytest.raises(LymphError, match="no images"):
        m.predict_proba(empty)
    with pytest.raises(LymphError, match="no images"):
        MILClassifier().fit(empty)
    wide = st.subset(np.arange(3))
    wide.embeddings = np.zeros((wide.n_images, st.dim + 1), np.float32)
    with pytest.raises(LymphError, match="another encoder"):
        m.predict_proba(wide)
