"""Issue 18: late fusion with one image score per feature block of a concatenated store."""

from __future__ import annotations

import numpy as np
from conftest import make_bags
from sklearn.metrics import roc_auc_score

from lymph.baselines.multiscore import MultiScoreFusion, feature_blocks
from lymph.store import EmbeddingStore


def _store(seed: int, n: int = 60) -> EmbeddingStore:
    """Two blocks: ``a`` carries the planted signal, ``w`` is a weak-style logit column of
    pure noise."""
    b = make_bags(n_patients=n, dim=3, seed=seed, signal=2.0)
    rng = np.random.default_rng(seed + 100)
    noise = rng.normal(0, 1, (b["embeddings"].shape[0], 2)).astype(np.float32)
    return EmbeddingStore(
        path=None, embeddings=np.concatenate([b["embeddings"], noise], axis=1),
        patient_ptr=np.asarray(b["patient_ptr"], dtype=np.int64),
        ids=np.asarray(b["ids"], dtype=object), labels=np.asarray(b["labels"], dtype=np.int8),
        clinical=b["clinical"], clinical_columns=b["clinical_columns"],
        feature_columns=["a:f0", "a:f1", "a:f2", "w:logit", "w:prob"])


def test_feature_blocks() -> None:
    assert list(feature_blocks(["a:x", "b:y", "a:z"], 3)) == ["a", "b"]
    np.testing.assert_array_equal(feature_blocks(["a:x", "b:y", "a:z"], 3)["a"], [0, 2])
    assert list(feature_blocks(["x", "y"], 2)) == ["images"]
    assert list(feature_blocks(None, 4)) == ["images"]


def test_one_score_per_block_and_the_signal_block_counts() -> None:
    train, test = _store(0), _store(1)
    est = MultiScoreFusion(seed=0).fit(train)
    assert set(est.coefficients()) == {"c0", "c1", "c2", "a_mean", "a_q75", "w_mean", "w_q75"}
    assert est.block_models_["w"].logit_column_ == "w:logit"  # the logit is used as is
    assert est.block_models_["a"].projection_ is not None
    p = est.predict_proba(test)[:, 1]
    assert np.isfinite(p).all() and roc_auc_score(test.labels, p) > 0.85
    c = est.coefficients()
    assert abs(c["a_mean"]) + abs(c["a_q75"]) > abs(c["w_mean"]) + abs(c["w_q75"])
    again = MultiScoreFusion(seed=0).fit(train).predict_proba(test)
    np.testing.assert_array_equal(again[:, 1], p)


def test_with_composition_features() -> None:
    train, test = _store(0), _store(1)
    est = MultiScoreFusion(n_prototypes=3, seed=0).fit(train)
    assert {"proto0", "proto1", "proto2", "a_mean"} <= set(est.coefficients())
    assert len(est.coef_) == 3 + 4 + 3
    p = est.predict_proba(test)[:, 1]
    assert np.isfinite(p).all() and roc_auc_score(test.labels, p) > 0.8
