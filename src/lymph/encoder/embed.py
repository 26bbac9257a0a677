"""The embedding pass: every cached image through a trained encoder, into the store.

Eval mode, no augmentation, fp32 (TF32 off on CUDA: :func:`exact_fp32`), in cache order. Under torchrun each rank embeds its
round-robin share of the cache's blocks, the blocks are gathered on rank 0 and put back
in order, and rank 0 writes the store (so the store is the same as a single process's).

Public API (``lymph embed`` itself, ``run_embed``, and ``embed_dataset`` for
``predict --data``: :mod:`lymph.encoder.run`)::

    embed_cache(cache, encoder, out, device="auto") -> Path
    load_encoder(path, device) -> (checkpoint, method, model)
    compute_features(model, method, cache, prep, env) -> (n_images, D)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lymph
from lymph.atomic import sha256_file
from lymph.data.cache import ImageCache
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint
from lymph.encoder.preprocess import Preprocess
from lymph.encoder.registry import get_method, method_spec
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
    encoder was trained with (:func:`lymph.encoder.run.embed_dataset` ingests accordingly).
    """
    out = Path(out)
    encoder = Path(encoder)
    own_env = env is None
    env = env or D.setup(device)
    try:
        ck, method, model = load_encoder(encoder, env.device, env)
        spec = method_spec(str(ck["method"]))
        want = ck["cache"]
        if cache.size != want["size"] or cache.crop != want.get("crop"):
            raise LymphError(
                f"{cache.path}: images are {cache.size} px (crop {cache.crop}), the encoder "
                f"{encoder} was trained on {want['size']} px (crop {want.get('crop')}); "
                f"re-ingest with `size` {want['size']}"
                + (f" `crop` {want['crop']}" if want.get("crop") else "")
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
            }, feature_columns=None if spec.feature_columns is None else list(spec.feature_columns),
                # a label-trained scorer (weak): every patient scored by this one model
                patient_scorer=(np.full(cache.n_patients, -1, dtype=np.int16)
                                if spec.needs_labels else None))
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
