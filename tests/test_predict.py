"""`lymph predict`: outputs, a moved model directory, --data against --store, and errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_bags
from lymph.cli import app
from lymph.errors import LymphError
from lymph.head.fit import fit_head
from lymph.head.modeldir import load_model
from lymph.head.predict import predict
from lymph.store import open_store, write_store

torch.set_num_threads(1)
runner = CliRunner()
FAST = dict(folds=2, max_epochs=6, patience=3)


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store with unlabelled patients and provenance, and a model directory fitted on it."""
    d = tmp_path_factory.mktemp("pred")
    arrays = make_bags(n_patients=30)
    arrays["labels"][-4:] = -1
    prov = {"method": "fake", "encoder_sha256": "a" * 64, "dim": 8}
    st = write_store(d / "s.h5", **arrays, provenance=prov,
                     image_paths=[f"img{i}.jpg" for i in range(arrays["patient_ptr"][-1])])
    fit_head(st, out=d / "model", **FAST)
    return st, d / "model"


def test_predict_outputs(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    st, model = fitted
    out, sub = tmp_path / "pred.csv", tmp_path / "sub.csv"
    r = runner.invoke(app, ["predict", "--model", str(model), "--store", str(st), "--out", str(out),
                            "--submission", str(sub)])
    assert r.exit_code == 0, r.output
    pr = rows(out)
    s = open_store(st)
    assert [p["id"] for p in pr] == list(s.ids) and set(pr[0]) == {"id", "probability", "predicted"}
    thr = json.loads((model / "model.json").read_text())["threshold"]
    for p in pr:
        assert int(p["predicted"]) == int(float(p["probability"]) >= thr - 1e-6)
    assert sub.read_text().splitlines()[0] == "Id,Predicted"
    assert {x["Predicted"] for x in rows(sub)} <= {"0", "1"}
    att = rows(tmp_path / "pred.attention.csv")
    assert len(att) == s.n_images and att[0]["image_path"] == "img0.jpg"
    by_id: dict[str, float] = {}
    for a in att:
        by_id[a["id"]] = by_id.get(a["id"], 0.0) + float(a["weight"])
    assert all(abs(v - 1) < 1e-4 for v in by_id.values())
    r = runner.invoke(app, ["predict", "--model", str(model), "--store", str(st), "--out",
                            str(tmp_path / "u.csv"), "--select", "unlabelled"])
    assert r.exit_code == 0 and len(rows(tmp_path / "u.csv")) == 4


def test_model_dir_works_after_moving(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    st, model = fitted
    a = predict(model, tmp_path / "a.csv", store=st)
    moved = tmp_path / "elsewhere" / "m"
    shutil.copytree(model, moved)
    b = predict(moved, tmp_path / "b.csv", store=st)
    np.testing.assert_array_equal(a.probability, b.probability)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    est = load_model(moved).estimator
    assert est.threshold_ == load_model(model).estimator.threshold_


def test_predict_errors(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    st, model = fitted
    s = open_store(st)
    base = dict(embeddings=s.embeddings, patient_ptr=s.patient_ptr, ids=s.ids, labels=s.labels,
                clinical=s.clinical, clinical_columns=s.clinical_columns)
    other = write_store(tmp_path / "o.h5", **base, provenance={"encoder_sha256": "b" * 64})
    with pytest.raises(LymphError, match="different encoder"):
        predict(model, tmp_path / "p.csv", store=other)
    nocol = write_store(tmp_path / "c.h5", **dict(base, clinical=s.clinical[:, :2],
                        clinical_columns=s.clinical_columns[:2]), provenance=s.provenance)
    with pytest.raises(LymphError, match="missing clinical field"):
        predict(model, tmp_path / "p.csv", store=nocol)
    cut = int(s.patient_ptr[1])
    noimg = write_store(tmp_path / "n.h5", **dict(base, embeddings=s.embeddings[cut:],
                        patient_ptr=np.concatenate([[0], s.patient_ptr[1:] - cut])),
                        provenance=s.provenance)
    with pytest.raises(LymphError, match="no images"):
        predict(model, tmp_path / "p.csv", store=noimg)
    labelled_only = write_store(tmp_path / "l.h5", **dict(base, labels=np.maximum(s.labels, 0)),
                                provenance=s.provenance)
    with pytest.raises(LymphError, match="empty selection"):
        predict(model, tmp_path / "p.csv", store=labelled_only, select="unlabelled")
    with pytest.raises(LymphError, match="no encoder checkpoint"):
        predict(model, tmp_path / "p.csv", data=tmp_path)
    with pytest.raises(LymphError, match="not a model directory"):
        predict(tmp_path, tmp_path / "p.csv", store=st)
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "head.pt").write_bytes(b"x")
    with pytest.raises(LymphError, match="sha256"):
        load_model(bad)
    r = runner.invoke(app, ["predict", "--model", str(model), "--store", str(other), "--out",
                            str(tmp_path / "p.csv")])
    assert r.exit_code == 1 and "different encoder" in r.output and "Traceback" not in r.output


def test_predict_on_data_equals_predict_on_its_store(synth_data: Path, synth_cache: Path,
                                                     tmp_path: Path) -> None:
    """A model trained on an autoencoder store, moved away from its encoder's original path,
    predicts raw data (embedded with its own encoder copy) exactly as the store."""
    from lymph.encoder.run import run_embed

    run_embed(out=tmp_path / "ae.h5", images=synth_cache, epochs=1, batch_size=16, dim=8,
              device="cpu", progress=False)
    st = tmp_path / "ae.h5"
    fit_head(st, out=tmp_path / "model", **FAST)
    moved = tmp_path / "moved" / "model"
    shutil.move(tmp_path / "model", moved)
    ckpt = Path(open_store(st).provenance["encoder_checkpoint"])
    assert (moved / "encoder" / ckpt.name).is_file()
    ckpt.unlink()  # the model directory must not need the original checkpoint
    by_store = predict(moved, tmp_path / "s.csv", store=st)
    by_data = predict(moved, tmp_path / "d.csv", data=synth_data, device="cpu")
    assert list(by_data.ids) == list(by_store.ids)
    np.testing.assert_allclose(by_data.probability, by_store.probability, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(by_data.predicted, by_store.predicted)
    assert by_data.store_path == tmp_path / "d.store.h5"
