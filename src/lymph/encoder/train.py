"""The stage-one training loop, for any trainable method of the registry.

Data (:mod:`lymph.encoder.feed`): the uint8 image cache (held in RAM when it fits,
:func:`cache_reader`), read in whole cache chunks (256 images) by a background thread
(:class:`ChunkFeeder`), shuffled by chunk order and within a buffer of chunks, so
the input pipeline costs a few percent of a step (``docs/benchmarks.md``). The pixels stay
uint8 until the device: conversion, normalisation and augmentation happen there.

Reproducible: ``seed`` fixes the initial weights, each epoch's data order
(``(seed, epoch)``) and its augmentations and dropout (``(seed, epoch, rank)``), so a
resumed run continues exactly as an uninterrupted one would (on the CPU).

Under torchrun (DistributedDataParallel): the **global** batch is ``batch_size`` whatever
the number of processes. Every rank computes the same epoch plan (:func:`epoch_plan`)
and trains on its part of each global batch (``batch_size / world`` images,
:func:`batch_share`), so 1 and N processes take the same optimiser steps per epoch, on the
same images, at the same learning rate, and every image is seen once an epoch. Batch-norm
statistics are per rank (per-rank batches), and NT-Xent's negatives are the rank's own
views, so N-process results are close to, not equal to, one process's. ``resume`` is
decided on rank 0, which hands its state to the others; only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lymph
from lymph.data.cache import ImageCache
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
from lymph.encoder.feed import ChunkFeeder, cache_reader, epoch_plan, feeder_threaded
from lymph.encoder.preprocess import Preprocess
from lymph.encoder.registry import MSE, get_method, method_spec
from lymph.errors import LymphError
from lymph.finite import check_epoch

log = logging.getLogger("lymph")


@dataclass
class TrainConfig:
    """Optimisation settings (stored whole in the checkpoint).

    Defaults, for the real data (10,850 images at 112 px) on a 2-core CPU within about
    15 minutes in total:

    - ``batch_size`` 128: the report used 5 for GPU memory reasons; on a CPU small batches
      waste most of the time in per-layer overheads (measured in bf16, channels-last, before
      the fast layers of ``lymph.encoder.fastcpu.layers``: batch 32 ~1,000 images/s, batch 128
      ~1,250 images/s on this machine when idle; 1,600 to 1,700 since), and 128 still
      gives 85 updates per epoch.
    - ``lr`` 1e-3: Adam's usual rate. The report's 1e-4 was tuned for batch 5; with 25x
      larger batches (less gradient noise, 25x fewer steps) a higher rate is needed to
      converge within the same epochs (square-root scaling of 1e-4 gives 5e-4, linear
      2.5e-3; 1e-3 sits between). On the real data it takes the reconstruction MSE from
      0.75 to 0.28 in 4 epochs (``docs/benchmarks.md``).
    - ``epochs`` 20: 217,000 image presentations. An epoch is ~7 s on the idle 2-core
      machine, but the cores are shared and we measured 150 to 400 images/s under load:
      20 epochs is 2.2 min idle and about 10 min at 400 images/s, inside the 15-minute
      budget, with the loss curve flattening by then.
    - ``precision`` auto: bf16 autocast on GPUs of compute capability 8 or more (Ampere
      on) and on CPUs with native bf16 (AMX / AVX512-BF16; 1.8x faster than fp32 here),
      fp32 elsewhere (older GPUs emulate bf16). Weights, Adam state and
      the loss stay fp32; the embedding pass is always fp32.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    buffer_chunks: int = 4  # shuffle buffer, in cache chunks (4 x 256 images, ~38 MB at 112 px)
    weight_decay: float = 0.0
    #: ``constant``, or ``cosine``: the rate decays per step from ``lr`` to 0 over ``epochs``
    lr_schedule: str = "constant"

    def check(self) -> None:
        if self.epochs < 1:
            raise LymphError(f"epochs: expected at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise LymphError(f"batch_size: expected at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise LymphError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LymphError(f"precision: expected auto, fp32 or bf16, got {self.precision!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise LymphError(f"lr_schedule: expected {' or '.join(LR_SCHEDULES)}, got "
                             f"{self.lr_schedule!r}")

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        """The learning rate of ``step`` (0-based) of ``epoch`` (0-based), ``steps`` a epoch."""
        if self.lr_schedule == "constant":
            return self.lr
        t = (epoch * steps + step) / max(self.epochs * steps, 1)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LR_SCHEDULES = ("constant", "cosine")

#: TrainConfig fields that may change when resuming (the rest must match the checkpoint)
RESUMABLE_CHANGES = ("epochs", "precision", "buffer_chunks")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        # native bf16 from compute capability 8 (Ampere) on; ``is_bf16_supported()`` also
        # says yes where bf16 is emulated (slow convolutions), and asks the current device
        return torch.bfloat16 if cuda_bf16_native(device) else None
    import torch.cpu as tc

    fast = getattr(tc, "_is_amx_tile_supported", lambda: False)() or getattr(
        tc, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if fast else None


def cuda_bf16_native(device: torch.device) -> bool:
    """Whether the chosen GPU (not the current one) computes bf16 natively (sm_80+)."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the config's rate and weight decay, as one fused kernel over all
    parameters (CPU and CUDA): the per-tensor update loop costs ~2 % of a CPU step."""
    return torch.optim.Adam(model.parameters(), lr=config.lr,
                            weight_decay=config.weight_decay, fused=True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype``, or nothing for fp32."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(method: Any, net: torch.nn.Module, opt: torch.optim.Optimizer,
               batch: torch.Tensor, prep: Preprocess, amp: torch.dtype | None,
               targets: torch.Tensor | None = None, weight: float = 1.0) -> torch.Tensor:
    """One optimisation step on a batch already on the device (the training loop's and the
    benchmark's); returns the loss. ``targets``: per-image labels, for methods that need them.
    ``weight``: the rank's share of a global batch (:func:`batch_share`); the gradient is
    that of ``weight * loss`` (the returned loss is not weighted)."""
    with autocast(batch.device, amp):
        if targets is None:
            loss = method.loss(net, batch, prep)
        else:
            loss = method.loss(net, batch, prep, targets)
    opt.zero_grad(set_to_none=True)
    (loss if weight == 1.0 else loss * weight).backward()
    opt.step()
    return loss


# ---- training ----------------------------------------------------------------------------
@dataclass
class TrainResult:
    checkpoint: Path
    losses: list[float]  # mean training loss of every epoch so far (resumed ones included)
    epochs_run: int  # epochs trained by this call
    seconds: float
    images_per_s: float
    loss_curve: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_model(method_name: str, model_config: Any, device: torch.device,
                channels_last: bool = True) -> torch.nn.Module:
    method = get_method(method_name)
    model = method.build(model_config).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train(
    cache: ImageCache,
    checkpoint: str | Path,
    *,
    method: str = "ae",
    model_config: Any = None,
    config: TrainConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    env: D.DistEnv | None = None,
    progress: bool = True,
    loss_curve: str | Path | None = None,
    rows: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``method`` on every image of ``cache``; write ``checkpoint`` after each epoch.

    ``model_config`` defaults to the method's config at the cache's image size.
    ``resume`` continues from ``checkpoint`` when it exists (same data, method, model and
    optimisation settings; ``epochs`` may grow). ``loss_curve``: a PNG of the epoch losses.

    Label-trained methods (``needs_labels = True``, e.g. ``weak``): ``targets`` is an
    ``(n_images, ...)`` float array (per-image label and weight, the method's choice) handed
    to ``loss(model, batch, normalise, targets)``; ``rows`` restricts training to those
    image positions (a fold's training patients); ``extra`` (JSON-able) is stored in the
    checkpoint and must match on ``resume``.
    """
    config = config or TrainConfig()
    config.check()
    checkpoint = Path(checkpoint)
    own_env = env is None
    env = env or D.setup(device)
    try:
        m = get_method(method)
        needs_labels = method_spec(method).needs_labels
        keep, model_config = _check_inputs(cache, method, m, needs_labels, model_config,
                                           rows, targets)
        dev = env.device
        amp = resolve_precision(config.precision, dev)
        torch.manual_seed(config.seed)
        model = build_model(method, model_config, dev)
        opt = make_optimizer(model, config)
        losses, start = _resume(env, checkpoint, resume, method, model_config, config, cache,
                                extra, model, opt)
        net: torch.nn.Module = model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        base = _record(method, model_config, config, cache, amp, extra)
        n_img, seconds = 0, 0.0
        read = cache_reader(cache, local_world=env.local_world)
        steps = 0
        for epoch in range(start, config.epochs):
            plan = epoch_plan(cache.n_images, int(cache.pixels.chunks[0]), config.batch_size,
                              config.seed, epoch, keep, buffer=config.buffer_chunks,
                              min_batch=method_spec(method).min_batch)
            steps = plan.steps
            feeder = ChunkFeeder(read, plan, rank=env.rank, world=env.world,
                                 pin=dev.type == "cuda", threaded=feeder_threaded(dev),
                                 targets=targets if needs_labels else None)
            loss, seen, dt = _run_epoch(m, net, opt, feeder, cache, config, epoch, amp, env,
                                        progress)
            losses.append(loss)
            check_epoch(losses[-1], epoch + 1, model, checkpoint, fresh=start == 0, is_main=env.is_main)
            n_img += seen
            seconds += dt
            if env.is_main:
                log.info("epoch %d/%d: loss %.5f, %.0f images/s", epoch + 1, config.epochs,
                         losses[-1], seen / max(dt, 1e-9))
                # no timing in the checkpoint: the same seed gives the same bytes (its
                # sha256 is in the store's provenance, which must be reproducible too)
                save_checkpoint(checkpoint, {
                    **base, "epoch": epoch + 1, "losses": losses,
                    "world_size": env.world, "steps_per_epoch": steps,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                })
        D.barrier(env)
        curve = None
        if loss_curve is not None and env.is_main and losses:
            curve = save_loss_curve(losses, loss_curve, title=f"{method} training loss ({checkpoint.name})",
                                    ylabel=method_spec(method).loss_name)
        return TrainResult(checkpoint, losses, max(0, config.epochs - start), seconds,
                           n_img / max(seconds, 1e-9), curve)
    finally:
        if own_env:
            D.teardown(env)


def _check_inputs(cache: ImageCache, method: str, m: Any, needs_labels: bool, model_config: Any,
                  rows: np.ndarray | None, targets: np.ndarray | None) -> tuple[np.ndarray | None, Any]:
    """(the images to train on as a mask, or None for all; the checked model config)."""
    if needs_labels and targets is None:
        raise LymphError(f"method: {method} trains from labels; give per-image targets")
    keep = None
    if rows is not None:
        keep = np.zeros(cache.n_images, dtype=bool)
        keep[np.asarray(rows, dtype=np.int64)] = True
        if not keep.any():
            raise LymphError(f"method: {method} has no images to train on (empty selection)")
    if model_config is None:
        model_config = m.config_cls(size=cache.size)
    model_config.check()
    if model_config.size != cache.size:
        raise LymphError(
            f"{cache.path}: images are {cache.size} px but the model expects "
            f"{model_config.size} px; re-ingest with `size` {model_config.size}"
        )
    return keep, model_config


def _resume(env: D.DistEnv, checkpoint: Path, resume: bool, method: str, model_config: Any,
            config: TrainConfig, cache: ImageCache, extra: dict[str, Any] | None,
            model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[list[float], int]:
    """(losses so far, first epoch to train): the checkpoint's state loaded into ``model``
    and ``opt`` when resuming. Rank 0 decides whether and from where to resume, and hands
    every rank its state (the other ranks never read the checkpoint: their view of it may
    differ)."""
    losses: list[float] = []
    start = 0
    ck = D.main_decides(env, lambda: _resume_state(
        checkpoint, resume, method, model_config, config, cache, extra)) if resume else None
    if ck is not None:
        model.load_state_dict(ck["model"])
        if "optimizer" in ck:
            opt.load_state_dict(ck["optimizer"])
        losses = [float(v) for v in ck.get("losses", [])]
        start = int(ck["epoch"])
        if start > config.epochs and env.is_main:
            log.warning("resume: %s already has %d epochs (more than epochs %d); "
                        "nothing to train", checkpoint, start, config.epochs)
        if env.is_main:
            log.info("resuming %s from epoch %d", checkpoint, start)
    elif resume and env.is_main:
        log.warning("resume: no checkpoint at %s yet; training from the start", checkpoint)
    return losses, start


def _record(method: str, model_config: Any, config: TrainConfig, cache: ImageCache,
            amp: torch.dtype | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What every checkpoint of this run records besides the weights and the epoch."""
    return {
        "method": method, "model_config": model_config.to_dict(),
        "train_config": config.to_dict(),
        "normalisation": {"mean": [float(v) for v in cache.channel_mean],
                          "std": [float(v) for v in cache.channel_std]},
        "cache": {"size": cache.size, "crop": cache.crop},
        "data_fingerprint": cache.fingerprint, "lymph_version": lymph.__version__,
        "precision": "bf16" if amp is not None else "fp32",
        **(extra or {}),
    }


def _run_epoch(m: Any, net: torch.nn.Module, opt: torch.optim.Optimizer, feeder: ChunkFeeder,
               cache: ImageCache, config: TrainConfig, epoch: int, amp: torch.dtype | None,
               env: D.DistEnv, progress: bool) -> tuple[float, int, float]:
    """One epoch: (mean loss over all ranks, images seen by all ranks, seconds)."""
    from lymph.console import progress_bar

    dev = env.device
    # every random draw of the epoch from (seed, epoch, rank): the augmentations'
    # generator, and the global one (dropout), so that ranks differ and a resumed
    # run continues as an uninterrupted one would
    gen = torch.Generator().manual_seed(_mix(config.seed, epoch, env.rank))
    torch.manual_seed(_mix(config.seed, epoch, env.rank, 2))
    prep = Preprocess(cache.channel_mean, cache.channel_std, dev, channels_last=True,
                      generator=gen)
    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    seen = 0
    t0 = time.perf_counter()
    with progress_bar(f"epoch {epoch + 1}/{config.epochs}", feeder.plan.steps,
                      enabled=progress and env.is_main, loss="-", rate="-") as update:
        for step, (px, tg, weight) in enumerate(feeder):
            batch = px.to(dev, non_blocking=True)
            tg = None if tg is None else tg.to(dev, non_blocking=True)
            if config.lr_schedule != "constant":
                for g in opt.param_groups:
                    g["lr"] = config.lr_at(epoch, step, feeder.plan.steps)
            loss = train_step(m, net, opt, batch, prep, amp, tg, weight)
            n = batch.shape[0] if weight > 0 else 0  # a weight-0 stand-in: not seen
            loss_sum += loss.detach() * n
            seen += n
            if dev.type == "cpu" or step % 25 == 0:  # .item() is a GPU sync point
                rate = seen * env.world / max(time.perf_counter() - t0, 1e-9)
                update(loss=f"{float(loss_sum) / seen:.4f}", rate=f"{rate:.0f} img/s")
            else:
                update()
    dt = time.perf_counter() - t0
    tot_loss, tot_seen = D.all_reduce_sum(env, [float(loss_sum), float(seen)])
    return tot_loss / max(tot_seen, 1.0), int(tot_seen), dt


def _mix(*xs: int) -> int:
    """A 63-bit seed from small integers (stable across runs and platforms)."""
    return int(np.random.default_rng(list(xs)).integers(0, 2**63 - 1))


def _resume_state(checkpoint: Path, resume: bool, method: str, model_config: Any,
                  config: TrainConfig, cache: ImageCache,
                  extra: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0's decision for ``--resume``: the checkpoint to continue from, or ``None``."""
    if not (resume and checkpoint.is_file()):
        return None
    ck = load_checkpoint(checkpoint)
    _check_resumable(ck, checkpoint, method, model_config, config, cache)
    for k, v in (extra or {}).items():
        if ck.get(k) != v:
            raise LymphError(f"resume: {checkpoint} was trained with other {k!r} "
                             "settings; drop `resume` to start again")
    return ck


def _check_resumable(ck: dict[str, Any], path: Path, method: str, model_config: Any,
                     config: TrainConfig, cache: ImageCache) -> None:
    def refuse(what: str, old: Any, new: Any) -> LymphError:
        return LymphError(
            f"resume: {path} was trained with {what} {old!r}, this run asks for {new!r}; "
            "drop `resume` to start again, or use the same settings"
        )

    if ck["method"] != method:
        raise refuse("method", ck["method"], method)
    if ck["model_config"] != model_config.to_dict():
        raise refuse("model settings", ck["model_config"], model_config.to_dict())
    if ck["data_fingerprint"] != cache.fingerprint:
        raise refuse("data fingerprint", ck["data_fingerprint"][:12], cache.fingerprint[:12])
    old = {"lr_schedule": "constant",  # checkpoints from before the setting existed
           **{k: v for k, v in ck.get("train_config", {}).items() if k not in RESUMABLE_CHANGES}}
    new = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            raise refuse(k, old.get(k), new.get(k))


def save_loss_curve(losses: list[float], path: str | Path, title: str = "training loss",
                    ylabel: str = MSE) -> Path:
    """Epoch losses as a PNG (:mod:`lymph.figures`: no global backend switch)."""
    from lymph.figures import new_figure, save_png

    fig, ax = new_figure((5, 3.2), dpi=120)
    ax.plot(np.arange(1, len(losses) + 1), losses, marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)
