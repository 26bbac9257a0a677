"""A new pooling is one module plus one registry entry: a `median` pooling defined and
registered here runs in `fit-head` (saved and predicted), and joins `compare-baselines` as
`median+clinical`, with no edit anywhere else. And the registries answer without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lymph.cli import app
from lymph.head.registry import POOLINGS, PoolingSpec, register_pooling

runner = CliRunner()


class MedianPool(nn.Module):
    """Per-feature median of the bag's real instances; weights uniform (1 / n)."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xm = x.masked_fill(~mask.unsqueeze(-1), float("nan"))  # (B, N, D): padding ignored
        pooled = torch.nan_to_num(xm.nanmedian(dim=1).values)  # (B, D); an empty bag: 0
        m = mask.to(x.dtype)
        return pooled, m / m.sum(dim=1, keepdim=True).clamp_min(1.0)


@pytest.fixture
def median() -> Iterator[None]:
    """The one registry entry (``compare_rank``: joins the comparison after gated)."""
    register_pooling(PoolingSpec("median", MedianPool, "per-feature median", compare_rank=5))
    yield
    del POOLINGS["median"]


def test_a_registered_pooling_runs_in_fit_head_predict_and_compare(
        median: None, bag_store: Path, tmp_path: Path) -> None:
    js, model = tmp_path / "m.json", tmp_path / "model"
    r = runner.invoke(app, ["fit-head", "--store", str(bag_store), "--pooling", "median",
                            "--folds", "2", "--epochs", "3", "--json", str(js), "--out", str(model)])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["model"] == "median+clinical"
    r = runner.invoke(app, ["predict", "--model", str(model), "--store", str(bag_store),
                            "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compare-baselines", "--store", str(bag_store), "--folds", "2",
                            "--models", "median+clinical,logistic", "--no-montages",
                            "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "c.json").read_text())
    assert {row["model"] for row in rows} == {"median+clinical", "logistic"}
    assert next(row for row in rows if row["model"] == "median+clinical")["pooling"] == "median"


def test_an_unregistered_pooling_is_refused_by_name(bag_store: Path) -> None:
    r = runner.invoke(app, ["fit-head", "--store", str(bag_store), "--pooling", "median"])
    assert r.exit_code == 1 and "--pooling: expected one of attention, gated, mean, max, dsmil" in r.output
    r = runner.invoke(app, ["compare-baselines", "--store", str(bag_store),
                            "--models", "median+clinical"])
    assert r.exit_code == 1 and "unknown model(s) median+clinical" in r.output


def test_the_registries_list_their_names_without_torch() -> None:
    code = ("import sys; from lymph.encoder.registry import method_names; "
            "from lymph.head.registry import pooling_names; "
            "from lymph.compare_models import model_names; "
            "print(len(method_names()), len(pooling_names()), len(model_names())); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4", "5", "12"]
