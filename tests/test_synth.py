"""`lymph synth`: deterministic, challenge layout, a signal in both sources."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from lymph.cli import app
from lymph.data.challenge import read_challenge
from lymph.data.synth import SynthConfig, make_synthetic


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    cfg = dict(patients=6, test_patients=2, images_min=2, images_max=4, size=32)
    a = make_synthetic(tmp_path / "a", SynthConfig(seed=1, **cfg))
    b = make_synthetic(tmp_path / "b", SynthConfig(seed=1, **cfg))
    c = make_synthetic(tmp_path / "c", SynthConfig(seed=2, **cfg))
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)


def test_challenge_quirks_present(synth_data: Path) -> None:
    train = (synth_data / "trainset" / "trainset_true.csv").read_text()
    assert "/" in train and "-" in train.split("\n", 1)[1]  # both DOB formats
    assert ",f," in train
    assert (synth_data / "clinical_annotation.csv").read_text().startswith(",ID,")
    assert (synth_data / ".DS_Store").exists()


def test_clinical_signal(tmp_path: Path) -> None:
    d = read_challenge(make_synthetic(tmp_path / "s", SynthConfig(
        patients=60, test_patients=0, images_min=1, images_max=1, size=16, seed=0)))
    t = d.table()
    react = t[t.label == 0].lymph_count
    mal = t[t.label == 1].lymph_count
    assert react.between(4, 8).mean() > 0.8
    assert mal.median() > react.median() * 1.5
    assert t.lymph_count.between(2, 300).all()


def test_only_some_malignant_cells_are_atypical(synth_data: Path) -> None:
    import pandas as pd

    truth = pd.read_csv(synth_data / "synth_truth.csv")
    t = read_challenge(synth_data).table().set_index("id")
    frac = truth.groupby("patient").atypical.mean()
    labels = t.loc[frac.index, "label"]
    assert (frac[labels == 0] == 0).all()
    mal = frac[labels == 1]
    assert (mal > 0).all() and (mal < 1).any()


def test_atypical_cells_are_darker_and_larger() -> None:
    from lymph.data.synth import draw_cell

    rng = np.random.default_rng(0)
    typ = np.mean([(draw_cell(rng, 64, False).mean(axis=2) < 120).mean() for _ in range(10)])
    aty = np.mean([(draw_cell(rng, 64, True).mean(axis=2) < 120).mean() for _ in range(10)])
    assert aty > 1.5 * typ


def test_cli(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "d"), "--patients", "4",
                                   "--test-patients", "1", "--images", "2:3", "--size", "24"])
    assert res.exit_code == 0, res.output
    assert len(read_challenge(tmp_path / "d")) == 5
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "e"), "--images", "5:2"])
    assert res.exit_code == 1 and "--images" in res.output
