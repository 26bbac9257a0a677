"""`lymph explain`: the top-attention cells of synthetic malignant patients are the planted
atypical cells more often than chance; the montage and the CLI work."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lymph.cli import app


@pytest.fixture(scope="module")
def morph(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic dataset (36 patients, 8-14 cells of 64 px), its cache and morphometry
    store, and an attention model trained on it."""
    from lymph.data.cache import ingest, open_cache
    from lymph.data.synth import SynthConfig, make_synthetic
    from lymph.encoder.methods.morphometry import write_morphometry_store
    from lymph.head.estimator import MILClassifier
    from lymph.head.modeldir import save_model
    from lymph.store import open_store

    root = tmp_path_factory.mktemp("explain")
    data = make_synthetic(root / "data", SynthConfig(patients=36, test_patients=2, images_min=8,
                                                     images_max=14, size=64, seed=11))
    ingest(data, root / "c.zarr", size=64, workers=1)
    store = write_morphometry_store(open_cache(root / "c.zarr"), root / "m.h5", workers=1)
    s = open_store(store)
    model = MILClassifier(pooling="attention", max_epochs=60, patience=20, seed=0).fit(s)
    save_model(model, root / "model", store=s)
    truth = {}
    with open(data / "synth_truth.csv") as f:
        for r in csv.DictReader(f):
            truth[(r["patient"], r["image"])] = int(r["atypical"])
    return dict(data=data, cache=root / "c.zarr", store=store, model=root / "model", truth=truth,
                root=root)


def _atypical(store, row: int, truth: dict) -> np.ndarray:
    paths = store.bag_image_paths(row)
    return np.array([truth[(Path(p).parent.name, Path(p).name)] for p in paths])


def test_top_cells_are_atypical_more_often_than_chance(morph: dict) -> None:
    from lymph.report.explain import explain
    from lymph.store import open_store

    s = open_store(morph["store"])
    k = 3
    hits, chance = [], []
    for row in np.flatnonzero(s.labels == 1):
        pid = str(s.ids[row])
        e = explain(pid, morph["model"], store=morph["store"], k=k,
                    out=morph["root"] / f"{pid}.png")
        atyp = _atypical(s, row, morph["truth"])
        assert len(e.weights) == atyp.size and abs(e.weights.sum() - 1) < 1e-4
        hits.append(atyp[e.top[:k]].mean())
        chance.append(atyp.mean())
    hits_m, chance_m = float(np.mean(hits)), float(np.mean(chance))
    assert hits_m > chance_m + 0.2, (hits_m, chance_m)
    assert hits_m > 0.8, hits_m


def test_explain_png_and_deviations(morph: dict) -> None:
    from PIL import Image

    from lymph.report.explain import explain
    from lymph.store import open_store

    s = open_store(morph["store"])
    pid = str(s.ids[np.flatnonzero(s.labels == 1)[0]])
    out = morph["root"] / "one.png"
    e = explain(pid, morph["model"], store=morph["store"], k=4, out=out, cache=morph["cache"])
    assert out.is_file() and Image.open(out).size[0] >= 400
    assert 0 <= e.probability <= 1 and e.threshold == pytest.approx(e.threshold)
    assert len(e.top) == 4 and set(e.deviations) == set(e.top)  # morphometry: named columns
    assert all(len(d) == 3 and d[0][0] != "nucleus_found" for d in e.deviations.values())


def test_cli_explain(morph: dict) -> None:
    from lymph.store import open_store

    s = open_store(morph["store"])
    pid = str(s.ids[0])
    out = morph["root"] / "cli.png"
    r = CliRunner().invoke(app, ["explain", pid, "--model", str(morph["model"]), "--store",
                                 str(morph["store"]), "--out", str(out), "--k", "2"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "P(malignant)" in r.output and "cell #" in r.output
    r = CliRunner().invoke(app, ["explain", "NOPE", "--model", str(morph["model"]), "--store",
                                 str(morph["store"])])
    assert r.exit_code == 1 and "NOPE" in r.output


def test_explain_from_data(morph: dict) -> None:
    """--data: a morphometry model re-measures the folder, same probability as the store."""
    from lymph.report.explain import explain
    from lymph.store import open_store

    s = open_store(morph["store"])
    pid = str(s.ids[1])
    a = explain(pid, morph["model"], store=morph["store"], out=morph["root"] / "a.png")
    b = explain(pid, morph["model"], data=morph["data"], out=morph["root"] / "b.png")
    assert b.probability == pytest.approx(a.probability, abs=1e-6)
    assert np.allclose(a.weights, b.weights, atol=1e-6)


def test_explain_orders_a_composition_models_cells_by_their_push(morph: dict) -> None:
    # composition has no attention: explain ranks the cells by CompositionFusion.cell_scores
    # (each cell's leave-one-out push on the logit), not by its uniform 1/n weights
    from lymph.baselines.composition import CompositionFusion
    from lymph.head.modeldir import save_model
    from lymph.report.explain import explain
    from lymph.store import open_store

    s = open_store(morph["store"])
    est = CompositionFusion(n_prototypes=4, seed=0).fit(s)
    save_model(est, morph["root"] / "comp", store=s)
    row = int(np.flatnonzero(s.labels == 1)[0])
    pid = str(s.ids[row])
    e = explain(pid, morph["root"] / "comp", store=morph["store"], k=3,
                out=morph["root"] / f"{pid}.comp.png")
    assert e.weight_name == "score" and (morph["root"] / f"{pid}.comp.png").stat().st_size > 0
    np.testing.assert_allclose(e.weights, est.cell_scores(s.subset([row]))[0])
    assert e.weights[e.top].min() >= e.weights[e.bottom].max()
    assert np.ptp(e.weights) > 0  # not uniform
