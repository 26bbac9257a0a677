"""Model directories are closed boxes (issue 15, class 4).

Every file ``model.json`` names must be a relative name resolving inside the folder, a
regular file and match its recorded sha256, checked before anything is loaded or written;
every value is type- and range-checked. ``predict`` (from a store and from raw data) and
``explain`` refuse a model that breaks any of this with one ``error:`` line and write
nothing (no ``p.store.h5``). The encoder copy is mandatory at fit time. Patient ids are
checked when a store is opened, so report paths never leave their folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import pytest
from reliability_helpers import HEAD, cli, train_tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_tiny(tmp_path_factory.mktemp("modeldir"))


def _meta(m: Path) -> dict[str, Any]:
    return json.loads((m / "model.json").read_text())


def _put(m: Path, meta: Any) -> None:
    (m / "model.json").write_text(json.dumps(meta))


def _enc(name: str) -> Callable[[Path, Path], None]:
    def edit(m: Path, outside: Path) -> None:
        meta = _meta(m)
        meta["encoder"]["file"] = name.format(outside=outside)
        _put(m, meta)
    return edit


def symlink_out(m: Path, outside: Path) -> None:
    meta = _meta(m)
    target = m / meta["encoder"]["file"]
    shutil.copy(target, outside / "x.pt")
    target.unlink()
    os.symlink(outside / "x.pt", target)


def enc_dir(m: Path, outside: Path) -> None:
    target = m / _meta(m)["encoder"]["file"]
    target.unlink()
    target.mkdir()


def edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path, Path], None]:
    def apply(m: Path, outside: Path) -> None:
        meta = _meta(m)
        new = fn(meta)
        _put(m, new if isinstance(new, list) else meta)
    return apply


def raw(text: bytes) -> Callable[[Path, Path], None]:
    def apply(m: Path, outside: Path) -> None:
        (m / "model.json").write_bytes(text)
    return apply


FAULTS: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("encoder-dotdot", _enc("../outside/x.pt"), "leads outside the model directory|expected a file name"),
    ("encoder-absolute", _enc("{outside}/x.pt"), "expected a file name inside"),
    ("encoder-symlink-out", symlink_out, "leads outside|regular file"),
    ("encoder-is-a-folder", enc_dir, "expected a regular file"),
    ("encoder-no-sha", edit(lambda m: m["encoder"].pop("sha256")), "no valid recorded sha256"),
    ("encoder-wrong-sha", edit(lambda m: m["encoder"].update(sha256="0" * 64)),
     "does not match the sha256"),
    ("weights-dotdot", edit(lambda m: m["weights"].update(file="../model/head.pt")),
     "expected a file name inside"),
    ("unknown-param", edit(lambda m: m["params"].update(colour="red")), "'params'"),
    ("missing-key", edit(lambda m: m.pop("config")), "missing key 'config'"),
    ("wrong-type", edit(lambda m: m.update(dim="sixty")), "'dim': expected an integer"),
    ("list-not-object", edit(lambda m: [m]), "expected a JSON object, got list"),
    ("params-a-list", edit(lambda m: m.update(params=[1, 2])), "'params': expected an object"),
    ("threshold-2", edit(lambda m: m.update(threshold=2.0)),
     r"'threshold': expected a number in \(0.0, 1.0\), got 2.0"),
    ("threshold-nan", raw(b'{"encoding-type": "lymph-model", "encoding-version": "1", '
                          b'"estimator": "MILClassifier", "threshold": NaN}'), "threshold"),
    ("dropout-out-of-range", edit(lambda m: m["params"].update(dropout=1.5)), "params.dropout"),
    ("negative-config-dim", edit(lambda m: m["config"].update(dim=-5)),
     r"'config.dim': expected an integer >= 0, got -5"),
    ("scaler-negative-std", edit(lambda m: m["clinical_scaler"].update(
        std=[-1.0] * len(m["clinical_scaler"]["std"]))), "std > 0"),
    ("truncated-json", raw(b'{"encoding-type": "lymph-mo'), "unreadable model description"),
    ("deeply-nested-json", raw(b"[" * 200_000 + b"]" * 200_000), "unreadable model description"),
    ("not-utf8", raw('{"encoding-type": "lymph-modèle"}'.encode("latin-1")),
     "unreadable model description"),
]
COMMANDS = {
    "predict-store": lambda b, m, w: ["predict", "--model", m, "--store", b["store"], "--out",
                                      w / "p.csv"],
    "predict-data": lambda b, m, w: ["predict", "--model", m, "--data", b["data"], "--out",
                                     w / "p.csv", "--device", "cpu"],
    "explain": lambda b, m, w: ["explain", "P9", "--model", m, "--store", b["store"], "--out",
                                w / "e.png"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("fault, mutate, pattern", FAULTS, ids=[f[0] for f in FAULTS])
def test_broken_model_dir_refused_before_anything(base: dict[str, Path], tmp_path: Path,
                                                  command: str, fault: str,
                                                  mutate: Callable[[Path, Path], None],
                                                  pattern: str) -> None:
    import re

    m = tmp_path / "model"
    shutil.copytree(base["model"], m)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.pt").write_bytes(b"not yours to read")
    mutate(m, outside)
    work = tmp_path / "w"
    work.mkdir()
    r = cli(*COMMANDS[command](base, m, work))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.output
    assert list(work.iterdir()) == [], "nothing written (no p.store.h5, no p.csv)"


def test_encoder_copy_is_mandatory_at_fit_time(base: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    shutil.copy(base["store"], store)
    enc = tmp_path / "enc.pt"
    shutil.copy(base["encoder"], enc)
    from lymph.store import open_store, write_store

    s = open_store(store)
    prov = dict(s.provenance, encoder_checkpoint=str(enc))
    write_store(store, embeddings=s.embeddings, patient_ptr=s.patient_ptr, ids=s.ids,
                labels=s.labels, clinical=s.clinical, clinical_columns=s.clinical_columns,
                feature_columns=s.feature_columns, image_paths=s.image_paths, provenance=prov)
    enc.unlink()
    r = cli("fit-head", "--store", store, "--out", tmp_path / "m", *HEAD)
    assert r.exit_code == 1 and "needs a copy of the encoder" in r.output, r.output
    assert not (tmp_path / "m").exists()
    enc.write_bytes(b"another checkpoint")
    r = cli("fit-head", "--store", store, "--out", tmp_path / "m", *HEAD)
    assert r.exit_code == 1 and "changed since" in r.output, r.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("pid", ["../../evil", "/abs", "a/b", "..", "x\\y"])
def test_store_with_a_path_as_patient_id_refused(base: dict[str, Path], tmp_path: Path,
                                                 pid: str) -> None:
    bad = tmp_path / "bad.h5"
    shutil.copy(base["store"], bad)
    with h5py.File(bad, "r+") as f:
        ids = [x.decode() if isinstance(x, bytes) else x for x in f["patients/id"][()]]
        ids[0] = pid
        del f["patients/id"]
        f.create_dataset("patients/id", data=ids, dtype=h5py.string_dtype("utf-8"))
        if "content-sha256" in f.attrs:
            del f.attrs["content-sha256"]
    for args in (["compare-baselines", "--store", bad, "--out", tmp_path / "r", "--folds", 2,
                  "--models", "adaboost"],
                 ["predict", "--model", base["model"], "--store", bad, "--out", tmp_path / "p.csv"]):
        r = cli(*args)
        assert r.exit_code == 1 and "/patients/id: expected plain patient names" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]
