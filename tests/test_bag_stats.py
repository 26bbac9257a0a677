"""The bag-statistics baselines: features, learning, contract, errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from conftest import make_bags
from lymph.baselines.bag_stats import BagStatsBoosting, BagStatsForest, bag_stats
from lymph.errors import LymphError
from lymph.head.evaluate import cross_validate, make_folds, summarise
from lymph.store import EmbeddingStore


def store_of(**kw) -> EmbeddingStore:
    d = make_bags(**kw)
    return EmbeddingStore(path=None, embeddings=d["embeddings"], patient_ptr=d["patient_ptr"],
                          ids=np.array(d["ids"], dtype=object), labels=d["labels"],
                          clinical=d["clinical"], clinical_columns=d["clinical_columns"])


def test_bag_stats_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    ptr = np.array([0, 1, 4, 9])
    emb = rng.normal(size=(9, 3)).astype(np.float32)
    got = bag_stats(emb, ptr)
    for i in range(3):
        b = emb[ptr[i]:ptr[i + 1]].astype(np.float64)
        np.testing.assert_allclose(got[i], np.r_[b.mean(0), b.max(0), b.min(0)], rtol=1e-12)
    with pytest.raises(LymphError, match="without instances"):
        bag_stats(emb, np.array([0, 0, 9]))


def test_bag_stats_of_float32_equal_those_of_its_float64_copy() -> None:
    # float32 stores are summed in float64 without a float64 copy (cohort scale): the same
    # numbers to the last bit as converting first
    rng = np.random.default_rng(1)
    emb = (rng.normal(size=(5000, 4)) * 1e3 + 3.3).astype(np.float32)
    ptr = np.r_[0, np.sort(rng.choice(np.arange(1, 5000), 99, replace=False)), 5000]
    got = bag_stats(emb, ptr)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, bag_stats(emb.astype(np.float64), ptr))


@pytest.mark.parametrize("make", [lambda: BagStatsForest(n_estimators=100),
                                  lambda: BagStatsBoosting(max_iter=50)])
def test_learns_planted_signal_not_shuffled_labels(make) -> None:
    st = store_of(n_patients=60, signal=3.0)
    s = summarise(cross_validate(make, st, make_folds(st.labels, 3, 1, 0)))
    assert s["roc_auc"]["mean"] >= 0.85, s
    sh = store_of(n_patients=60, signal=3.0, shuffle_labels=True)
    s = summarise(cross_validate(make, sh, make_folds(sh.labels, 3, 1, 0)))
    assert s["roc_auc"]["mean"] < 0.75, s


def test_contract_clinical_columns_and_errors() -> None:
    st = store_of(n_patients=30)
    m = BagStatsForest(n_estimators=30, seed=1)
    assert clone(m).get_params()["n_estimators"] == 30
    assert m.fit(st) is m and m.clinical_columns_ == list(st.clinical_columns)
    assert m.model_.n_features_in_ == 3 * st.dim + len(st.clinical_columns)
    p = m.predict_proba(st)
    assert p.shape == (30, 2) and np.allclose(p.sum(1), 1)
    np.testing.assert_array_equal(p, BagStatsForest(n_estimators=30, seed=1).fit(st).predict_proba(st))
    assert BagStatsForest(n_estimators=30, clinical=False).fit(st).model_.n_features_in_ == 3 * st.dim
    with pytest.raises(LymphError, match="not fitted"):
        BagStatsForest().predict_proba(st)
    with pytest.raises(LymphError, match="threshold"):
        BagStatsForest(threshold="best").fit(st)
    empty = st.subset(np.arange(30))
    empty.patient_ptr = empty.patient_ptr.copy()
    empty.patient_ptr[1] = empty.patient_ptr[0]  # patient 0 loses its images
    empty.embeddings = empty.embeddings[empty.patient_ptr[0]:]
    empty.patient_ptr = empty.patient_ptr - empty.patient_ptr[0]
    with pytest.raises(LymphError, match="no images"):
        BagStatsForest(n_estimators=10).fit(empty)
