"""`lymph bench`: every figure is measured and comes with its ceiling and ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lymph.cli import app


@pytest.mark.slow
def test_bench_on_tiny_data(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "--data", str(synth_data), "--quick",
                                   "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    from lymph.data.challenge import read_challenge

    assert d["ingest"]["images"] == read_challenge(synth_data).n_images
    assert d["ingest"]["ratio_to_ceiling"] > 0
    s1 = d["stage_one"]
    assert s1["train_images_per_s"] > 0 and 0 < s1["feed_efficiency"]
    assert s1["matmul_gflops_fp32"] > 0 and s1["train_gflop_per_image"] > 0
    fh = d["fit_head"]
    assert fh["vectorised_seconds"] > 0 and fh["speedup"] > 0
    assert [r["figure"].split(" (")[0] for r in d["rows"]][:2] == ["ingest", "stage-one training"]
    assert "ingest" in res.output and "ratio" in res.output
    for step in ("ingest:", "stage one:", "fit-head:"):  # each step says when it starts
        assert f"] {step}" in res.output
