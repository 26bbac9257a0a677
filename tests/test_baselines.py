"""The baselines follow the stage-two estimator contract; the mixture of experts learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from lymph.baselines import (AdaBoostClinical, LateFusion, LogisticClinical, MixtureOfExperts,
                             bag_mean_quantile)
from lymph.errors import LymphError
from lymph.store import open_store, write_store
from conftest import make_bags

FAST_MOE = dict(max_epochs=25, patience=6)


def _estimators() -> list:
    return [AdaBoostClinical(n_estimators=10), LogisticClinical(), LateFusion(inner_folds=3),
            MixtureOfExperts(**FAST_MOE)]


@pytest.mark.parametrize("est", _estimators(), ids=lambda e: type(e).__name__)
def test_estimator_contract(est, bag_store: Path) -> None:
    s = open_store(bag_store)
    c = clone(est)
    assert c.get_params() == est.get_params()
    assert not any(k.endswith("_") and not k.startswith("_") for k in vars(c))  # nothing learned yet
    train, test = s.subset(np.arange(30)), s.subset(np.arange(30, 40))
    assert c.fit(train) is c
    p = c.predict_proba(test)
    assert p.shape == (10, 2)
    assert np.allclose(p.sum(axis=1), 1.0) and ((p >= 0) & (p <= 1)).all()
    assert 0.0 <= c.threshold_ <= 1.0
    assert np.array_equal(c.predict(test), (p[:, 1] >= c.threshold_).astype(int))
    # seeded: a second fit gives the same probabilities
    assert np.allclose(clone(est).fit(train).predict_proba(test), p)


@pytest.mark.parametrize("est", _estimators(), ids=lambda e: type(e).__name__)
def test_needs_clinical(est, tmp_path: Path) -> None:
    arrays = make_bags(n_patients=12, n_clinical=0)
    s = open_store(write_store(tmp_path / "noclin.h5", **arrays))
    with pytest.raises(LymphError, match="no clinical columns"):
        clone(est).fit(s)


def test_bad_threshold(bag_store: Path) -> None:
    with pytest.raises(LymphError, match="threshold"):
        LogisticClinical(threshold="best").fit(open_store(bag_store))


def test_fixed_threshold(bag_store: Path) -> None:
    assert LogisticClinical(threshold=0.3).fit(open_store(bag_store)).threshold_ == 0.3


def test_mixture_of_experts_learns_planted_signal(tmp_path: Path) -> None:
    """Image signal planted in feature 0 of some instances of malignant bags; clinical
    features are noise. The mixture must find it and lean on the image expert."""
    s = open_store(write_store(tmp_path / "b.h5", **make_bags(n_patients=100, signal=3.0, seed=1)))
    tr, te = np.arange(70), np.arange(70, 100)
    m = MixtureOfExperts(max_epochs=40, patience=10).fit(s.subset(tr))
    y = s.labels[te]
    auc = roc_auc_score(y, m.predict_proba(s.subset(te))[:, 1])
    assert auc > 0.85, auc
    ex = m.experts(s.subset(te))
    assert roc_auc_score(y, ex["p_img"]) > 0.85
    assert roc_auc_score(y, ex["p_img"]) > roc_auc_score(y, ex["p_clin"]) + 0.2
    assert ex["pi_img"].mean() > 0.5  # the gate trusts the informative expert
    w = m.attention(s.subset(te))
    assert all(abs(v.sum() - 1) < 1e-5 for v in w)


def test_bag_mean_quantile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([1, 2, 5, 17, 3])
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    v = rng.normal(size=ptr[-1])
    mean, q = bag_mean_quantile(v, ptr, 0.75)
    for b in range(sizes.size):
        x = v[ptr[b]:ptr[b + 1]]
        assert mean[b] == pytest.approx(x.mean())
        assert q[b] == pytest.approx(np.quantile(x, 0.75))
