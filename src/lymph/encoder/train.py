"""The stage-one training loop, for any trainable method of the registry.

Data: the uint8 image cache (held in RAM when it fits, :func:`cache_reader`), read in
whole cache chunks (256 images) by a background
thread (:class:`ChunkFeeder`), shuffled by chunk order and within a buffer of chunks, so
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
views, so N-process results are close to, not equal to, one process's. ``--resume`` is
decided on rank 0, which hands its state to the others; only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lymph
from lymph.data.cache import ImageCache
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
from lymph.encoder.methods import Preprocess, get_method
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
      the fast layers of ``lymph.encoder.layers``: batch 32 ~1,000 images/s, batch 128
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

    def check(self) -> None:
        if self.epochs < 1:
            raise LymphError(f"--epochs: expected at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise LymphError(f"--batch-size: expected at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise LymphError(f"--lr: expected a positive learning rate, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise LymphError(f"precision: expected auto, fp32 or bf16, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


# ---- input pipeline ----------------------------------------------------------------------
@dataclass
class EpochPlan:
    """One epoch's global batches, the same for any number of processes.

    ``groups``: per shuffle buffer, the blocks it reads, the global batches drawn from it
    (arrays of image positions) and the positions carried to the next buffer. ``steps``:
    optimiser steps (``ceil(images / batch_size)``; every image once per epoch)."""

    groups: list[tuple[list[tuple[int, int]], list[np.ndarray], np.ndarray]]
    steps: int
    n_images: int


def epoch_plan(n: int, chunk: int, batch_size: int, seed: int, epoch: int,
               keep: np.ndarray | None = None, buffer: int = 4, min_batch: int = 1) -> EpochPlan:
    """The global batches of one epoch (see :class:`EpochPlan`).

    Cache chunks in a random order (``(seed, epoch)``), read ``buffer`` at a time; the
    images of a buffer (plus those carried from the last one) are shuffled together and
    cut into batches of ``batch_size``; the remainder is carried, and the last buffer
    ends with one short batch. Under torchrun every rank computes the same plan and
    trains on its share of each batch (:func:`batch_share`): global batch fixed, the same
    steps and the same images per step for 1 and N processes. ``keep``: optional
    ``(n,)`` bool mask of the images trained on. ``min_batch``: the method's smallest
    batch (NT-Xent needs 2 images); a shorter last batch joins the one before it."""
    bl = D.blocks(n, 1, chunk)
    order = np.random.default_rng([seed, epoch]).permutation(len(bl))
    bl = [bl[i] for i in order]
    rng = np.random.default_rng([seed, epoch, 0, 1])
    buffer = max(1, buffer)
    groups: list[tuple[list[tuple[int, int]], list[np.ndarray], np.ndarray]] = []
    left = np.zeros(0, dtype=np.int64)
    total = 0
    for g in range(0, len(bl), buffer):
        blocks = bl[g : g + buffer]
        pos = [np.arange(a, b, dtype=np.int64) for a, b in blocks]
        if keep is not None:
            pos = [p[keep[p]] for p in pos]
        pos = np.concatenate([left, *pos])
        perm = rng.permutation(len(pos))
        last = g + buffer >= len(bl)
        cut = len(pos) if last else len(pos) - len(pos) % batch_size
        batches = [pos[perm[s : s + batch_size]] for s in range(0, cut, batch_size)]
        left = pos[perm[cut:]]
        groups.append((blocks, batches, left))
        total += len(pos) - len(left)
    if min_batch > 1 and groups and groups[-1][1] and len(groups[-1][1][-1]) < min_batch:
        blocks, batches, _ = groups.pop()
        tail = batches.pop()
        if not batches and groups:  # alone in its buffer: merge the buffer into the last one
            prev_blocks, batches, _ = groups.pop()
            blocks = prev_blocks + blocks
        if batches:
            batches[-1] = np.concatenate([batches[-1], tail])
        else:  # the whole epoch is one short batch: left to the method to refuse
            batches = [tail]
        groups.append((blocks, batches, np.zeros(0, dtype=np.int64)))
    return EpochPlan(groups, sum(len(b) for _, b, _ in groups), total)


def batch_share(batch: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, float]:
    """This rank's images of a global batch and its loss weight.

    The batch is split into ``world`` contiguous parts (sizes differ by at most one);
    the weight ``len(part) * world / len(batch)`` makes DDP's mean of the ranks' gradients
    the gradient of the mean loss over the whole batch. A short last batch with fewer than
    two images per rank is split among fewer ranks (at least two images each: NT-Xent and
    batch norm need them); a rank left without images trains on two of the batch's with
    weight 0 (DDP needs every rank's backward; its gradients are zeros)."""
    if world == 1:
        return batch, 1.0
    m = len(batch)
    k = min(world, max(1, m // 2))
    if rank < k:
        part = np.array_split(batch, k)[rank]
        return part, len(part) * world / m
    return batch[: min(2, m)], 0.0


def feeder_threaded(device: torch.device) -> bool:
    """Read ahead in a background thread on CUDA (the CPU is free while the GPU works).

    On the CPU the compute threads already use every core: a reader thread preempts one
    of them and the whole OpenMP region waits for it, so the batches are prepared in the
    loop's own thread between steps (measured: see ``docs/benchmarks.md``).
    """
    return device.type == "cuda"


class ChunkFeeder:
    """This rank's uint8 batches ``(b, 3, S, S)`` of one :class:`EpochPlan`.

    Items are ``(pixels, targets, weight)``: ``targets`` the rows of ``targets`` (an
    ``(n_images, ...)`` array indexed by image position; ``None`` without), ``weight`` the
    rank's loss weight (:func:`batch_share`; 0 for a rank without images in a short last
    batch). ``read(start, stop)`` returns the pixels of a block (a whole cache chunk); a
    reader holding the whole cache in RAM (``.pixels``, :func:`cache_reader`) is indexed
    directly. Otherwise each buffer's blocks are read whole (under torchrun every rank
    decompresses every chunk and keeps its share). ``steps``: stop after that many
    batches (default: the whole plan). Read ahead by a background thread when
    ``threaded``.
    """

    def __init__(self, read: Callable[[int, int], np.ndarray], plan: EpochPlan, *,
                 rank: int = 0, world: int = 1, steps: int | None = None, prefetch: int = 8,
                 pin: bool = False, threaded: bool = True,
                 targets: np.ndarray | None = None) -> None:
        self.read, self.plan, self.rank, self.world = read, plan, rank, world
        self.targets = None if targets is None else torch.from_numpy(np.ascontiguousarray(targets))
        self.ram = getattr(read, "pixels", None)
        self.steps = plan.steps if steps is None else min(steps, plan.steps)
        self.threaded, self.pin = threaded, pin
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()

    def _item(self, buf: torch.Tensor, rows: np.ndarray, pos: np.ndarray, weight: float) -> Any:
        t = buf.index_select(0, torch.from_numpy(rows))
        t = t.pin_memory() if self.pin else t
        tg = None if self.targets is None else self.targets.index_select(0, torch.from_numpy(pos))
        return t, tg, weight

    def batches(self) -> Iterator[Any]:
        """The epoch's batches, computed in the calling thread."""
        # torch copies (cat, index_select) release the GIL and are much faster than numpy
        # fancy indexing of uint8 images
        emitted = 0
        if self.ram is not None:
            whole = torch.from_numpy(self.ram)
        left_px = torch.zeros(0, dtype=torch.uint8)
        left_pos = np.zeros(0, dtype=np.int64)
        for blocks, batches, carry in self.plan.groups:
            if emitted == self.steps or self.stop.is_set():
                return
            if self.ram is not None:
                for b in batches:
                    if emitted == self.steps or self.stop.is_set():
                        return
                    pos, w = batch_share(b, self.rank, self.world)
                    yield self._item(whole, pos, pos, w)
                    emitted += 1
                continue
            parts = [left_px, *(torch.from_numpy(self.read(a, b)) for a, b in blocks)]
            buf = torch.cat(parts)
            where = np.concatenate([left_pos, *(np.arange(a, b) for a, b in blocks)])
            order = np.argsort(where, kind="stable")
            for b in batches:
                if emitted == self.steps or self.stop.is_set():
                    return
                pos, w = batch_share(b, self.rank, self.world)
                yield self._item(buf, _rows(where, order, pos), pos, w)
                emitted += 1
            left_px = buf.index_select(0, torch.from_numpy(_rows(where, order, carry)))
            left_pos = carry

    def _produce(self) -> None:
        try:
            for t in self.batches():
                self.queue.put(t)
        except BaseException as e:  # handed to the consumer
            self.queue.put(e)
        finally:
            self.queue.put(None)

    def __iter__(self) -> Iterator[Any]:
        if not self.threaded:
            yield from self.batches()
            return
        th = threading.Thread(target=self._produce, daemon=True, name="lymph-feeder")
        th.start()
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()
            while th.is_alive():  # unblock a producer waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    th.join(0.01)


def _rows(where: np.ndarray, order: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rows of the buffer holding image positions ``pos`` (``where``: each row's position,
    ``order``: its argsort)."""
    return order[np.searchsorted(where, pos, sorter=order)]


class _InRam:
    """``read(start, stop)`` over the whole cache held in memory (``.pixels``)."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __call__(self, a: int, b: int) -> np.ndarray:
        return self.pixels[a:b]


#: RAM for the decompressed cache, per machine (divided among its processes)
CACHE_RAM_BYTES = 2 << 30


def cache_reader(cache: ImageCache, max_bytes: int | None = None,
                 local_world: int = 1) -> Callable[[int, int], np.ndarray]:
    """``read(start, stop)`` for the feeder: from RAM when the cache fits in ``max_bytes``
    (default :data:`CACHE_RAM_BYTES` divided by ``local_world``, the processes of this
    machine: each holds its own copy).

    A cache that fits (the real dev set at 112 px is 408 MB) is decompressed once per
    training run, so each epoch's feeding is a shuffle of in-memory uint8 images and the
    input pipeline costs almost nothing; a larger cache is read chunk by chunk from Zarr
    (the operating system's page cache then shares the compressed file among processes).
    """
    if max_bytes is None:
        max_bytes = CACHE_RAM_BYTES // max(1, local_world)
    if cache.n_images * 3 * cache.size * cache.size <= max_bytes:
        return _InRam(cache.read_all())
    return cache.read


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
    checkpoint and must match on ``--resume``.
    """
    from lymph.console import progress_bar

    config = config or TrainConfig()
    config.check()
    checkpoint = Path(checkpoint)
    own_env = env is None
    env = env or D.setup(device)
    try:
        m = get_method(method)
        if not m.trainable:
            raise LymphError(f"--method {method}: has nothing to train")
        needs_labels = bool(getattr(m, "needs_labels", False))
        if needs_labels and targets is None:
            raise LymphError(f"--method {method}: trains from labels; give per-image targets")
        keep = None
        if rows is not None:
            keep = np.zeros(cache.n_images, dtype=bool)
            keep[np.asarray(rows, dtype=np.int64)] = True
            if not keep.any():
                raise LymphError(f"--method {method}: no images to train on (empty selection)")
        if model_config is None:
            model_config = m.config_cls(size=cache.size)
        model_config.check()
        if model_config.size != cache.size:
            raise LymphError(
                f"{cache.path}: images are {cache.size} px but the model expects "
                f"{model_config.size} px; re-ingest with --size {model_config.size}"
            )
        dev = env.device
        amp = resolve_precision(config.precision, dev)
        torch.manual_seed(config.seed)
        model = build_model(method, model_config, dev)
        opt = make_optimizer(model, config)
        losses: list[float] = []
        start = 0
        # rank 0 decides whether and from where to resume, and hands every rank its state
        # (the other ranks never read the checkpoint: their view of it may differ)
        ck = D.main_decides(env, lambda: _resume_state(
            checkpoint, resume, method, model_config, config, cache, extra)) if resume else None
        if ck is not None:
            model.load_state_dict(ck["model"])
            if "optimizer" in ck:
                opt.load_state_dict(ck["optimizer"])
            losses = [float(v) for v in ck.get("losses", [])]
            start = int(ck["epoch"])
            if start > config.epochs and env.is_main:
                log.warning("--resume: %s already has %d epochs (more than --epochs %d); "
                            "nothing to train", checkpoint, start, config.epochs)
            if env.is_main:
                log.info("resuming %s from epoch %d", checkpoint, start)
        elif resume and env.is_main:
            log.warning("--resume: no checkpoint at %s yet; training from the start", checkpoint)
        net: torch.nn.Module = model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        chunk = int(cache.pixels.chunks[0])
        base = {
            "method": method, "model_config": model_config.to_dict(),
            "train_config": config.to_dict(),
            "normalisation": {"mean": [float(v) for v in cache.channel_mean],
                              "std": [float(v) for v in cache.channel_std]},
            "cache": {"size": cache.size, "crop": cache.crop},
            "data_fingerprint": cache.fingerprint, "lymph_version": lymph.__version__,
            "precision": "bf16" if amp is not None else "fp32",
            **(extra or {}),
        }
        n_img, seconds = 0, 0.0
        read = cache_reader(cache, local_world=env.local_world)
        steps = 0
        for epoch in range(start, config.epochs):
            # every random draw of the epoch from (seed, epoch, rank): the augmentations'
            # generator, and the global one (dropout), so that ranks differ and a resumed
            # run continues as an uninterrupted one would
            gen = torch.Generator().manual_seed(_mix(config.seed, epoch, env.rank))
            torch.manual_seed(_mix(config.seed, epoch, env.rank, 2))
            prep = Preprocess(cache.channel_mean, cache.channel_std, dev, channels_last=True,
                              generator=gen)
            plan = epoch_plan(cache.n_images, chunk, config.batch_size, config.seed, epoch,
                              keep, buffer=config.buffer_chunks,
                              min_batch=int(getattr(m, "min_batch", 1)))
            steps = plan.steps
            feeder = ChunkFeeder(read, plan, rank=env.rank, world=env.world,
                                 pin=dev.type == "cuda", threaded=feeder_threaded(dev),
                                 targets=targets if needs_labels else None)
            net.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            seen = 0
            t0 = time.perf_counter()
            with progress_bar(f"epoch {epoch + 1}/{config.epochs}", steps,
                              enabled=progress and env.is_main, loss="-", rate="-") as update:
                for step, (px, tg, weight) in enumerate(feeder):
                    batch = px.to(dev, non_blocking=True)
                    tg = None if tg is None else tg.to(dev, non_blocking=True)
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
            losses.append(tot_loss / max(tot_seen, 1.0))
            check_epoch(losses[-1], epoch + 1, model, checkpoint, fresh=start == 0, is_main=env.is_main)
            n_img += int(tot_seen)
            seconds += dt
            if env.is_main:
                log.info("epoch %d/%d: loss %.5f, %.0f images/s", epoch + 1, config.epochs,
                         losses[-1], tot_seen / max(dt, 1e-9))
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
                                    ylabel=getattr(m, "loss_name", _MSE))
        return TrainResult(checkpoint, losses, max(0, config.epochs - start), seconds,
                           n_img / max(seconds, 1e-9), curve)
    finally:
        if own_env:
            D.teardown(env)


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
            raise LymphError(f"--resume: {checkpoint} was trained with other {k!r} "
                             "settings; drop --resume to start again")
    return ck


def _check_resumable(ck: dict[str, Any], path: Path, method: str, model_config: Any,
                     config: TrainConfig, cache: ImageCache) -> None:
    def refuse(what: str, old: Any, new: Any) -> LymphError:
        return LymphError(
            f"--resume: {path} was trained with {what} {old!r}, this run asks for {new!r}; "
            "drop --resume to start again, or use the same settings"
        )

    if ck["method"] != method:
        raise refuse("method", ck["method"], method)
    if ck["model_config"] != model_config.to_dict():
        raise refuse("model settings", ck["model_config"], model_config.to_dict())
    if ck["data_fingerprint"] != cache.fingerprint:
        raise refuse("data fingerprint", ck["data_fingerprint"][:12], cache.fingerprint[:12])
    old = {k: v for k, v in ck.get("train_config", {}).items() if k not in RESUMABLE_CHANGES}
    new = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            raise refuse(k, old.get(k), new.get(k))


_MSE = "reconstruction MSE (normalised pixels)"


def save_loss_curve(losses: list[float], path: str | Path, title: str = "training loss",
                    ylabel: str = _MSE) -> Path:
    """Epoch losses as a PNG (matplotlib's Agg canvas; no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lymph.atomic import atomic_path

    fig = Figure(figsize=(5, 3.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(losses) + 1), losses, marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
