"""The torch estimators share one base: the same parameter check (a threshold of 1.5 was
accepted by MILClassifier and refused by MixtureOfExperts), the same inner split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lymph.baselines import MixtureOfExperts
from lymph.errors import LymphError
from lymph.head.base import TorchBagEstimator
from lymph.head.estimator import MILClassifier
from lymph.store import open_store


@pytest.mark.parametrize("cls", [MILClassifier, MixtureOfExperts])
@pytest.mark.parametrize("bad", [1.5, 0.0, 1.0, -0.2, float("nan"), True, "outer"])
def test_one_threshold_rule_for_every_torch_estimator(cls: type, bad: object,
                                                      bag_store: Path) -> None:
    assert issubclass(cls, TorchBagEstimator)
    with pytest.raises(LymphError, match=r"^threshold: expected 'inner' or a number in \(0, 1\)"):
        cls(threshold=bad).fit(open_store(bag_store))


def test_the_inner_split_is_shared_and_seeded() -> None:
    y = np.array([0, 1] * 20)
    a = MILClassifier(seed=3, val_fraction=0.2)._inner_split(y)
    b = MixtureOfExperts(seed=3, val_fraction=0.2)._inner_split(y)
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and a[1].size == 8
    assert np.bincount(y[a[1]]).tolist() == [4, 4]  # stratified
    tr, va = MILClassifier(val_fraction=0.2)._inner_split(np.array([0, 1, 1]))
    assert va.size == 0 and tr.size == 3  # too few patients: no inner split
