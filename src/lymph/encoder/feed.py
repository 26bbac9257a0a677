"""The training loop's input pipeline: the epoch plan (the same global batches for any
number of processes), each rank's share of a batch, and the background reader of whole
cache chunks (the cache held in RAM when it fits). The pixels stay uint8 until the device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lymph.data.cache import ImageCache
from lymph.encoder import distributed as D


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
