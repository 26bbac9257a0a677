"""Issue 18: fit-head and compare-baselines refuse a store whose labelled patients were
scored in-sample by a label-trained encoder, or, with --allow-in-sample, mark every output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_bags
from typer.testing import CliRunner

from lymph.cli import app
from lymph.errors import LymphError
from lymph.insample import check_in_sample, in_sample_reason
from lymph.store import open_store, write_store

K = 3


def _weak_provenance(ids: list[str], labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """A fold-safe weak provenance: labelled patients split into K folds, scorer k = fold k."""
    lab = [i for i, y in enumerate(labels) if y >= 0]
    scorer = np.full(len(ids), -1, dtype=np.int16)
    test_ids: list[list[str]] = [[] for _ in range(K)]
    for j, p in enumerate(lab):
        scorer[p] = j % K
        test_ids[j % K].append(ids[p])
    return {"method": "weak", "weak_folds": {"k": K, "seed": 0, "test_ids": test_ids,
                                             "checkpoints": [], "final": {}}}, scorer


def _store(tmp_path: Path, name: str, *, provenance: dict | None = None,
           scorer: np.ndarray | None = None, unlabelled: int = 0) -> Path:
    arrays = make_bags(n_patients=24, dim=2, seed=3)
    arrays["labels"] = np.asarray(arrays["labels"]).copy()
    arrays["labels"][:unlabelled] = -1
    return write_store(tmp_path / name, **arrays, feature_columns=["logit", "prob"],
                       provenance=provenance, patient_scorer=scorer)


def _arrays_ids_labels() -> tuple[list[str], np.ndarray]:
    a = make_bags(n_patients=24, dim=2, seed=3)
    return list(a["ids"]), np.asarray(a["labels"])


def test_clean_stores_pass(tmp_path: Path) -> None:
    ids, labels = _arrays_ids_labels()
    assert in_sample_reason(open_store(_store(tmp_path, "m.h5", provenance={"method": "morphometry"}))) is None
    prov, scorer = _weak_provenance(ids, labels)
    assert in_sample_reason(open_store(_store(tmp_path, "w.h5", provenance=prov, scorer=scorer))) is None


def test_encoder_weak_store_is_in_sample(tmp_path: Path) -> None:
    # `embed --method weak --encoder` / `predict --data`: one scorer (-1) for every patient
    s = open_store(_store(tmp_path, "e.h5", provenance={"method": "weak"},
                          scorer=np.full(24, -1, dtype=np.int16)))
    assert "--encoder" in in_sample_reason(s)
    with pytest.raises(LymphError, match="--allow-in-sample"):
        check_in_sample(s)
    assert check_in_sample(s, allow=True).startswith("IN-SAMPLE")
    assert check_in_sample(s, images=False) is None  # clinical-only never reads the scores


def test_store_of_only_unlabelled_patients_passes(tmp_path: Path) -> None:
    s = open_store(_store(tmp_path, "u.h5", provenance={"method": "weak"}, unlabelled=24))
    assert in_sample_reason(s) is None  # what `predict --data` writes for new patients


def test_leaky_fold_store_and_concat_are_caught(tmp_path: Path) -> None:
    ids, labels = _arrays_ids_labels()
    prov, scorer = _weak_provenance(ids, labels)
    bad = scorer.copy()
    bad[int(np.flatnonzero(labels >= 0)[0])] = -1  # a labelled patient scored by the final scorer
    assert "final scorer" in in_sample_reason(open_store(_store(tmp_path, "l.h5", provenance=prov, scorer=bad)))
    # a concat of morphometry and an in-sample weak block: found through the sources
    concat = {"method": "concat", "sources": [{"provenance": {"method": "morphometry"}},
                                              {"provenance": {"method": "weak"}}]}
    assert in_sample_reason(open_store(_store(tmp_path, "c.h5", provenance=concat))) is not None
    concat_ok = {"method": "concat", "sources": [{"provenance": {"method": "morphometry"}},
                                                 {"provenance": prov}]}
    assert in_sample_reason(open_store(_store(tmp_path, "d.h5", provenance=concat_ok, scorer=scorer))) is None


def test_cli_refuses_then_marks(tmp_path: Path) -> None:
    p = _store(tmp_path, "e.h5", provenance={"method": "weak"}, scorer=np.full(24, -1, dtype=np.int16))
    runner = CliRunner()
    for cmd in (["compare-baselines", "--models", "logistic,late-fusion"],
                ["fit-head", "--fusion", "late"]):
        r = runner.invoke(app, [*cmd, "--store", str(p), "--folds", "3"])
        assert r.exit_code == 1 and "error:" in r.output and "--allow-in-sample" in r.output, r.output
        assert "Traceback" not in r.output
    js = tmp_path / "cmp.json"
    r = runner.invoke(app, ["compare-baselines", "--models", "logistic,late-fusion", "--store", str(p),
                            "--folds", "3", "--json", str(js), "--allow-in-sample"])
    assert r.exit_code == 0, r.output
    assert "IN-SAMPLE" in r.output
    assert all(row["store"]["in_sample"].startswith("IN-SAMPLE") for row in json.loads(js.read_text()))
    jf = tmp_path / "fit.json"
    r = runner.invoke(app, ["fit-head", "--fusion", "late", "--store", str(p), "--folds", "3",
                            "--json", str(jf), "--allow-in-sample"])
    assert r.exit_code == 0, r.output
    assert json.loads(jf.read_text())["in_sample"].startswith("IN-SAMPLE")
    # clinical-only runs never read the scores: no refusal
    r = runner.invoke(app, ["compare-baselines", "--models", "logistic", "--store", str(p), "--folds", "3"])
    assert r.exit_code == 0, r.output
