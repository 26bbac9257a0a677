"""The run report: report.md opening with its plots, the PNGs, montages of misclassified
patients (pixels from the cache or the source files), oof.csv and comparison.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lymph.cli import app


@pytest.fixture(scope="module")
def morph_store(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lymph.data.cache import open_cache
    from lymph.encoder.methods.morphometry import write_morphometry_store

    return write_morphometry_store(open_cache(synth_cache),
                                   tmp_path_factory.mktemp("rep") / "m.h5", workers=1)


MODELS = "logistic,attention+clinical,late-fusion"


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_written(morph_store: Path, synth_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(morph_store), "--folds", "3",
                                 "--models", MODELS, "--out", str(out),
                                 "--images", str(synth_cache)])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    first_image = md.index("![")
    assert first_image < md.index("## Results")  # the report opens with its plots
    assert "(roc.png)" in md and "(pr.png)" in md
    assert _png(out / "roc.png") and _png(out / "pr.png")
    for section in ("## Results", "## Paired comparison", "## Misclassified patients"):
        assert section in md
    # montages: one PNG per misclassified patient, linked from the report
    links = [line for line in md.splitlines() if line.startswith("![") and "misclassified/" in line]
    pngs = sorted((out / "misclassified").glob("*.png")) if (out / "misclassified").exists() else []
    assert len(links) == len(pngs)
    assert all(_png(p) for p in pngs)
    with open(out / "oof.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == set(MODELS.split(","))
    assert len(rows) == 3 * 16  # 16 labelled patients, 1 repeat, 3 models
    cmp = json.loads((out / "comparison.json").read_text())
    assert cmp["folds"] == 3 and len(cmp["models"]) == 3 and cmp["paired"]
    assert sum(len(f["test"]) for f in cmp["fold_patients"]) == 16
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_montage_pixels_from_files_or_cache(morph_store: Path, synth_cache: Path) -> None:
    """Source files (48 px JPEGs) and the 32 px cache give the same cell, at their sizes."""
    from lymph.data.cache import open_cache
    from lymph.report.montage import PixelSource, patient_montage
    from lymph.store import open_store

    s = open_store(morph_store)
    a = PixelSource(s).read(3)
    b = PixelSource(s, open_cache(synth_cache)).read(3)
    assert a.shape == (48, 48, 3) and b.shape == (32, 32, 3)
    img = patient_montage(s, 0, np.linspace(1, 0, s.bag_sizes[0]), k=2, title="t")
    assert img.size[0] > 100


def test_misclassified_montages_real_errors(morph_store: Path, tmp_path: Path) -> None:
    """The montages are exactly the attention model's repeat-1 out-of-fold errors (labels
    shuffled so that there are some), with pixels read from the store's source files."""
    from lymph.compare import compare, default_models, select_models
    from lymph.report.markdown import write_report
    from lymph.store import open_store, write_store

    s0 = open_store(morph_store)
    lab = s0.labels.copy()
    rows = s0.labelled()
    lab[rows] = np.random.default_rng(0).permutation(lab[rows])
    s = open_store(write_store(
        tmp_path / "shuffled.h5", embeddings=s0.embeddings, patient_ptr=s0.patient_ptr,
        ids=s0.ids, labels=lab, clinical=s0.clinical, clinical_columns=s0.clinical_columns,
        feature_columns=s0.feature_columns, image_paths=s0.image_paths))
    specs, _ = default_models(s)
    res = compare(s, select_models(specs, "logistic,attention+clinical"), folds=3)
    files = write_report(res, s, tmp_path / "r")
    cv = res.models["attention+clinical"].cv
    scored = np.flatnonzero(cv.oof_fold[0] >= 0)
    wrong = {str(cv.ids[i]) for i in scored
             if int(cv.oof[0, i] >= cv.oof_threshold[0, i]) != cv.labels[i]}
    shown = {k.split(":", 1)[1] for k in files if k.startswith("montage:")}
    assert wrong and shown == wrong
    md = (tmp_path / "r" / "report.md").read_text()
    assert all(f"misclassified/{pid}.png" in md for pid in wrong)
