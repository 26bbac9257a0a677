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

#: version of the report the compare stage writes (a new report reruns the stage)
REPORT_VERSION = 5


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
    predictions: dict[str, Any] | None = None  # the unlabelled patients, by the head's model

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


def _method(name: str) -> Any:
    """The registry entry of a single method (None for a combination ``A+B``)."""
    from lymph.encoder.registry import is_combination, method_spec

    return None if is_combination(name) else method_spec(name, "embed.method")


def _embed_settings(e: dict[str, Any]) -> dict[str, Any]:
    """The settings that make the embed stage's fingerprint (only those that matter)."""
    spec = _method(e["method"])
    s = {k: e[k] for k in ("method", "dim", "epochs", "batch_size", "lr", "seed")}
    if spec is not None and spec.needs_labels:
        s["folds"] = e["folds"]
    if e.get("lr_schedule"):  # only when set: older fingerprints stay valid
        s["lr_schedule"] = e["lr_schedule"]
    if e.get("channels"):  # likewise
        s["channels"] = list(e["channels"])
    if spec is not None and not spec.trainable:
        s = {"method": e["method"]}
    return s


def chosen_model(h: dict[str, Any]) -> str | None:
    """The comparison model that the head stage's settings fit (the report's chosen model)."""
    if h["fusion"] == "late":
        return "late-fusion"
    if not h["images"]:
        return "clinical-mlp"
    if not h["clinical"]:
        return "attention-images-only" if h["pooling"] == "attention" else None
    return f"{h['pooling']}+clinical"


def _bar(name: str, total: int | None, enabled: bool) -> Any:
    """A progress bar for a stage; ``update(done, total)`` style callback."""
    from contextlib import contextmanager

    from lymph.console import progress_bar

    @contextmanager
    def cm() -> Any:
        state = {"done": 0}
        with progress_bar(name, total, enabled=enabled) as update:
            def step(done: int, tot: int | None = None) -> None:
                update(advance=done - state["done"], **({} if tot is None else {"total": tot}))
                state["done"] = done
            yield step
    return cm()


def predict_unlabelled(model_dir: Path, store_path: Path, folder: Path, target_threshold: float | None
                       ) -> dict[str, Any] | None:
    """The head's final model on the store's unlabelled patients: ``predictions.csv``
    (id, probability, predicted), ``submission.csv`` (``Id,Predicted``, the challenge's
    format) in ``folder``; returns what the report shows (None without unlabelled patients)."""
    import numpy as np

    from lymph.head.modeldir import load_model
    from lymph.head.predict import predict
    from lymph.store import open_store

    s = open_store(store_path)
    rows = np.flatnonzero(np.asarray(s.labels) < 0)
    if rows.size == 0:
        return None
    res = predict(model_dir, folder / "predictions.csv", store=store_path,
                  submission=folder / "submission.csv", select="unlabelled")
    est = load_model(model_dir).estimator
    sub = s.subset(rows)
    weights: dict[str, Any] = {}
    if hasattr(est, "cell_scores"):
        weights = {str(i): w for i, w in zip(sub.ids, est.cell_scores(sub))}
    elif getattr(est, "images", False):
        weights = {str(i): w for i, w in zip(sub.ids, est.attention(sub))}
    return {"model": str(model_dir), "ids": [str(i) for i in res.ids],
            "probability": [float(v) for v in res.probability],
            "predicted": [int(v) for v in res.predicted], "threshold": float(res.threshold),
            "target_threshold": target_threshold, "n": int(rows.size), "weights": weights,
            "outputs": {k: str(v) for k, v in res.outputs.items()}}


def run_pipeline(pipeline: str | Path | dict[str, Any] | None, *, sets: list[str] | None = None,
                 data: str | Path | None = None, artifacts: str | Path = "artifacts",
                 progress: bool = True,
                 on_stage: Callable[[StageReport], None] | None = None,
                 on_start: Callable[[str, dict[str, Any]], None] | None = None,
                 target_sensitivity: float | None = None) -> RunResult:
    """Resolve the configuration and run the stages in order, reusing cached outputs.

    ``on_start(stage, settings)`` is called before a stage that is not cached runs (so a
    long stage is never silent); ``target_sensitivity`` overrides ``compare.target_sensitivity``."""
    cfg = resolve(pipeline, sets, data)
    if target_sensitivity is not None:
        cfg["compare"]["target_sensitivity"] = target_sensitivity
    from lymph.report.triage import check_target

    cfg["compare"]["target_sensitivity"] = check_target(
        cfg["compare"]["target_sensitivity"],
        "--target-sensitivity" if target_sensitivity is not None else "compare.target_sensitivity")
    root = Path(artifacts)
    result = RunResult(config=cfg)

    def done(stage: Stage, cached: bool, seconds: float, outputs: dict[str, Any]) -> None:
        rep = StageReport(stage.name, stage.fingerprint, stage.folder, cached, seconds,
                          {k: str(v) for k, v in outputs.items()})
        result.stages.append(rep)
        if on_stage:
            on_stage(rep)

    def run_stage(stage: Stage, work: Callable[[Path], dict[str, Any]]) -> dict[str, str]:
        start = (lambda: on_start(stage.name, stage.settings)) if on_start else None
        outs, cached, secs = stage.build(work, cfg, on_start=start)  # locked; a failure leaves no folder
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

        with _bar("ingest", None, progress) as step:
            res = ingest(data_dir, folder / "images.zarr", size=ing["size"], crop=ing["crop"],
                         progress=step)
        return {"images": res.path}

    cache_path = Path(run_stage(st, do_ingest)["images"])
    ingest_fp = st.fingerprint

    # ---- embed (stage one) -------------------------------------------------------------
    e = cfg["embed"]
    st = make_stage(root, "embed", _embed_settings(e), [ingest_fp])

    def do_embed(folder: Path) -> dict[str, Any]:
        from lymph.encoder.run import run_embed

        spec = _method(e["method"])
        extra = {"folds": e["folds"]} if spec is not None and spec.needs_labels else {}
        out = folder / "store.h5"
        if spec is not None and spec.writer is not None:  # no training (morphometry): measure
            from lymph.data.cache import open_cache  # every image, with progress
            from lymph.encoder.registry import resolve

            cache = open_cache(cache_path)
            with _bar(f"embed ({spec.name})", cache.n_images, progress) as step:
                resolve(spec.writer)(cache, out, progress=step)
            return {"store": out}
        s = run_embed(out=out, images=cache_path, method=e["method"], dim=e["dim"] or None,
                      epochs=e["epochs"] or None, batch_size=e["batch_size"] or None,
                      lr=e["lr"] or None, seed=e["seed"], device=e["device"], progress=progress,
                      lr_schedule=e["lr_schedule"] or None,
                      channels=tuple(e["channels"]) or None, **extra)
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
        n_fits = len(fold_list) if fold_list is not None else folds * repeats
        with _bar("fit-head", n_fits, progress) as step:
            res = fit_head(store_path, pooling=h["pooling"], folds=folds, repeats=repeats,
                           seed=h["seed"], out=folder / "model", json_path=folder / "metrics.json",
                           fusion=h["fusion"], fold_list=fold_list, progress=step, **params)
        result.head_report = res.report
        return {"model": folder / "model", "metrics": folder / "metrics.json",
                "oof": res.outputs.get("oof", ""), "plot": res.outputs.get("plot", "")}

    head_outs = run_stage(st, do_head)
    head_fp = st.fingerprint
    if result.head_report is None:
        import json

        result.head_report = json.loads(Path(st.folder / "metrics.json").read_text())

    # ---- compare-baselines + report ---------------------------------------------------------
    c = cfg["compare"]
    if c["enabled"]:
        chosen = chosen_model(h)
        settings = {k: c[k] for k in ("folds", "repeats", "seed", "target_sensitivity")}
        settings.update(chosen=chosen, report=REPORT_VERSION)
        st = make_stage(root, "compare", settings, [embed_fp, head_fp])

        def do_compare(folder: Path) -> dict[str, Any]:
            from lymph.compare import default_models, run_compare
            from lymph.store import open_store

            specs = default_models(open_store(store_path))[0]  # what this store can run
            pick = chosen if chosen in specs else None
            n_models = len(specs)
            with _bar("compare-baselines", n_models * c["folds"] * c["repeats"], progress) as step:
                count = {"n": 0}

                def tick(name: str, done: int, total: int) -> None:
                    count["n"] += 1
                    step(count["n"])

                res, outs = run_compare(
                    store_path, folds=c["folds"], repeats=c["repeats"], seed=c["seed"],
                    out=folder / "report", json_path=folder / "comparison-rows.json",
                    images=cache_path, progress=tick, chosen=pick,
                    target_sensitivity=c["target_sensitivity"],
                    predict_unlabelled=lambda thr: predict_unlabelled(
                        Path(head_outs["model"]), store_path, folder, thr))
            result.comparison = res
            files = {"report": folder / "report" / "report.md",
                     "html": folder / "report" / "report.html",
                     "json": folder / "comparison-rows.json"}
            for k in ("predictions", "submission"):
                if k in outs:
                    files[k] = outs[k]
            return files

        outs = run_stage(st, do_compare)
        if "predictions" in outs:
            result.predictions = {k: outs[k] for k in ("predictions", "submission") if k in outs}
    return result
