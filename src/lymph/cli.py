"""The `lymph` command line. Typer commands only: each parses its options, imports its
stage inside the function (so `lymph --help` never imports torch) and calls one library
function. A :class:`~lymph.errors.LymphError` becomes a one-line message and exit code 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

from lymph.errors import LymphError

app = typer.Typer(
    name="lymph",
    help="Reactive vs malignant lymphocytosis from blood-smear cell images and clinical data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(fn: F) -> F:
    """Turn LymphError into `error: ...` on stderr and exit code 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lymph.console import setup_logging

        setup_logging()
        from lymph.signals import trap_signals

        try:
            with trap_signals():
                return fn(*args, **kwargs)
        except LymphError as e:
            if not getattr(e, "quiet", False):  # quiet: another torchrun rank says why
                typer.echo(f"error: {flag_names(str(e), fn)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:  # SIGINT, or SIGTERM / SIGHUP (lymph.signals.Terminated)
            typer.echo("interrupted", err=True)
            raise typer.Exit(getattr(e, "exit_code", 130)) from None
        except OSError as e:  # a user path: permission, read-only, full disk, not a folder...
            typer.echo(f"error: {describe_os_error(e)}", err=True)
            raise typer.Exit(1) from None
        except MemoryError:
            typer.echo("error: out of memory (lower the batch size, the image size or the "
                       "number of workers)", err=True)
            raise typer.Exit(1) from None
        except Exception as e:  # the net: no traceback (LYMPH_DEBUG=1 shows it)
            import os

            if os.environ.get("LYMPH_DEBUG") or isinstance(e, (typer.Exit, typer.Abort)) or \
                    type(e).__module__.split(".")[0] in ("click", "typer", "_typer"):
                raise
            typer.echo(f"error: {type(e).__name__}: {e} (unexpected; LYMPH_DEBUG=1 shows "
                       "the traceback)", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


#: library settings whose flag has another name
SETTING_FLAGS = {"n_jobs": "jobs", "n_threads": "threads", "max_epochs": "epochs"}


def flag_names(message: str, fn: Callable[..., Any]) -> str:
    """A library message with the command's flags for the settings it names: a leading
    ``name:`` and every ```name``` that is a parameter of the command ``fn`` become
    ``--name``. (The library names settings, as a pipeline file or a Python caller knows
    them; only here are they flags.)"""
    import inspect
    import re

    params = set(inspect.signature(fn).parameters)

    def flag(m: re.Match[str]) -> str:
        name = SETTING_FLAGS.get(m.group(1), m.group(1))
        return "--" + name.replace("_", "-") if name in params else m.group(0)

    message = re.sub(r"^([a-z_]+)(?=:)", flag, message)
    return re.sub(r"`([a-z_]+)`", flag, message)


def describe_os_error(e: OSError) -> str:
    """``PATH: cause`` for an OSError (``PATH -> PATH2: cause`` for a rename)."""
    import errno as _errno
    import os

    cause = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    if e.errno == _errno.ENOSPC:
        cause += " (free some space and run again; nothing was left half-written)"
    where = ""
    if e.filename is not None:
        where = f"{os.fsdecode(e.filename)}"
        if getattr(e, "filename2", None) is not None:
            where += f" -> {os.fsdecode(e.filename2)}"
        return f"{where}: {cause}"
    return cause


def check_outputs(outputs: dict[str, tuple[Any, str]], inputs: list[Any] | None = None) -> None:
    """Refuse outputs that would replace something lymph did not write (lymph.outputs)."""
    from lymph.outputs import check_outputs as check

    check(outputs, inputs=inputs or [])


def check_options(**checks: tuple[Any, ...]) -> None:
    """Range-check options before any work: ``flag=(value, kind, *bounds)``, kind one of
    ``int``, ``float``, ``pos`` (a number > 0), ``frac`` (in [0, 1)). None is skipped."""
    from lymph.checks import check_float, check_int

    for flag, (value, kind, *b) in checks.items():
        if value is None:
            continue
        name = "--" + flag.replace("_", "-")
        if kind == "int":
            check_int(name, value, *b)
        elif kind == "pos":
            check_float(name, value, 0.0, lo_open=True)
        elif kind == "frac":
            check_float(name, value, 0.0, 1.0, hi_open=True)
        else:
            check_float(name, value, *b)


def write_json(path: Path, obj: Any) -> None:
    from lymph.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@app.command()
@handles_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (challenge layout).")],
    patients: Annotated[int, typer.Option(help="Labelled (trainset) patients.")] = 40,
    test_patients: Annotated[int, typer.Option(help="Unlabelled (testset, LABEL -1) patients.")] = 6,
    images: Annotated[str, typer.Option(help="Images per patient, MIN:MAX.")] = "8:24",
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 224,
    seed: Annotated[int, typer.Option(help="Random seed; fixes every pixel and value.")] = 0,
) -> None:
    """Write a synthetic dataset in the challenge layout (for the demo and the tests)."""
    check_options(patients=(patients, "int", 1), test_patients=(test_patients, "int", 0),
                  size=(size, "int", 8, 4096), seed=(seed, "int", 0, 2**31 - 1))
    check_outputs({"OUT_DIR": (out_dir, "synth")})
    from lymph.data.synth import SynthConfig, make_synthetic, parse_range

    lo, hi = parse_range(images, "--images")
    cfg = SynthConfig(patients=patients, test_patients=test_patients, images_min=lo,
                      images_max=hi, size=size, seed=seed)
    out = make_synthetic(out_dir, cfg)
    typer.echo(f"wrote synthetic dataset to {out} ({patients} + {test_patients} patients)")


@app.command()
@handles_errors
def ingest(
    data_dir: Annotated[Path, typer.Argument(help="Challenge root or one split folder.")],
    out: Annotated[Path, typer.Option("--out", help="Image cache to write (CACHE.zarr).")],
    size: Annotated[int, typer.Option(help="Side of the cached images (the report: 112).")] = 112,
    crop: Annotated[Optional[int], typer.Option(help="Centre crop (source pixels) before resizing.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the cache is up to date.")] = False,
    strict: Annotated[bool, typer.Option(help="Unreadable images are errors, not warnings.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes (default: all cores).")] = None,
) -> None:
    """Decode every image once into a Zarr image cache (stage one's input)."""
    check_options(size=(size, "int", 8, 1024), crop=(crop, "int", 1), workers=(workers, "int", 1))
    check_outputs({"--out": (out, "cache")}, [data_dir])
    import time

    from lymph.console import progress_bar
    from lymph.data.cache import ingest as run_ingest

    t0 = time.perf_counter()
    with progress_bar("ingest", None) as update:
        state = {"done": 0}

        def progress(done: int, total: int) -> None:
            update(advance=done - state["done"], total=total)
            state["done"] = done

        res = run_ingest(data_dir, out, size=size, crop=crop, force=force, strict=strict,
                         workers=workers, progress=progress)
    dt = time.perf_counter() - t0
    if res.cached:
        typer.echo(f"{res.path}: up to date ({res.n_images} images, {res.n_patients} patients); "
                   "nothing to do (use --force to rebuild)")
    else:
        typer.echo(f"{res.path}: cached {res.n_images} images of {res.n_patients} patients "
                   f"in {dt:.1f} s ({res.n_images / max(dt, 1e-9):.0f} images/s)"
                   + (f", {len(res.skipped)} unreadable skipped" if res.skipped else ""))


# ---- lymph embed (stage one) -----------------------------------------------------------------
def method_help() -> str:
    from lymph.encoder.registry import help_text  # torch-free

    return help_text()


def registry_help(what: str) -> str:
    """Option help from the stage-two registries (torch-free)."""
    if what == "pooling":
        from lymph.head.registry import pooling_help

        return pooling_help()
    from lymph.compare_models import model_names

    opt_in = [n for n in model_names(optional=True) if n not in model_names()]
    return (f"Comma-separated subset of {', '.join(model_names())} (default: all of these); "
            f"opt-in: {', '.join(opt_in)}.")


@app.command()
@handles_errors
def embed(
    out: Annotated[Path, typer.Option("--out", help="Embedding store to write (STORE.h5).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Challenge data to ingest first (reuses a valid cache).")] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image cache made by `lymph ingest` (CACHE.zarr).")] = None,
    method: Annotated[str, typer.Option(help=method_help())] = "ae",
    dim: Annotated[Optional[int], typer.Option(help="Embedding size (default: the method's; ae 60 as in the report, contrastive 128).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default 20; contrastive 15).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size (default 128; contrastive 256); under torchrun the global batch, split among the processes.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate (default 1e-3).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; fixes every result on the CPU.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    encoder: Annotated[Optional[Path], typer.Option(help="Trained checkpoint: embed only, with its preprocessing.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted training from its last epoch checkpoint.")] = False,
    size: Annotated[Optional[int], typer.Option(help="Image side when ingesting --data (default: the method's, 112 for ae; with --encoder: the encoder's).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Where --data is ingested (default: beside the store).")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Centre crop (source pixels) when ingesting --data (default: the method's; weak: 112).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="--method weak: K fold scorers, each labelled patient scored by the one that did not train on it (default 5).")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option("--lr-schedule", help="constant (default) or cosine (the rate decays to 0 over the epochs).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="--method weak: each cell's score is the mean over its 8 rotations / flips (8x the embedding time).")] = False,
    channels: Annotated[Optional[str], typer.Option("--channels", help="--method weak: the cell scorer's convolution widths, comma-separated (default 16,32,64,64; e.g. 32,64,128,128 for twice the width).")] = None,
) -> None:
    """Train the stage-one encoder (unless --encoder) and embed every image into the store.

    Runs under `torchrun --nproc_per_node N` too (DDP; rank 0 writes; see docs/cli.md)."""
    check_options(dim=(dim, "int", 1), epochs=(epochs, "int", 1),
                  batch_size=(batch_size, "int", 1), lr=(lr, "pos"), seed=(seed, "int", 0, 2**31 - 1),
                  size=(size, "int", 8, 1024), crop=(crop, "int", 1), folds=(folds, "int", 2))
    from lymph.checks import check_device
    from lymph.encoder.registry import check_method

    check_device("--device", device)
    if encoder is None:  # with --encoder the checkpoint's method is used
        check_method(method, "--method")
    if lr_schedule is not None and lr_schedule not in ("constant", "cosine"):
        raise LymphError(f"--lr-schedule: expected constant or cosine, got {lr_schedule!r}")
    widths = None
    if channels is not None:
        from lymph.checks import check_channels

        try:
            parsed: tuple[Any, ...] = tuple(int(v) for v in channels.split(","))
        except ValueError:
            parsed = (channels,)
        widths = check_channels("--channels", parsed)
    if out.suffix.lower() in (".h5", ".hdf5"):
        stem = out.with_name(out.stem)
        outs: dict[str, tuple[Any, str]] = {"--out": (out, "store")}
        if encoder is None:
            outs["encoder checkpoint"] = (Path(f"{stem}.encoder.pt"), "checkpoint")
            outs["loss curve"] = (Path(f"{stem}.encoder.loss.png"), "png")
        if data is not None:
            outs["--cache"] = (cache or Path(f"{stem}.images-{size or 112}px.zarr"), "cache")
        check_outputs(outs, [data, images, encoder])
    from lymph.encoder.run import run_embed

    s = run_embed(out=out, data=data, images=images, method=method, dim=dim, epochs=epochs,
                  batch_size=batch_size, lr=lr, seed=seed, device=device, encoder=encoder,
                  resume=resume, size=size, cache=cache, crop=crop, folds=folds,
                  lr_schedule=lr_schedule, tta=tta, channels=widths)
    if not s.is_main:
        return
    if data is not None:
        typer.echo(f"image cache {s.cache}" + (" (up to date, reused)" if s.cache_reused else " (ingested)"))
    if s.trained_epochs or s.losses:
        typer.echo(f"trained {method} for {s.trained_epochs} epoch(s) in {s.train_seconds:.0f} s "
                   f"({s.train_images_per_s:.0f} images/s, {s.world} process(es)); "
                   f"final loss {s.losses[-1]:.5f}")
        typer.echo(f"saved encoder checkpoint to {s.checkpoint}")
        if s.loss_curve:
            typer.echo(f"saved loss curve to {s.loss_curve}")
    elif s.checkpoint is not None:
        typer.echo(f"using encoder {s.checkpoint}")
    for note in s.notes:
        typer.echo(note)
    typer.echo(f"wrote {s.store}: {s.n_images} embeddings of dim {s.dim} for {s.n_patients} patients"
               + (f" (embedding {s.embed_seconds:.1f} s)" if s.embed_seconds else ""))


# ---- lymph store ... (combine and inspect embedding stores) ---------------------------------
store_app = typer.Typer(help="Combine and inspect embedding stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("concat")
@handles_errors
def store_concat(
    stores: Annotated[list[Path], typer.Argument(help="Stores of the same images (2 or more).")],
    out: Annotated[Path, typer.Option("--out", help="Combined store to write (.h5).")],
) -> None:
    """Put the feature blocks of several stores side by side in one store."""
    check_outputs({"--out": (out, "store")}, list(stores))
    from lymph.store import open_store
    from lymph.store_ops import concat_stores

    path = concat_stores(list(stores), out)
    s = open_store(path)
    blocks = ", ".join(f"{src['prefix']} ({src['dim']})" for src in s.provenance["sources"])
    typer.echo(f"wrote {path}: {s.n_images} images of {s.n_patients} patients, "
               f"dim {s.dim} = {blocks}")


@store_app.command("import")
@handles_errors
def store_import(
    sources: Annotated[list[Path], typer.Argument(help="Per-bag .h5/.pt files or folders of them (a 'features' (n, d) array each; the bag id is the file name), or one instance table (.csv, .parquet).")],
    out: Annotated[Path, typer.Option("--out", help="Store to write (.h5).")],
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV with a header: bag id, label (1, 0, -1 or empty = unknown) and any --clinical columns.")] = None,
    id_column: Annotated[str, typer.Option(help="Bag id column (labels CSV and instance table).")] = "id",
    label_column: Annotated[str, typer.Option(help="Label column (labels CSV, or the table's own).")] = "label",
    positive: Annotated[Optional[str], typer.Option(help="The label value meaning 1 (others 0, empty unknown), for labels other than 0/1.")] = None,
    clinical: Annotated[Optional[str], typer.Option(help="Comma-separated numeric columns of the labels CSV to store as clinical features.")] = None,
    features_key: Annotated[str, typer.Option(help="Dataset (.h5) or dict key (.pt) holding the (n, d) features.")] = "features",
) -> None:
    """Write a format-1 store from other tools' features (streamed; see docs/store-format.md)."""
    from lymph.store_import import import_store

    cols = [c.strip() for c in clinical.split(",") if c.strip()] if clinical else []
    r = import_store(list(sources), out, labels=labels, id_column=id_column,
                     label_column=label_column, positive=positive, clinical=cols,
                     features_key=features_key)
    typer.echo(f"wrote {r['path']}: {r['instances']} instances of dim {r['dim']} in {r['bags']} "
               f"bags ({r['labelled']} labelled) from {r['kind']}")


@store_app.command("info")
@handles_errors
def store_info(
    store: Annotated[Path, typer.Argument(help="Embedding store (.h5).")],
) -> None:
    """Print a store's patients, images, dimension, method, columns and provenance."""
    from rich.console import Console
    from rich.table import Table

    from lymph.store_ops import store_summary

    table = Table(title=str(store), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in store_summary(store).items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    Console(width=120).print(table)


# ---- lymph fit-head / predict (stage two) ----------------------------------------------------
@app.command("fit-head")
@handles_errors
def fit_head(
    store: Annotated[Path, typer.Option("--store", help="Embedding store (STORE.h5).")],
    pooling: Annotated[str, typer.Option(help=registry_help("pooling"))] = "attention",
    folds: Annotated[int, typer.Option(help="Stratified patient-level folds.")] = 5,
    repeats: Annotated[int, typer.Option(help="Repeats of the k-fold CV (seed + r each).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of folds, inner splits, weights, batches.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Model directory to write (final model on all labelled patients).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Metrics JSON to write.")] = None,
    oof: Annotated[Optional[Path], typer.Option("--oof", help="Out-of-fold probabilities CSV (default: beside --json; always in MODEL_DIR/cv/).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PR curve PNG (default: beside --json; always in MODEL_DIR/cv/).")] = None,
    no_clinical: Annotated[bool, typer.Option("--no-clinical", help="Images only.")] = False,
    no_images: Annotated[bool, typer.Option("--no-images", help="Clinical-only MLP.")] = False,
    threshold: Annotated[str, typer.Option(help="'inner' (0.5 unless the cut of max balanced accuracy on inner out-of-fold probabilities beats it by 2 standard errors) or a number, e.g. 0.5.")] = "inner",
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping on the inner split).")] = 100,
    patience: Annotated[int, typer.Option(help="Early-stopping patience in epochs.")] = 15,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay (L2).")] = 1e-4,
    dropout: Annotated[float, typer.Option(help="Dropout in the MLP.")] = 0.25,
    batch_size: Annotated[int, typer.Option(help="Patients per step.")] = 32,
    attention_hidden: Annotated[int, typer.Option(help="Attention hidden size.")] = 128,
    threads: Annotated[int, typer.Option(help="Torch threads (1 is fastest for this small head).")] = 1,
    fusion: Annotated[str, typer.Option(help="concat (pooled images + clinical -> MLP), late (pooled image score + clinical -> logistic regression) or composition (per-patient proportions of k-means cell prototypes + clinical -> logistic regression); late and composition ignore the MLP options.")] = "concat",
    members: Annotated[str, typer.Option(help="'auto' (an inner-CV ensemble of 5 heads below 1000 fit patients, else one head) or a number of heads (1 = one head on an inner split).")] = "auto",
    jobs: Annotated[int, typer.Option(help="Folds run in this many processes (same results for a seed; e.g. the number of cores).")] = 1,
    allow_in_sample: Annotated[bool, typer.Option("--allow-in-sample", help="Run on a store whose labelled patients were scored by a label-trained encoder that trained on them (refused otherwise); the metrics JSON is marked IN-SAMPLE.")] = False,
) -> None:
    """Cross-validate a MIL head (pooling + clinical MLP) on a store; save the final model."""
    check_options(folds=(folds, "int", 2), repeats=(repeats, "int", 1), seed=(seed, "int", 0, 2**31 - 1),
                  epochs=(epochs, "int", 1), patience=(patience, "int", 1), lr=(lr, "pos"),
                  weight_decay=(weight_decay, "float", 0.0), dropout=(dropout, "frac"),
                  batch_size=(batch_size, "int", 1), attention_hidden=(attention_hidden, "int", 1),
                  threads=(threads, "int", 1), jobs=(jobs, "int", 1))
    from lymph.checks import check_choice, check_threshold
    from lymph.head.registry import check_pooling, fusion_names  # torch-free

    check_threshold("--threshold", threshold)
    check_choice("--fusion", fusion, fusion_names())
    check_pooling(pooling, "--pooling")
    base = json_out.with_name(json_out.stem) if json_out is not None else None
    check_outputs({"--out": (out, "model"), "--json": (json_out, "json"),
                   "--oof": (oof or (Path(f"{base}.oof.csv") if base else None), "oof"),
                   "--plot": (plot or (Path(f"{base}.pr.png") if base else None), "png")},
                  [store])
    from rich.console import Console
    from rich.table import Table

    from lymph.console import progress_bar
    from lymph.head.fit import fit_head as run_fit_head
    from lymph.head.fit import parse_members

    with progress_bar("fit-head", folds * repeats) as update:
        res = run_fit_head(
            store, pooling=pooling, folds=folds, repeats=repeats, seed=seed, out=out,
            json_path=json_out, oof_path=oof, plot_path=plot, progress=lambda d, t: update(),
            clinical=not no_clinical, images=not no_images, threshold=threshold,
            max_epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay,
            dropout=dropout, batch_size=batch_size, attention_hidden=attention_hidden,
            n_threads=threads, fusion=fusion, members=parse_members(members), n_jobs=jobs,
            allow_in_sample=allow_in_sample)
    r = res.report
    table = Table(title=f"{r['model']}: {folds}-fold x {repeats}, {r['n_patients']} patients, "
                        f"{r['seconds']:.1f} s", min_width=64)
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("std", justify="right")
    for m in ("balanced_accuracy", "accuracy", "f1", "roc_auc", "pr_auc"):
        table.add_row(m, f"{r[m]['mean']:.3f}", f"{r[m]['std']:.3f}")
    Console(width=100).print(table)
    for name, path in res.outputs.items():
        typer.echo(f"wrote {name}: {path}")
    if out is None:
        typer.echo("note: no model saved (cross-validation only); add --out MODEL_DIR to save "
                   "the final model for `lymph predict`")
    if r.get("in_sample"):
        typer.echo(f"warning: {r['in_sample']}", err=True)


@app.command()
@handles_errors
def predict(
    model: Annotated[Path, typer.Option("--model", help="Model directory from `lymph fit-head --out`.")],
    out: Annotated[Path, typer.Option("--out", help="Predictions CSV (id, probability, predicted).")],
    store: Annotated[Optional[Path], typer.Option("--store", help="Embedding store made with the model's encoder.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Challenge root or split folder: embedded with the model's encoder first.")] = None,
    submission: Annotated[Optional[Path], typer.Option("--submission", help="Challenge submission CSV (Id,Predicted).")] = None,
    select: Annotated[str, typer.Option(help="Patients to predict: all, labelled or unlabelled.")] = "all",
    device: Annotated[str, typer.Option(help="Device for embedding --data: auto, cpu or cuda.")] = "auto",
) -> None:
    """Predict patients with a saved model; per-image attention goes to PRED.attention.csv."""
    from lymph.checks import check_choice, check_device

    check_choice("--select", select, ("all", "labelled", "unlabelled"))
    check_device("--device", device)
    if (store is None) == (data is None):
        raise LymphError("predict: expected exactly one of --store and --data")
    stem = out.with_name(out.stem)
    check_outputs({"--out": (out, "predictions"),
                   "attention CSV": (Path(f"{stem}.attention.csv"), "attention"),
                   "embedded store": (Path(f"{stem}.store.h5") if data is not None else None,
                                      "store"),
                   "--submission": (submission, "submission")}, [model, store, data])
    from lymph.head.predict import predict as run_predict

    res = run_predict(model, out, store=store, data=data, submission=submission, select=select,
                      device=device)
    n_pos = int(res.predicted.sum())
    typer.echo(f"predicted {len(res.ids)} patients ({n_pos} malignant at threshold "
               f"{res.threshold:.3f})")
    for name, path in res.outputs.items():
        typer.echo(f"wrote {name}: {path}")
    from lymph.report.insample import in_sample_note, training_ids

    note = in_sample_note([str(i) for i in res.ids], training_ids(model, res.store_path),
                          "prediction")
    if note:
        typer.echo(note)


def print_comparison(res: Any) -> None:
    """The comparison table (best first) and the paired comparison line, on stdout."""
    from rich.console import Console
    from rich.table import Table

    folds, repeats = res.n_folds, res.repeats
    table = Table(title=f"{folds}-fold x {repeats}, {res.n_patients} patients, same folds for "
                        f"all; {res.seconds:.1f} s")
    table.add_column("model")
    table.add_column("inputs")
    for m in ("balanced accuracy", "F1", "ROC AUC", "PR AUC"):
        table.add_column(m, justify="right")
    table.add_column("s", justify="right")
    for m in res.ranked():
        s = m.summary
        table.add_row(m.name, m.spec.inputs,
                      *(f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}"
                        for k in ("balanced_accuracy", "f1", "roc_auc", "pr_auc")),
                      f"{m.cv.seconds:.1f}")
    Console(width=130).print(table)
    if res.paired:
        p = res.paired[0]
        b, r = p["balanced_accuracy"], p["roc_auc"]
        typer.echo(f"paired: {p['model']} - {p['baseline']}: balanced accuracy "
                   f"{b['mean_difference']:+.3f} (won/tied/lost {b['won']}/{b['tied']}/{b['lost']}), "
                   f"ROC AUC {r['mean_difference']:+.3f} ({r['won']}/{r['tied']}/{r['lost']})")


# ---- lymph compare-baselines / explain (the run report) ---------------------------------------
@app.command("compare-baselines")
@handles_errors
def compare_baselines(
    store: Annotated[Path, typer.Option("--store", help="Embedding store (STORE.h5).")],
    folds: Annotated[int, typer.Option(help="Stratified patient-level folds.")] = 5,
    repeats: Annotated[int, typer.Option(help="Repeats of the k-fold CV (seed + r each).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the folds and of every model.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder: report.md, ROC/PR PNGs, montages, oof.csv, comparison.json.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="JSON list of rows (model + the keys of fit-head --json).")] = None,
    models: Annotated[Optional[str], typer.Option(help=registry_help("models"))] = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image cache for the montages (default: the image files named in the store).")] = None,
    montages: Annotated[bool, typer.Option(help="Montages of the misclassified patients in the report.")] = True,
    folds_from_store: Annotated[bool, typer.Option("--folds-from-store", help="Use stage one's folds recorded in a weak store (one repeat; --folds/--repeats ignored), to measure stacking optimism.")] = False,
    target_sensitivity: Annotated[float, typer.Option("--target-sensitivity", help="The report's triage operating point: sensitivity for malignancy the threshold must reach, chosen inside each training fold.")] = 0.95,
    chosen: Annotated[Optional[str], typer.Option("--chosen", help="The report's chosen model (default: the best images + clinical model by balanced accuracy).")] = None,
    jobs: Annotated[int, typer.Option(help="Folds of each model run in this many processes (same results for a seed).")] = 1,
    allow_in_sample: Annotated[bool, typer.Option("--allow-in-sample", help="Run on a store whose labelled patients were scored by a label-trained encoder that trained on them (refused otherwise); every output is marked IN-SAMPLE.")] = False,
    nested: Annotated[bool, typer.Option("--nested", help="Weak stores: retrain stage one inside every outer fold on its training patients only (needs --images: the cache the store was made from; one stage-one run per fold). Writes --json only.")] = False,
    inner_folds: Annotated[int, typer.Option("--inner-folds", help="With --nested: stage one's own folds inside each outer training set.")] = 5,
    test_scoring: Annotated[str, typer.Option("--test-scoring", help="With --nested: how outer test patients are scored, final (the scorer trained on all training patients, as `predict` does) and/or fold-mean (mean of the inner fold scorers), comma-separated; fold-mean results are named MODEL@fold-mean.")] = "final",
    from_repeat: Annotated[int, typer.Option("--from-repeat", help="With --nested: run only repeats R..repeats-1 (the same folds and stage-one seeds as the whole run), to split a long run; merge the JSON rows with benchmarks/merge_comparisons.py.")] = 0,
    with_store: Annotated[Optional[list[Path]], typer.Option("--with-store", metavar="<path>", help="With --nested: a store of the same images made without labels (e.g. morphometry; repeatable); its features join each outer fold's weak block, as `lymph store concat` would (for multi-score+clinical).")] = None,
) -> None:
    """Cross-validate the clinical, MIL, mixture-of-experts and late-fusion models on the same folds."""
    check_options(folds=(folds, "int", 2), repeats=(repeats, "int", 1), seed=(seed, "int", 0, 2**31 - 1),
                  jobs=(jobs, "int", 1), inner_folds=(inner_folds, "int", 2))
    if with_store and not nested:
        raise LymphError("--with-store: only with --nested (otherwise join the stores with "
                         "`lymph store concat`)")
    if from_repeat and not nested:
        raise LymphError("--from-repeat: only with --nested")
    check_options(from_repeat=(from_repeat, "int", 0, repeats - 1))
    if nested:
        from lymph.nested import parse_test_scoring

        scorings = parse_test_scoring(test_scoring)
        if images is None:
            raise LymphError("--nested: expected --images CACHE (the image cache the weak store "
                             "was made from)")
        if out is not None or folds_from_store or allow_in_sample:
            raise LymphError("--nested: writes --json only; drop --out, --folds-from-store and "
                             "--allow-in-sample")
        check_outputs({"--json": (json_out, "json")}, [store, images, *(with_store or [])])
        from lymph.console import progress_bar
        from lymph.nested import run_nested

        with progress_bar("compare-baselines --nested", folds * (repeats - from_repeat)) as update:
            res, outputs = run_nested(store, images, folds=folds, repeats=repeats, seed=seed,
                                      inner_folds=inner_folds, models=models, json_path=json_out,
                                      test_scoring=scorings, with_stores=with_store or (),
                                      from_repeat=from_repeat,
                                      progress=lambda n, d, t: update())
        print_comparison(res)
        for note in res.notes:
            typer.echo(f"note: {note}")
        for name, path in outputs.items():
            typer.echo(f"wrote {name}: {path}")
        return
    from lymph.report.triage import check_target

    check_target(target_sensitivity)
    from lymph.compare_models import model_names  # torch-free

    known = model_names(optional=True)
    unknown = [n.strip() for n in (models or "").split(",") if n.strip() not in ("", *known)]
    if unknown:  # before torch: the same message as lymph.compare.select_models
        raise LymphError(f"--models: unknown model(s) {', '.join(unknown)}; expected names from "
                         f"{', '.join(known)}")
    check_outputs({"--out": (out, "report"), "--json": (json_out, "json")}, [store, images])
    from lymph.compare import run_compare
    from lymph.console import progress_bar

    n_models = len(models.split(",")) if models else len(model_names())
    with progress_bar("compare-baselines", n_models * folds * repeats) as update:
        res, outputs = run_compare(store, folds=folds, repeats=repeats, seed=seed, out=out,
                                   json_path=json_out, models=models, images=images,
                                   montages=montages, progress=lambda n, d, t: update(),
                                   folds_from_store=folds_from_store, chosen=chosen,
                                   target_sensitivity=target_sensitivity, n_jobs=jobs,
                                   allow_in_sample=allow_in_sample)
    print_comparison(res)
    if res.store_info.get("in_sample"):
        typer.echo(f"warning: {res.store_info['in_sample']}", err=True)
    if "report_json" in outputs:
        from lymph.report.clinical_md import terminal_summary

        for line in terminal_summary(outputs["report_json"]):
            typer.echo(line)
    for note in res.notes:
        typer.echo(f"note: {note}")
    for name, path in outputs.items():
        typer.echo(f"wrote {name}: {path}")


@app.command()
@handles_errors
def explain(
    patient: Annotated[str, typer.Argument(help="Patient id, e.g. P26.")],
    model: Annotated[Path, typer.Option("--model", help="Model directory from `lymph fit-head --out`.")],
    store: Annotated[Optional[Path], typer.Option("--store", help="Embedding store holding the patient.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Challenge data: embedded the model's way first.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG to write (default ./PATIENT.explain.png).")] = None,
    k: Annotated[int, typer.Option("--k", help="Cells shown at each end (top k and bottom k).")] = 8,
    images: Annotated[Optional[Path], typer.Option("--images", help="Image cache for the pixels (default: the image files named in the store).")] = None,
) -> None:
    """Montage of a patient's cells ordered by attention weight, with the prediction."""
    check_options(k=(k, "int", 1))
    from lymph.data.challenge import check_patient_id

    check_patient_id(patient, "PATIENT")
    if (store is None) == (data is None):
        raise LymphError("explain: expected exactly one of --store and --data")
    check_outputs({"--out": (out or Path(f"{patient}.explain.png"), "png")},
                  [model, store, data, images])
    from lymph.report.explain import explain as run_explain

    e = run_explain(patient, model, store=store, data=data, out=out, k=k, cache=images)
    typer.echo(f"{e.patient}: P(malignant) {e.probability:.3f}, threshold {e.threshold:.3f} -> "
               f"{'malignant' if e.predicted else 'reactive'}; {e.clinical}")
    for j in e.top:
        dev = ", ".join(f"{c} {z:+.1f}" for c, z in e.deviations.get(j, []))
        typer.echo(f"  cell #{j}: {e.weight_name}={e.weights[j]:.4g}" + (f"; deviates: {dev}" if dev else ""))
    typer.echo(f"wrote {e.out}")
    from lymph.report.insample import in_sample_note, training_ids

    note = in_sample_note([e.patient], training_ids(model, store), "explanation")
    if note:
        typer.echo(note)


# ---- lymph run / ls / demo / bench (pipelines and measurements) -------------------------------
def _print_run(res: Any, artifacts: Path) -> None:
    if res.head_report is not None:
        r = res.head_report
        typer.echo(f"fit-head {r.get('model')}: balanced accuracy "
                   f"{r['balanced_accuracy']['mean']:.3f} ± {r['balanced_accuracy']['std']:.3f}, "
                   f"ROC AUC {r['roc_auc']['mean']:.3f} ± {r['roc_auc']['std']:.3f}")
    if res.comparison is not None:
        print_comparison(res.comparison)
    for st in res.stages:
        if st.name == "compare" and "report" in st.outputs:
            from lymph.report.clinical_md import terminal_summary

            for line in terminal_summary(Path(st.outputs["report"]).with_name("report.json")):
                typer.echo(line)
        if st.name == "compare":
            for key in ("report", "html", "predictions", "submission"):
                if key in st.outputs:
                    typer.echo(f"{key}: {st.outputs[key]}")
    typer.echo(f"resolved configuration saved with every stage (stage.json) under {artifacts}")


def _stage_line(st: Any) -> None:
    what = "cached" if st.cached else f"ran in {st.seconds:.1f} s"
    typer.echo(f"[{st.name}] {what}: {st.folder}", err=True)


#: what each stage does, said when it starts (a long stage is never silent)
_STAGE_WHAT = {"data": "making the synthetic data", "ingest": "decoding every image into the cache",
               "embed": "stage one, features of every cell image (the longest stage)",
               "head": "stage two, cross-validating the head and fitting the final model",
               "compare": "every model on the same folds, the report, the unlabelled patients"}


def _stage_start(name: str, settings: dict[str, Any]) -> None:
    extra = f", method {settings['method']}" if name == "embed" and "method" in settings else ""
    typer.echo(f"[{name}] running: {_STAGE_WHAT.get(name, name)}{extra} ...", err=True)


@app.command()
@handles_errors
def run(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline file (pipelines/*.toml).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Challenge root or split folder (overrides data.path).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: section.key=value (repeatable).")] = None,
    artifacts: Annotated[Path, typer.Option(help="Where stage outputs are cached.")] = Path("artifacts"),
    target_sensitivity: Annotated[Optional[float], typer.Option("--target-sensitivity", help="The report's triage operating point (default: compare.target_sensitivity, 0.95).")] = None,
) -> None:
    """Run ingest, embed, fit-head, compare-baselines and the report; reuse cached stages.

    On challenge data the unlabelled (test) patients are predicted with the pipeline's model:
    predictions.csv and the submission (Id,Predicted) in the compare stage's folder."""
    check_outputs({"--artifacts": (artifacts, "artifacts")})
    from lymph.pipeline.run import run_pipeline

    res = run_pipeline(pipeline, sets=set_ or [], data=data, artifacts=artifacts,
                       on_stage=_stage_line, on_start=_stage_start,
                       target_sensitivity=target_sensitivity)
    _print_run(res, artifacts)


@app.command("ls")
@handles_errors
def ls(
    artifacts: Annotated[Path, typer.Option(help="Artifacts folder.")] = Path("artifacts"),
) -> None:
    """List the cached stage outputs with their sizes and settings."""
    from rich.console import Console
    from rich.table import Table

    from lymph.pipeline.listing import ls_rows

    table = Table(title=f"cached stages in {artifacts}")
    for c in ("stage", "fingerprint", "size", "seconds", "data", "settings"):
        table.add_column(c, overflow="fold")
    for r in ls_rows(artifacts):
        table.add_row(r["stage"], r["fingerprint"], f"{r['bytes'] / 1e6:.1f} MB",
                      f"{r['seconds']}", r["data"], r["settings_text"])
    Console(width=160).print(table)


@app.command()
@handles_errors
def demo(
    artifacts: Annotated[Path, typer.Option(help="Where the demo's stage outputs go.")] = Path("artifacts"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: section.key=value.")] = None,
) -> None:
    """Make a small synthetic dataset and run the demo pipeline on it (about half a minute on two CPU cores)."""
    check_outputs({"--artifacts": (artifacts, "artifacts")})
    from lymph.pipeline.config import DEMO
    from lymph.pipeline.run import run_pipeline

    typer.echo("lymph demo: synthetic data -> ingest -> autoencoder -> fit-head -> compare-baselines",
               err=True)
    res = run_pipeline(DEMO, sets=set_ or [], artifacts=artifacts, on_stage=_stage_line,
                       on_start=_stage_start)
    _print_run(res, artifacts)


@app.command()
@handles_errors
def bench(
    data: Annotated[Optional[Path], typer.Option("--data", help="Challenge data (default: a synthetic set).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON.")] = None,
    device: Annotated[str, typer.Option(help="Device for stage one: auto, cpu or cuda.")] = "auto",
    quick: Annotated[bool, typer.Option(help="Fewer repeats and steps (a rough figure in about a minute).")] = False,
) -> None:
    """Measure this machine's ceilings and the tool's rates, each with its ratio."""
    check_outputs({"--json": (json_out, "json")}, [data])
    from rich.console import Console
    from rich.table import Table

    from lymph.bench import run_bench

    import time

    t0 = time.perf_counter()
    res = run_bench(data=data, device=device, quick=quick, on_step=lambda what: typer.echo(
        f"[bench {time.perf_counter() - t0:5.0f} s] {what} ...", err=True))
    table = Table(title="lymph bench: rates and their ceilings, measured in one run")
    for c in ("figure", "value", "ceiling", "ratio", "target"):
        table.add_column(c, justify="right" if c != "figure" else "left")
    for row in res["rows"]:
        table.add_row(row["figure"], row["value"], row.get("ceiling", ""), row.get("ratio", ""),
                      row.get("target", ""))
    Console(width=130).print(table)
    if json_out is not None:
        write_json(json_out, res)
        typer.echo(f"wrote {json_out}")


def main() -> None:  # pragma: no cover
    # numpy asks the kernel for transparent huge pages for its large arrays; where the kernel
    # then compacts memory on each such fault (THP defrag "madvise", common), the stage-two
    # fits' large temporaries cost 2-3 s of system time per fold at cohort scale (issue 17,
    # docs/benchmarks.md). Read by numpy at import, before any command imports it; results
    # do not depend on it, and a user's own setting wins.
    v = os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    if not v.strip().isdigit():  # numpy's own error would be a bare int() ValueError
        typer.echo(f"error: environment variable NUMPY_MADVISE_HUGEPAGE: expected 0 or 1, got "
                   f"{v!r}", err=True)
        raise SystemExit(1)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
