"""The embedding pass: every cached image through a trained encoder, into the store.

Eval mode, no augmentation, fp32 (TF32 off on CUDA: :func:`exact_fp32`), in cache order. Under torchrun each rank embeds its
round-robin share of the cache's blocks, the blocks are gathered on rank 0 and put back
in order, and rank 0 writes the store (so the store is the same as a single process's).

Public API (the stage-two ``predict --data`` uses :func:`embed_dataset`)::

    embed_cache(cache, encoder, out, device="auto") -> Path
    embed_dataset(data_dir, encoder, out, *, work_dir=None, device="auto") -> Path
    run_embed(...)  # what `lymph embed` does: ingest, train or load, embed
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lymph
from lymph.atomic import sha256_file
from lymph.data.cache import ImageCache, ingest, open_cache
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint
from lymph.encoder.combine import is_combination
from lymph.encoder.methods import Preprocess, get_method
from lymph.errors import LymphError

log = logging.getLogger("lymph")

# Images per forward pass. The batches are aligned on the global image index (a block
# starts at a multiple of it), so a sharded run forwards exactly the same batches as a
# single process and gives the same values. 64 is as fast as 256 on a CPU.
EMBED_BATCH = 64


def checkpoint_path(out: str | Path) -> Path:
    """Where `lymph embed --out STORE.h5` keeps its encoder: ``STORE.encoder.pt``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.encoder.pt")


def loss_curve_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.encoder.loss.png")


def default_cache_path(out: str | Path, size: int, work_dir: str | Path | None = None) -> Path:
    """``<work_dir or out's folder>/<out stem>.images-<size>px.zarr``."""
    out = Path(out)
    return Path(work_dir or out.parent) / f"{out.stem}.images-{size}px.zarr"


# ---- features ----------------------------------------------------------------------------
@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """fp32 convolutions and matmuls in full precision on CUDA: Ampere and later GPUs run
    them in TF32 (10-bit mantissa) by default for convolutions. Restored on exit."""
    if device.type != "cuda":
        yield
        return
    conv, mm = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(conv, "conv", None), "fp32_precision"):  # torch >= 2.9
        saved = (conv.conv.fp32_precision, mm.fp32_precision)
        conv.conv.fp32_precision, mm.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.conv.fp32_precision, mm.fp32_precision = saved
        return
    saved = (conv.allow_tf32, mm.allow_tf32)  # pragma: no cover (older torch)
    conv.allow_tf32 = mm.allow_tf32 = False
    try:
        yield
    finally:
        conv.allow_tf32, mm.allow_tf32 = saved


def compute_features(model: torch.nn.Module, method: Any, cache: ImageCache, prep: Preprocess,
                     env: D.DistEnv, *, batch_size: int = EMBED_BATCH,
                     progress: bool = True) -> np.ndarray | None:
    """``(n_images, D)`` float32 on rank 0 (``None`` elsewhere), in cache order."""
    from lymph.console import progress_bar

    chunk = int(cache.pixels.chunks[0])
    batch_size = math.gcd(batch_size, chunk)  # batches never straddle a block boundary
    bl = D.blocks(cache.n_images, env.world, chunk, align=batch_size)
    mine = D.shard(list(enumerate(bl)), env)
    local: list[tuple[int, np.ndarray]] = []
    model.eval()
    with torch.no_grad(), exact_fp32(env.device), progress_bar("embed", sum(b - a for _, (a, b) in mine),
                                       enabled=progress and env.is_main) as update:
        for i, (a, b) in mine:
            px = cache.read(a, b)
            outs = []
            for s in range(0, len(px), batch_size):
                x = torch.from_numpy(px[s : s + batch_size]).to(env.device, non_blocking=True)
                outs.append(method.features(model, prep(x)).float().cpu().numpy())
                update(advance=len(x))
            local.append((i, np.concatenate(outs).astype(np.float32)))
    return D.gather_blocks(env, local)


def load_encoder(encoder: str | Path, device: torch.device,
                 env: D.DistEnv | None = None) -> tuple[dict[str, Any], Any, torch.nn.Module]:
    """(checkpoint, method, model in eval mode on ``device``) from a checkpoint file.

    Under torchrun (``env``) rank 0 reads the file and sends the checkpoint, less the
    optimiser state, to the other ranks, which never read it (their view of the file may
    differ: a run resumed, a folder that is not shared)."""
    if env is not None and env.distributed:
        ck = D.main_decides(env, lambda: {k: v for k, v in load_checkpoint(encoder).items()
                                          if k != "optimizer"})
    else:
        ck = load_checkpoint(encoder)
    method = get_method(ck["method"])
    mcfg = method.config_cls.from_dict(ck["model_config"])
    model = method.build(mcfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise LymphError(f"{encoder}: weights do not fit the {ck['method']} model in it ({str(e)[:200]})") from None
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    return ck, method, model


def embed_cache(cache: ImageCache, encoder: str | Path, out: str | Path, device: str = "auto", *,
                env: D.DistEnv | None = None, progress: bool = True) -> Path:
    """Embed every image of ``cache`` with the checkpoint ``encoder``; write the store ``out``.

    Uses the checkpoint's normalisation; the cache must have the image size and crop the
    encoder was trained with (:func:`embed_dataset` ingests accordingly).
    """
    out = Path(out)
    encoder = Path(encoder)
    own_env = env is None
    env = env or D.setup(device)
    try:
        ck, method, model = load_encoder(encoder, env.device, env)
        want = ck["cache"]
        if cache.size != want["size"] or cache.crop != want.get("crop"):
            raise LymphError(
                f"{cache.path}: images are {cache.size} px (crop {cache.crop}), the encoder "
                f"{encoder} was trained on {want['size']} px (crop {want.get('crop')}); "
                f"re-ingest with --size {want['size']}"
                + (f" --crop {want['crop']}" if want.get("crop") else "")
            )
        norm = ck["normalisation"]
        prep = Preprocess(norm["mean"], norm["std"], env.device, channels_last=True)
        feats = compute_features(model, method, cache, prep, env, progress=progress)
        if env.is_main:
            assert feats is not None
            write_embedding_store(cache, feats, out, {
                "method": ck["method"],
                "encoder_checkpoint": str(encoder.resolve()),
                "encoder_sha256": sha256_file(encoder),
                "encoder_data_fingerprint": ck["data_fingerprint"],
                "config": {k: ck.get(k) for k in ("model_config", "train_config",
                                                  "normalisation", "cache", "precision")},
                "dim": int(feats.shape[1]),
                "epochs": int(ck.get("epoch", 0)),
                "final_loss": float(ck["losses"][-1]) if ck.get("losses") else None,
                **training_processes(ck),
            }, feature_columns=_columns(method),
                # a label-trained scorer (weak): every patient scored by this one model
                patient_scorer=(np.full(cache.n_patients, -1, dtype=np.int16)
                                if getattr(method, "needs_labels", False) else None))
        D.barrier(env)
        return out
    finally:
        if own_env:
            D.teardown(env)


def training_processes(ck: dict[str, Any]) -> dict[str, Any]:
    """Provenance ``world_size`` (processes that trained the encoder) and
    ``steps_per_epoch`` (its optimiser steps per epoch; the same for any number of
    processes): ``None`` for checkpoints written before lymph recorded them."""
    return {"world_size": ck.get("world_size"), "steps_per_epoch": ck.get("steps_per_epoch")}


def _columns(method: Any) -> list[str] | None:
    """The method's feature column names, when it declares fixed ones (``weak``)."""
    cols = getattr(method, "feature_columns", None)
    return None if cols is None else list(cols)


def write_embedding_store(cache: ImageCache, feats: np.ndarray, out: Path,
                          provenance: dict[str, Any], *,
                          feature_columns: list[str] | None = None,
                          patient_scorer: np.ndarray | None = None) -> Path:
    """The store of ``feats`` (one row per cached image) with the cache's patient table."""
    from lymph.store import write_store

    clin, cols = cache.clinical()
    prov = {"data_fingerprint": cache.fingerprint, "lymph_version": lymph.__version__, **provenance}
    return write_store(
        out, embeddings=feats, patient_ptr=cache.patient_ptr, ids=cache.ids,
        labels=cache.labels, clinical=clin, clinical_columns=cols, image_paths=cache.paths,
        provenance=prov, feature_columns=feature_columns, patient_scorer=patient_scorer,
    )


def embed_dataset(data_dir: str | Path, encoder: str | Path, out: str | Path, *,
                  work_dir: str | Path | None = None, device: str = "auto") -> Path:
    """Ingest ``data_dir`` the way ``encoder`` was trained (image size, crop) into
    ``work_dir`` (default: beside ``out``), then embed it into the store ``out``."""
    ck = load_checkpoint(encoder)
    if is_combination(str(ck["method"])):  # `--method A+B`: one cache and store per part
        from lymph.encoder.combine import embed_combined_dataset

        return embed_combined_dataset(data_dir, encoder, out, work_dir=work_dir, device=device)
    size, crop = int(ck["cache"]["size"]), ck["cache"].get("crop")
    cache_path = default_cache_path(out, size, work_dir)
    ingest(data_dir, cache_path, size=size, crop=crop)
    return embed_cache(open_cache(cache_path), encoder, out, device)


# ---- `lymph embed` -----------------------------------------------------------------------
@dataclass
class EmbedSummary:
    store: Path | None
    is_main: bool
    n_images: int = 0
    n_patients: int = 0
    dim: int = 0
    cache: Path | None = None
    cache_reused: bool = False
    checkpoint: Path | None = None
    loss_curve: Path | None = None
    trained_epochs: int = 0
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images_per_s: float = 0.0
    embed_seconds: float = 0.0
    world: int = 1
    notes: list[str] = field(default_factory=list)  # method-specific lines for the CLI


def run_embed(
    *,
    out: str | Path,
    data: str | Path | None = None,
    images: str | Path | None = None,
    method: str = "ae",
    dim: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    encoder: str | Path | None = None,
    resume: bool = False,
    size: int | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    crop: int | None = None,
    folds: int | None = None,
) -> EmbedSummary:
    """What ``lymph embed`` does: get the cache (ingesting ``data`` if given), train the
    encoder unless ``encoder`` is given, then embed every image into the store ``out``.

    ``size`` / ``crop`` (ingesting ``data``) default to the method's ``default_size`` /
    ``default_crop`` (112 px, whole image, when it declares none). Label-trained methods
    (``weak``) train ``folds`` fold scorers and a final one (:mod:`lymph.encoder.weak`)."""
    out = Path(out)
    # under torchrun every check below runs inside the process group, so that an error
    # that every rank meets is printed once (D.fail) and one that a single rank meets (a
    # file it cannot read) stops the others
    env = D.setup(device)
    try:
        return _run_embed(env, out=out, data=data, images=images, method=method, dim=dim,
                          epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          device=device, encoder=encoder, resume=resume, size=size,
                          cache=cache, progress=progress, crop=crop, folds=folds)
    except BaseException as e:  # tell the other ranks (or stop quietly if one failed first)
        err = D.fail(env, e)
        if err is e:
            raise
        raise err from None
    finally:
        D.teardown(env)


def _encoder_settings(encoder: str | Path) -> dict[str, Any]:
    """What run_embed needs from an ``--encoder`` checkpoint before embedding with it."""
    ck = load_checkpoint(encoder)
    return {"method": str(ck["method"]), "size": int(ck["cache"]["size"]),
            "crop": ck["cache"].get("crop")}


def _run_embed(env: D.DistEnv, *, out: Path, data: str | Path | None, images: str | Path | None,
               method: str, dim: int | None, epochs: int | None, batch_size: int | None,
               lr: float | None, seed: int, device: str, encoder: str | Path | None,
               resume: bool, size: int | None, cache: str | Path | None, progress: bool,
               crop: int | None, folds: int | None) -> EmbedSummary:
    from lymph.encoder.train import TrainConfig, train

    if (data is None) == (images is None):
        raise LymphError("give exactly one of --data DATA_DIR or --images CACHE.zarr")
    if cache is not None and data is None:
        raise LymphError("--cache says where --data is ingested; with --images the cache is given")
    if encoder is not None and resume:
        raise LymphError("--resume continues a training; with --encoder nothing is trained")
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise LymphError(f"--out {out}: expected an HDF5 store path ending in .h5")
    # rank 0 reads the checkpoint (the other ranks get its settings, and later its weights)
    enc = D.main_decides(env, lambda: _encoder_settings(encoder)) if encoder is not None else None
    if is_combination(method) or (enc is not None and is_combination(enc["method"])):
        if folds is not None:
            raise LymphError(f"--folds: only for --method weak, not a combination ({method})")
        from lymph.encoder.combine import run_combination

        return run_combination(out=out, data=data, images=images, method=method,
                               encoder=encoder, device=device, size=size, crop=crop,
                               cache=cache, progress=progress, dim=dim, epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, resume=resume)
    if method == "morphometry":
        if encoder is not None:
            raise LymphError("--method morphometry computes features without an encoder; drop --encoder")
    m_obj = None if method == "morphometry" else get_method(method)  # unknown names fail early
    label_trained = bool(getattr(m_obj, "needs_labels", False))
    if folds is not None and not label_trained:
        raise LymphError(f"--folds: only for methods trained from labels (--method weak), "
                         f"not --method {method}")
    if label_trained and folds is None:
        folds = 5
    summary = EmbedSummary(store=None, is_main=env.is_main, world=env.world)
    if enc is not None:
        size, crop = enc["size"], enc["crop"]
    else:
        size = size or int(getattr(m_obj, "default_size", 112))
        crop = crop if crop is not None else getattr(m_obj, "default_crop", None)
    if data is not None:
        cache_path = Path(cache) if cache else default_cache_path(out, size)
        # rank 0 ingests, the others then read the cache: they must see its folder (on
        # several machines, a shared filesystem; refused otherwise). They wait for it
        # without a collective timeout (D.main_does)
        D.check_shared_folder(env, cache_path.parent, "folder of the image cache (--cache)")
        reused = D.main_does(env, f"ingest:{cache_path}", lambda: _ingest_with_progress(
            data, cache_path, size, crop, progress))  # type: ignore[arg-type]
        summary.cache, summary.cache_reused = cache_path, reused
    else:
        cache_path = Path(images)  # type: ignore[arg-type]
        summary.cache, summary.cache_reused = cache_path, True
    c = open_cache(cache_path)
    D.check_same_cache(env, cache_path, c.fingerprint)
    summary.n_images, summary.n_patients = c.n_images, c.n_patients
    if method == "morphometry":
        summary.dim = _morphometry(c, out, env)
        summary.store = out
        return summary
    if encoder is None and label_trained:
        return _weak(c, out, folds or 5, seed, epochs, batch_size, lr, resume, env,
                     progress, summary)
    if encoder is None:
        m = get_method(method)
        # dim None: the method's default; a method may declare its own TrainConfig
        # defaults (``train_defaults``: (field, value) pairs; the arguments override)
        mcfg = m.config_cls(size=c.size, **({} if dim is None else {"dim": dim}))
        tcfg = TrainConfig(seed=seed, **dict(getattr(m, "train_defaults", ())))
        if epochs is not None:
            tcfg.epochs = epochs
        if batch_size is not None:
            tcfg.batch_size = batch_size
        if lr is not None:
            tcfg.lr = lr
        ckp = checkpoint_path(out)
        res = train(c, ckp, method=method, model_config=mcfg, config=tcfg, resume=resume,
                    env=env, progress=progress, loss_curve=loss_curve_path(out))
        encoder = ckp
        summary.checkpoint, summary.loss_curve = ckp, res.loss_curve
        summary.trained_epochs, summary.losses = res.epochs_run, res.losses
        summary.train_seconds, summary.train_images_per_s = res.seconds, res.images_per_s
    else:
        summary.checkpoint = Path(encoder)
    t0 = time.perf_counter()
    embed_cache(c, encoder, out, env=env, progress=progress)
    summary.embed_seconds = time.perf_counter() - t0
    summary.store = out
    if env.is_main:
        from lymph.store import open_store

        summary.dim = open_store(out).dim
    return summary


def _weak(c: ImageCache, out: Path, folds: int, seed: int, epochs: int | None,
          batch_size: int | None, lr: float | None, resume: bool, env: D.DistEnv,
          progress: bool, summary: EmbedSummary) -> EmbedSummary:
    """``--method weak``: K fold scorers + the final scorer, fold-safe store."""
    from lymph.encoder.weak import default_train_config, run_weak

    tcfg = default_train_config(seed)
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if v is not None:
            setattr(tcfg, k, v)
    w = run_weak(c, out, folds=folds, seed=seed, config=tcfg, env=env, resume=resume,
                 progress=progress)
    final = w.losses.get("final", [])
    summary.checkpoint, summary.losses, summary.trained_epochs = w.final_checkpoint, final, tcfg.epochs
    summary.train_seconds, summary.train_images_per_s = w.train_seconds, w.images_per_s
    summary.embed_seconds, summary.store = w.embed_seconds, out
    summary.dim = 2
    summary.notes = [f"{folds} fold scorers + the final scorer ({summary.train_seconds:.0f} s "
                     f"of training in all); fold checkpoints: "
                     + ", ".join(str(p) for p in w.fold_checkpoints)]
    if w.oof and w.oof.get("auc_mean_prob") is not None:
        summary.notes.append(
            f"out-of-fold patient ROC AUC of the mean cell probability "
            f"{w.oof['auc_mean_prob']:.3f} (mean cell logit {w.oof['auc_mean_logit']:.3f})")
    return summary


def _ingest_with_progress(data: str | Path, cache_path: Path, size: int, crop: int | None,
                          progress: bool) -> bool:
    from lymph.console import progress_bar

    with progress_bar("ingest", None, enabled=progress) as update:
        state = {"done": 0}

        def step(done: int, total: int) -> None:
            update(advance=done - state["done"], total=total)
            state["done"] = done

        return ingest(data, cache_path, size=size, crop=crop, progress=step).cached


def _morphometry(cache: ImageCache, out: Path, env: D.DistEnv) -> int:
    """``--method morphometry``: hand-crafted features, no training (rank 0 only)."""
    try:
        from lymph.encoder.morphometry import write_morphometry_store
    except ModuleNotFoundError as e:
        if e.name != "lymph.encoder.morphometry":
            raise
        raise LymphError(
            "--method morphometry: not available in this installation "
            "(module lymph.encoder.morphometry is missing); use --method ae"
        ) from None
    def work() -> int:
        from lymph.store import open_store

        write_morphometry_store(cache, out)
        return open_store(out).dim

    # rank 0 alone (however long a large cohort takes); the others wait without a timeout
    return int(D.main_does(env, f"morphometry:{out}", work))
