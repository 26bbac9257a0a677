"""MILClassifier on plain arrays: scikit-learn compatibility and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold, cross_val_score

from conftest import make_bags
from lymph.errors import LymphError
from lymph.head import MILClassifier

torch.set_num_threads(1)


def arrays(n: int = 40, signal: float = 3.0, seed: int = 0, n_clinical: int = 3):
    d = make_bags(n_patients=n, signal=signal, seed=seed, n_clinical=n_clinical)
    ptr = d["patient_ptr"]
    bags = [d["embeddings"][ptr[i]:ptr[i + 1]] for i in range(n)]
    return bags, d["labels"].astype(int), d["clinical"]


def test_fit_predict_on_arrays_with_any_two_labels() -> None:
    bags, y, clin = arrays()
    names = np.where(y == 1, "malignant", "reactive")
    m = MILClassifier(max_epochs=20).fit(bags, names)
    assert list(m.classes_) == ["malignant", "reactive"]  # sorted: "reactive" is positive
    p = m.predict_proba(bags)
    assert p.shape == (40, 2) and np.isfinite(p).all()
    assert set(m.predict(bags)) <= {"malignant", "reactive"}
    assert m.score(bags, names) > 0.8
    assert len(m.attention(bags)) == 40
    c = MILClassifier(max_epochs=5).fit(bags, y, clinical=clin)
    assert c.config_.n_clinical == 3
    assert c.predict_proba(bags, clinical=clin).shape == (40, 2)
    with pytest.raises(LymphError, match="clinical"):
        c.predict_proba(bags)  # fitted with clinical columns


def test_sklearn_clone_get_params_cross_val_score() -> None:
    bags, y, _ = arrays(n=36)
    m = MILClassifier(pooling="mean", max_epochs=15, members=1)
    assert clone(m).get_params() == m.get_params()
    assert m.get_params()["pooling"] == "mean"
    scores = cross_val_score(m, bags, y, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    assert scores.shape == (3,) and scores.mean() > 0.7
    assert not hasattr(m, "model_")  # cross_val_score fitted clones


def test_same_result_as_the_store_path() -> None:
    from lymph.store import EmbeddingStore

    bags, y, _ = arrays(n_clinical=0)
    a = MILClassifier(max_epochs=4).fit(bags, y).predict_proba(bags)
    emb = np.concatenate(bags)
    ptr = np.r_[0, np.cumsum([len(b) for b in bags])]
    st = EmbeddingStore(path=None, embeddings=emb, patient_ptr=ptr,
                        ids=np.array([str(i) for i in range(40)], dtype=object),
                        labels=y.astype(np.int8), clinical=np.zeros((40, 0), np.float32),
                        clinical_columns=[])
    np.testing.assert_array_equal(a, MILClassifier(max_epochs=4).fit(st).predict_proba(st))


@pytest.mark.parametrize("bags_y, match", [
    (lambda b, y: ([], y), "at least one bag"),
    (lambda b, y: ("abc", y), "list of"),
    (lambda b, y: ([np.zeros(3)] + b[1:], y), r"bags\[0\]: expected a 2-d"),
    (lambda b, y: (b[:1] + [np.zeros((0, 8))] + b[2:], y), r"bags\[1\]: expected at least one"),
    (lambda b, y: (b[:2] + [np.zeros((4, 5))] + b[3:], y), r"bags\[2\]: expected 8 features"),
    (lambda b, y: (b[:3] + [np.full((2, 8), np.nan)] + b[4:], y), r"bags\[3\]: non-finite"),
    (lambda b, y: (b[:3] + [[["a"] * 8]] + b[4:], y), r"bags\[3\]: expected a numeric"),
    (lambda b, y: (b, y[:-1]), "y: expected shape"),
    (lambda b, y: (b, np.zeros_like(y)), "two classes"),
    (lambda b, y: (b, np.where(y == 1, np.nan, 0.0)), "finite"),
    (lambda b, y: (b, None), "y: expected one label"),
])
def test_bad_input(bags_y, match) -> None:
    bags, y, _ = arrays()
    b, yy = bags_y(bags, y)
    with pytest.raises(LymphError, match=match):
        MILClassifier(max_epochs=1).fit(b, yy)


def test_bad_clinical_and_prediction_input() -> None:
    bags, y, clin = arrays()
    with pytest.raises(LymphError, match="clinical: expected shape"):
        MILClassifier(max_epochs=1).fit(bags, y, clinical=clin[:-1])
    bad = clin.copy()
    bad[2, 1] = np.inf
    with pytest.raises(LymphError, match="clinical: non-finite"):
        MILClassifier(max_epochs=1).fit(bags, y, clinical=bad)
    with pytest.raises(LymphError, match="not fitted"):
        MILClassifier().predict_proba(bags)
    m = MILClassifier(max_epochs=1, members=1).fit(bags, y)
    with pytest.raises(LymphError, match="expected 8 features"):
        m.predict_proba([np.zeros((3, 4))])
