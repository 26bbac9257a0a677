"""`lymph run PIPELINE.toml`: data -> ingest -> embed -> fit-head -> compare-baselines + report.

Each stage's outputs live under ``artifacts/<stage>/<fingerprint>/`` (see
:mod:`lymph.pipeline.stages`); a stage whose complete output exists is reused ("cached"),
so changing only head settings reruns only stage two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lymph.errors import LymphError
from lymph.pipeline.config import resolve
from lymph.pipeline.stages import Stage, make_stage


@dataclass
class StageReport:
    name: str
    fingerprint: str
    folder: Path
    cached: bool
    seconds: float
    outputs: dict[str, str]


@dataclass
class RunResult:
    config: dict[str, Any]
    stages: list[StageReport] = field(default_factory=list)
    comparison: Any = None  # lymph.compare.ComparisonResult when the compare stage ran
    head_report: dict[str, Any] | None = None

    def stage(self, name: str) -> StageReport:
        return next(s for s in self.stages if s.name == name)


def _data_input(cfg: dict[str, Any]) -> tuple[dict[str, Any], Callable[[Path], Path] | None, Path | None]:
    """Settings of the data stage; a builder for synthetic data, or the given folder."""
    d = cfg["data"]
    if d["synth"]:
        settings = {k: d[k] for k in d if k.startswith("synth")}
        return settings, _build_synth(settings), None
    if not d["path"]:
        raise LymphError("data.path: no data given (use --data DATA_DIR, or data.synth = true)")
    path = Path(d["path"])
    if not path.is_dir():
        raise LymphError(f"data.path: {path}: data folder not found")
    return {"path": str(path.resolve())}, None, path


def _build_synth(settings: dict[str, Any]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        from lymph.data.synth import SynthConfig, make_synthetic, parse_range

        lo, hi = parse_range(settings["synth_images"], "data.synth_images")
        return make_synthetic(folder / "data", SynthConfig(
            patients=settings["synth_patients"], test_patients=settings["synth_test_patients"],
            images_min=lo, images_max=hi, size=settings["synth_size"], seed=settings["synth_seed"]))
    return build


def _embed_settings(e: dict[str, Any]) -> dict[str, Any]:
    s = {k: e[k] for k in ("method", "dim", "epochs", "batch_size", "lr", "seed")}
    if e["method"] == "weak":
        s["folds"] = e["folds"]
    if e["method"] == "morphometry":
        s = {"method": "morphometry"}
    return s


def run_pipeline(pipeline: str | Path | dict[str, Any] | None, *, sets: list[str] | None = None,
                 data: str | Path | None = None, artifacts: str | Path = "artifacts",
                 progress: bool = True,
                 on_stage: Callable[[StageReport], None] | None = None) -> RunResult:
    """Resolve the configuration and run the stages in order, reusing cached outputs."""
    cfg = resolve(pipeline, sets, data)
    root = Path(artifacts)
    result = RunResult(config=cfg)

    def done(stage: Stage, cached: bool, seconds: float, outputs: dict[str, Any]) -> None:
        rep = StageReport(stage.name, stage.fingerprint, stage.folder, cached, seconds,
                          {k: str(v) for k, v in outputs.items()})
        result.stages.append(rep)
        if on_stage:
            on_stage(rep)

    def run_stage(stage: Stage, work: Callable[[Path], dict[str, Any]]) -> dict[str, str]:
        outs, cached, secs = stage.build(work, cfg)  # locked; a failure leaves no folder
        done(stage, cached, secs, outs)
        return {k: str(v) for k, v in outs.items()}

    # ---- data ------------------------------------------------------------------------
    d_settings, build, given = _data_input(cfg)
    if build is not None:
        st = make_stage(root, "data", d_settings, [])
        data_dir = Path(run_stage(st, lambda f: {"data": build(f)})["data"])
        data_fp = st.fingerprint
    else:
        from lymph.data.cache import data_fingerprint
        from lymph.data.challenge import read_challenge

        assert given is not None
        data_dir = given
        data_fp = data_fingerprint(read_challenge(given), {})[:16]

    # ---- ingest ----------------------------------------------------------------------
    ing = {"size": cfg["ingest"]["size"], "crop": cfg["ingest"]["crop"] or None}
    st = make_stage(root, "ingest", ing, [data_fp])

    def do_ingest(folder: Path) -> dict[str, Any]:
        from lymph.data.cache import ingest

        res = ingest(data_dir, folder / "images.zarr", size=ing["size"], crop=ing["crop"])
        return {"images": res.path}

    cache_path = Path(run_stage(st, do_ingest)["images"])
    ingest_fp = st.fingerprint

    # ---- embed (stage one) -------------------------------------------------------------
    e = cfg["embed"]
    st = make_stage(root, "embed", _embed_settings(e), [ingest_fp])

    def do_embed(folder: Path) -> dict[str, Any]:
        from lymph.encoder.embed import run_embed

        extra = {"folds": e["folds"]} if e["method"] == "weak" else {}
        out = folder / "store.h5"
        s = run_embed(out=out, images=cache_path, method=e["method"], dim=e["dim"] or None,
                      epochs=e["epochs"] or None, batch_size=e["batch_size"] or None,
                      lr=e["lr"] or None, seed=e["seed"], device=e["device"], progress=progress,
                      **extra)
        outs: dict[str, Any] = {"store": out}
        if s.checkpoint is not None:
            outs["encoder"] = s.checkpoint
        return outs

    store_path = Path(run_stage(st, do_embed)["store"])
    embed_fp = st.fingerprint

    # ---- fit-head (stage two) ----------------------------------------------------------
    h = cfg["head"]
    head_settings = {k: v for k, v in h.items()}
    st = make_stage(root, "head", head_settings, [embed_fp])

    def do_head(folder: Path) -> dict[str, Any]:
        from lymph.head.fit import fit_head

        params: dict[str, Any] = dict(
            clinical=h["clinical"], images=h["images"], attention_hidden=h["attention_hidden"],
            mlp=tuple(h["mlp"]), dropout=h["dropout"], lr=h["lr"],
            weight_decay=h["weight_decay"], max_epochs=h["max_epochs"], batch_size=h["batch_size"],
            patience=h["patience"], threshold=h["threshold"])
        if h["fusion"] == "late":
            params = {"threshold": h["threshold"]}
        folds, repeats = h["folds"], h["repeats"]
        fold_list = None
        if h["validation"] == "holdout":  # the report: one stratified 80/20 split
            from lymph.head.evaluate import make_folds
            from lymph.store import open_store

            fold_list = make_folds(open_store(store_path).labels, 5, 1, h["seed"])[:1]
        elif h["validation"] != "cv":
            raise LymphError(f"head.validation: expected cv or holdout, got {h['validation']!r}")
        res = fit_head(store_path, pooling=h["pooling"], folds=folds, repeats=repeats,
                       seed=h["seed"], out=folder / "model", json_path=folder / "metrics.json",
                       fusion=h["fusion"], fold_list=fold_list, **params)
        result.head_report = res.report
        return {"model": folder / "model", "metrics": folder / "metrics.json",
                "oof": res.outputs.get("oof", ""), "plot": res.outputs.get("plot", "")}

    run_stage(st, do_head)
    if result.head_report is None:
        import json

        result.head_report = json.loads(Path(st.folder / "metrics.json").read_text())

    # ---- compare-baselines + report ---------------------------------------------------------
    c = cfg["compare"]
    if c["enabled"]:
        st = make_stage(root, "compare", {k: c[k] for k in ("folds", "repeats", "seed")}, [embed_fp])

        def do_compare(folder: Path) -> dict[str, Any]:
            from lymph.compare import run_compare

            res, outs = run_compare(store_path, folds=c["folds"], repeats=c["repeats"],
                                    seed=c["seed"], out=folder / "report",
                                    json_path=folder / "comparison-rows.json", images=cache_path)
            result.comparison = res
            return {"report": folder / "report" / "report.md",
                    "json": folder / "comparison-rows.json"}

        run_stage(st, do_compare)
    return result
