"""Running stage one under ``torchrun --nproc_per_node N``: process group, device, shards.

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything here is a no-op
and the world is one process. Under torchrun the backend is gloo on CPU and nccl on CUDA;
each rank reads its own blocks of the image cache, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lymph.encoder.allocator import keep_freed_memory
from lymph.errors import LymphError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    initialised: bool = False  # this module started the process group (and ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` without a GPU is an error."""
    if pref not in ("auto", "cpu", "cuda") and not pref.startswith("cuda:"):
        raise LymphError(f"--device: expected auto, cpu or cuda, got {pref!r}")
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LymphError("--device cuda: no CUDA device is available (use --device cpu)")
        return torch.device(pref if ":" in pref else f"cuda:{local_rank}")
    return torch.device("cpu")


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def setup(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if there is one; pick the device and CPU threads.

    CPU threads: the cores divided among the processes of this node (two processes on two
    cores get one thread each; oversubscription costs more than it gains). An explicit
    ``OMP_NUM_THREADS`` wins (e.g. 1 on a CPU shared with other jobs). Also keeps freed
    memory in the process (:mod:`lymph.encoder.allocator`).
    """
    keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device, local_rank)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(omp) if omp.isdigit() and int(omp) > 0
                          else max(1, cpu_cores() // max(1, local_world)))
    env = DistEnv(rank, world, local_rank, local_world, dev)
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            env.initialised = True
    return env


def teardown(env: DistEnv) -> None:
    if env.initialised:
        import torch.distributed as dist

        dist.destroy_process_group()
        env.initialised = False


def barrier(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Sum a few floats over the ranks (float64; a sync point)."""
    if not env.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def blocks(n: int, world: int, chunk: int, align: int = 1) -> list[tuple[int, int]]:
    """Cut ``n`` images into contiguous blocks: whole cache chunks when there are enough
    of them for every rank, otherwise ``ceil(n / world)`` images rounded up to a multiple
    of ``align`` (tiny data sets). Block starts are multiples of ``align`` when ``chunk``
    is."""
    if n == 0:
        return []
    if n >= chunk * world:
        size = chunk
    else:
        size = max(1, -(-n // world))
        size = -(-size // align) * align
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def shard(items: list[Any], env: DistEnv) -> list[Any]:
    """This rank's share, round robin: rank r gets items r, r + world, ..."""
    return items[env.rank :: env.world]


def gather_blocks(env: DistEnv, local: list[tuple[int, np.ndarray]]) -> np.ndarray | None:
    """Collect ``(block_index, rows)`` pairs from every rank; rank 0 gets the rows of all
    blocks concatenated in block order (each block exactly once), others get ``None``."""
    if env.distributed:
        import torch.distributed as dist

        parts: list[Any] = [None] * env.world
        dist.all_gather_object(parts, local)
        everything = [p for part in parts for p in part]
    else:
        everything = list(local)
    if not env.is_main:
        return None
    everything.sort(key=lambda p: p[0])
    idx = [i for i, _ in everything]
    if idx != list(range(len(idx))):
        raise LymphError(f"internal: gathered embedding blocks {idx[:10]}... are not each present once")
    return np.concatenate([a for _, a in everything]) if everything else None
