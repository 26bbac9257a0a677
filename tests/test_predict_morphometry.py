"""A model directory made from a morphometry store (no encoder checkpoint) is still
self-contained: `predict --data` and `explain --data` measure new patients the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from lymph.cli import app


@pytest.fixture(scope="module")
def morph_model(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from lymph.data.cache import ingest, open_cache
    from lymph.encoder.methods.morphometry import write_morphometry_store
    from lymph.head.fit import fit_head

    d = tmp_path_factory.mktemp("morph")
    cache = ingest(synth_data, d / "images.zarr", size=32, workers=1).path
    store = write_morphometry_store(open_cache(cache), d / "morph.h5", workers=1)
    fit_head(store, fusion="late", folds=2, repeats=1, out=d / "model")
    return store, d / "model"


def test_predict_data_equals_predict_store(morph_model: tuple[Path, Path], synth_data: Path,
                                           tmp_path: Path) -> None:
    store, model = morph_model
    r = CliRunner()
    a = r.invoke(app, ["predict", "--model", str(model), "--store", str(store),
                       "--out", str(tmp_path / "a.csv")])
    b = r.invoke(app, ["predict", "--model", str(model), "--data", str(synth_data / "testset"),
                       "--out", str(tmp_path / "b.csv"), "--submission", str(tmp_path / "s.csv")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    pa = pd.read_csv(tmp_path / "a.csv").set_index("id")
    pb = pd.read_csv(tmp_path / "b.csv").set_index("id")
    assert len(pb) == 3 and set(pb.index) <= set(pa.index)
    np.testing.assert_array_equal(pb.probability, pa.loc[pb.index].probability)
    assert (tmp_path / "s.csv").read_text().startswith("Id,Predicted\n")


def test_explain_data_on_a_morphometry_model(morph_model: tuple[Path, Path], synth_data: Path,
                                            tmp_path: Path) -> None:
    _, model = morph_model
    pid = sorted(p.name for p in (synth_data / "testset").iterdir() if p.is_dir())[0]
    res = CliRunner().invoke(app, ["explain", pid, "--model", str(model), "--data",
                                   str(synth_data / "testset"), "--out", str(tmp_path / "e.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e.png").stat().st_size > 1000
