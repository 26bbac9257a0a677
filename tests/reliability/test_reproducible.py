"""Reproducibility on the CPU: the same seed gives byte-identical artifacts and identical
metrics; a different seed gives different folds (and different weights)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_bags
from lymph.data.cache import ingest, open_cache
from lymph.head.evaluate import make_folds
from lymph.store import open_store, write_store
from reliability_helpers import HEAD, SIZE, cli, make_tiny

EMBED = ["--epochs", "2", "--dim", "4", "--batch-size", "8", "--device", "cpu"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("repro")
    data = make_tiny(d / "data")
    return ingest(data, d / "c.zarr", size=SIZE, workers=1).path


def test_ingest_twice_gives_the_same_cache(cache: Path, tmp_path: Path) -> None:
    src = open_cache(cache)  # single process; again with two workers
    again = open_cache(ingest(cache.parent / "data", tmp_path / "c.zarr", size=SIZE,
                              workers=2).path)
    assert np.array_equal(src.read_all(), again.read_all())
    assert np.array_equal(src.patient_ptr, again.patient_ptr)
    assert src.patients == again.patients and src.paths == again.paths
    assert src.fingerprint == again.fingerprint
    np.testing.assert_array_equal(src.channel_mean, again.channel_mean)


def _embed(cache: Path, out: Path, seed: int) -> tuple[str, str]:
    """`lymph embed` from scratch into ``out``; the sha256 of the store and the checkpoint."""
    ck = out.with_name(f"{out.stem}.encoder.pt")
    for p in (out, ck):
        p.unlink(missing_ok=True)
    r = cli("embed", "--images", cache, "--out", out, *EMBED, "--seed", seed)
    assert r.exit_code == 0, r.output
    return sha(out), sha(ck)


def test_embed_same_seed_byte_identical_store(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    first = _embed(cache, out, 0)
    emb0 = open_store(out).embeddings
    assert _embed(cache, out, 0) == first  # store and checkpoint, byte for byte
    _embed(cache, out, 1)
    assert not np.array_equal(open_store(out).embeddings, emb0)  # the seed matters


def _fit(store: Path, tmp: Path, seed: int, tag: str) -> tuple[dict, list[dict[str, str]]]:
    js = tmp / f"{tag}.json"
    r = cli("fit-head", "--store", store, *HEAD, "--seed", seed, "--json", js)
    assert r.exit_code == 0, r.output
    report = json.loads(js.read_text())
    oof = list(csv.DictReader(open(js.with_name(f"{tag}.oof.csv"))))
    return report, oof


def _without_timing(report: dict) -> dict:
    out = {k: v for k, v in report.items() if not k.startswith("seconds")}
    out["per_fold"] = [{k: v for k, v in f.items() if k != "seconds"} for f in report["per_fold"]]
    return out


def test_fit_head_same_seed_same_metrics_other_seed_other_folds(tmp_path: Path) -> None:
    store = write_store(tmp_path / "s.h5", **make_bags(n_patients=16, dim=4, sizes=(2, 5)))
    a, oof_a = _fit(store, tmp_path, 0, "a")
    b, oof_b = _fit(store, tmp_path, 0, "b")
    assert _without_timing(a) == _without_timing(b)
    assert oof_a == oof_b  # same folds, same probabilities, to the last digit
    c, oof_c = _fit(store, tmp_path, 1, "c")
    folds_a = {(r["id"], r["fold"]) for r in oof_a}
    folds_c = {(r["id"], r["fold"]) for r in oof_c}
    assert folds_a != folds_c


def test_folds_are_a_function_of_the_seed() -> None:
    labels = np.array([0, 1] * 20 + [-1] * 3)

    def partition(seed: int) -> list[frozenset[int]]:
        return sorted((frozenset(te.tolist()) for _, _, _, te in make_folds(labels, 5, 1, seed)),
                      key=min)

    assert partition(0) == partition(0)
    parts = [partition(s) for s in range(5)]
    assert len({tuple(tuple(sorted(f)) for f in p) for p in parts}) == 5  # all different
    for p in parts:  # each a stratified partition of the labelled patients
        assert sorted(i for f in p for i in f) == list(range(40))
