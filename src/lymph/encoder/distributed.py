"""Running stage one under ``torchrun``: process group, device, failures, shared files.

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything here is a no-op
and the world is one process. Under torchrun the backend is gloo on CPU and nccl on CUDA;
only rank 0 writes files.

Rules of a multi-process run (``docs/cli.md``, "Under torchrun"):

- **Device**: rank ``i`` uses GPU ``LOCAL_RANK``; ``--device cuda:N`` (every rank on one GPU)
  and more processes on a machine than it has GPUs are refused before the process group
  starts (:func:`check_device`).
- **Files**: only rank 0 reads checkpoints (``--encoder``, ``--resume``, the one it has
  just trained) and sends their contents to the other ranks (:func:`main_decides`), and
  only rank 0 writes; so the output folder need not be shared. Every rank reads the image
  cache: it must be at the same path on every machine (a shared filesystem or a copy),
  with the same fingerprint (:func:`check_same_cache`). With ``--data`` rank 0 ingests it,
  so its folder must be shared: checked at start (:func:`check_shared_folder`: rank 0
  writes a token, every rank must see it) and refused otherwise, naming the ranks and
  hosts that did not see it.
- **Rank-0-only work** that may take long (ingest, morphometry of a large cohort): the
  other ranks wait for it through the rendezvous store, polling once a second
  (:func:`main_does`), not in a collective, so no NCCL/gloo timeout applies to it. Short
  decisions (``--resume``, reading a checkpoint) are taken on rank 0 and broadcast
  (:func:`main_decides`); short rank-0 writes (checkpoint, store, calibration) end in a
  barrier, under the process group's timeout (:data:`TIMEOUT_S`, 30 minutes).
- **Failures**: a rank that fails writes its message to the rendezvous store
  (:func:`fail`); every rank's watchdog thread polls it once a second and stops its
  process (within a few seconds, also across machines), so no rank waits for a timeout.
  The failing rank prints its error; the other ranks print one line per other machine.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymph.encoder.fastcpu.allocator import keep_freed_memory
from lymph.errors import LymphError

#: the process group's timeout for collectives (training steps, gathers). Rank-0-only work
#: is not waited for in a collective (see the module doc), so this only bounds a real hang.
TIMEOUT_S = int(os.environ.get("LYMPH_DIST_TIMEOUT", "1800"))
_FAIL_KEY = "lymph/failed"
_POLL_S = 1.0  # how often the watchdog and the waits look at the store
_GRACE_S = 5.0  # after a peer failed: time for the main thread to unwind before exiting
_reported: list[BaseException] = []  # this process's own failure, once reported
_waits = itertools.count()  # main_does calls, numbered alike on every rank


class RankStopped(LymphError):
    """This rank stops because another rank failed (or a check failed on every rank).

    ``quiet``: the CLI prints nothing (the failing rank, or another rank of this machine,
    says why)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    initialised: bool = False  # this module started the process group (and ends it)
    node: int = 0  # torchrun's GROUP_RANK (the machine's index)
    _watch: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def check_device(pref: str, world: int, local_rank: int, local_world: int,
                 n_gpus: int) -> None:
    """Refuse device choices that cannot work under torchrun (before any process group)."""
    if world <= 1:
        return
    if pref.startswith("cuda:"):
        raise LymphError(
            f"`device` {pref} under torchrun would put every process on GPU {pref[5:]}; "
            "use `device` cuda (process i of a machine uses GPU LOCAL_RANK i), and "
            "CUDA_VISIBLE_DEVICES to choose which GPUs a machine uses")
    if pref in ("cuda", "auto") and n_gpus > 0:  # (no GPU: resolve_device says so)
        if local_world > n_gpus:
            raise LymphError(
                f"torchrun starts {local_world} processes on this machine but it has "
                f"{n_gpus} visible GPU(s): use --nproc_per_node {n_gpus} or fewer, or "
                "`device` cpu")
        if not 0 <= local_rank < n_gpus:  # pragma: no cover (torchrun sets it below local_world)
            raise LymphError(f"LOCAL_RANK {local_rank}: no such GPU (this machine has {n_gpus})")


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` takes CUDA when present; ``cuda`` without a GPU is an error."""
    if pref not in ("auto", "cpu", "cuda") and not pref.startswith("cuda:"):
        raise LymphError(f"device: expected auto, cpu or cuda, got {pref!r}")
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LymphError("`device` cuda: no CUDA device is available (use `device` cpu)")
        dev = torch.device(pref if ":" in pref else f"cuda:{local_rank}")
        if dev.index is not None and not 0 <= dev.index < torch.cuda.device_count():
            raise LymphError(f"`device` {pref}: no such GPU (this machine has "
                             f"{torch.cuda.device_count()})")
        return dev
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
    memory in the process (:mod:`lymph.encoder.fastcpu.allocator`). On CUDA, cuDNN picks its
    fastest convolution algorithms for the fixed training shapes (``cudnn.benchmark``).
    """
    keep_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    node = int(os.environ.get("GROUP_RANK", "0"))
    try:
        check_device(device, world, local_rank, local_world,
                     torch.cuda.device_count() if torch.cuda.is_available() else 0)
        dev = resolve_device(device, local_rank)
    except LymphError as e:  # every rank refuses alike: one message per machine
        if world > 1:
            raise RankStopped(str(e), quiet=local_rank != 0) from None
        raise
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(omp) if omp.isdigit() and int(omp) > 0
                          else max(1, cpu_cores() // max(1, local_world)))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = DistEnv(rank, world, local_rank, local_world, dev, node=node)
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=TIMEOUT_S),
                                    **({"device_id": dev} if dev.type == "cuda" else {}))
            env.initialised = True
            env._watch = _Watchdog(env)
    return env


def teardown(env: DistEnv) -> None:
    if env._watch is not None:
        env._watch.stop()
        env._watch = None
    if env.initialised:
        import torch.distributed as dist

        dist.destroy_process_group()
        env.initialised = False


# ---- failures ------------------------------------------------------------------------------
def _store() -> Any:
    from torch.distributed import distributed_c10d as c10d

    return c10d._get_default_store()


def _peer_failure() -> str | None:
    """The message of the first rank that failed, if any (from the rendezvous store)."""
    try:
        store = _store()
        if store.check([_FAIL_KEY]):
            return store.get(_FAIL_KEY).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the store's host is gone: a machine stopped
        return "the rendezvous store is unreachable (a machine stopped or lost its network)"
    return None


def _stopped(env: DistEnv, why: str) -> RankStopped:
    """The error this rank raises when another one failed: printed once per machine."""
    failed_node = why.split("\x00", 1)[0]
    msg = why.split("\x00", 1)[-1]
    quiet = env.local_rank != 0 or failed_node == str(env.node)
    return RankStopped(f"stopped because {msg}", quiet=quiet)


def fail(env: DistEnv, exc: BaseException) -> BaseException:
    """Report this rank's failure to the others, or, when another rank failed first, the
    error this rank should raise instead (:class:`RankStopped`). Returns the exception to
    raise. Call from ``except BaseException as e: raise D.fail(env, e) from None``."""
    import torch.distributed as dist

    if not env.distributed or not dist.is_initialized():
        return exc
    if isinstance(exc, RankStopped) or any(exc is r for r in _reported):
        return exc
    first = _peer_failure()
    if first is not None:  # another rank failed first: this one is collateral
        return _stopped(env, first)
    what = str(exc) if isinstance(exc, LymphError) else f"{type(exc).__name__}: {exc}"
    host = socket.gethostname()
    _reported.append(exc)
    with contextlib.suppress(Exception):  # no store: nothing more to do (torchrun ends the rest)
        _store().compare_set(_FAIL_KEY, "", f"{env.node}\x00rank {env.rank} ({host}) failed: "
                             f"{what}"[:4000])
    return exc


@contextlib.contextmanager
def session(device: str = "auto") -> Any:
    """``with session(device) as env:`` :func:`setup`, then on any failure :func:`fail` (the
    other ranks are told, or this one stops quietly if another failed first), and
    :func:`teardown` on every exit."""
    env = setup(device)
    try:
        yield env
    except BaseException as e:  # tell the other ranks (or stop quietly if one failed first)
        err = fail(env, e)
        if err is e:
            raise
        raise err from None
    finally:
        teardown(env)


class _Watchdog:
    """Polls the store for another rank's failure; then stops this process.

    The main thread gets :class:`RankStopped` (through SIGUSR1) as soon as it runs Python
    again, so ``finally`` blocks remove temporary files; if it is stuck in a collective
    with the failed rank, the process exits after a grace period."""

    def __init__(self, env: DistEnv) -> None:
        self.env, self.halt, self.why = env, threading.Event(), ""
        self.main = threading.main_thread().ident
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGUSR1, self._raise)
        self.thread = threading.Thread(target=self._run, daemon=True, name="lymph-watchdog")
        self.thread.start()

    def _raise(self, *_: Any) -> None:
        raise _stopped(self.env, self.why)

    def _run(self) -> None:
        while not self.halt.wait(_POLL_S):
            why = None if _reported else _peer_failure()  # (not this rank's own failure)
            if why is None or self.halt.is_set():
                continue
            self.why = why
            if self.old is not None and self.main is not None:
                signal.pthread_kill(self.main, signal.SIGUSR1)
            if self.halt.wait(_GRACE_S):
                return
            err = _stopped(self.env, why)
            if not err.quiet:
                os.write(2, f"error: {err}\n".encode())
            os._exit(1)

    def stop(self) -> None:
        self.halt.set()
        if self.old is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, self.old)
            self.old = None


# ---- work on rank 0 --------------------------------------------------------------------------
def main_decides(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result (or its :class:`LymphError`) on every rank.

    For quick decisions (a broadcast collective): rank 0 raises its own error, the other
    ranks a quiet :class:`RankStopped`."""
    if not env.distributed:
        return fn()
    box: list[Any] = [None]
    if env.is_main:
        try:
            box = [("ok", fn())]
        except LymphError as e:
            box = [("error", str(e))]
            broadcast_object(env, box[0])
            raise
    out = broadcast_object(env, box[0])
    if out[0] == "error":
        raise RankStopped(f"rank 0: {out[1]}", quiet=True)
    return out[1]


def main_does(env: DistEnv, name: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 alone, however long it takes; its (small, picklable) result on
    every rank. The other ranks wait by polling the rendezvous store, not in a collective,
    so no process-group timeout applies; a failure of rank 0 stops them (:func:`fail`)."""
    if not env.distributed:
        return fn()
    import pickle

    key = f"lymph/done/{next(_waits)}/{name}"  # unique, even for the same work twice
    store = _store()
    if env.is_main:
        result = fn()
        store.set(key, pickle.dumps(result))
        return result
    while not store.check([key]):
        why = _peer_failure()
        if why is not None:
            raise _stopped(env, why)
        time.sleep(_POLL_S)
    return pickle.loads(store.get(key))


def check_shared_folder(env: DistEnv, folder: str | Path, what: str) -> None:
    """Refuse a run whose ranks do not all see ``folder`` as rank 0 does (no shared
    filesystem across the machines): rank 0 writes a token file there, every rank looks
    for it, and the token is removed."""
    if not env.distributed:
        return
    folder = Path(folder).resolve()
    token = None
    if env.is_main:
        token = folder / f".lymph-shared-check-{uuid.uuid4().hex}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            token.write_text(socket.gethostname())
        except OSError as e:
            token = None
            err = f"{what} {folder}: cannot write there ({e.strerror})"
        else:
            err = ""
        if token is None:
            broadcast_object(env, ("error", err))
            raise LymphError(err)
    try:
        msg = broadcast_object(env, ("ok", token.name) if token is not None else None)
        if msg[0] == "error":
            raise RankStopped(msg[1], quiet=True)
        seen = (folder / msg[1]).is_file()  # the same path, as this rank's machine sees it
        views = gather_object(env, (env.rank, socket.gethostname(), seen))
    finally:
        if token is not None:
            token.unlink(missing_ok=True)
    blind = [f"rank {r} ({h})" for r, h, s in views if not s]
    if blind:
        main_host = views[0][1]
        raise RankStopped(
            f"{what} {folder}: {', '.join(blind)} cannot see the files rank 0 ({main_host}) "
            "writes there. On several machines, --data needs the image cache's folder on a "
            "shared filesystem, mounted at the same path on every machine (NFS, Lustre, "
            "...); or ingest first (lymph ingest) and give every machine a copy of the cache "
            "at the same path with --images; see docs/cli.md", quiet=env.local_rank != 0)


def check_same_cache(env: DistEnv, path: str | Path, fingerprint: str) -> None:
    """Refuse a run whose ranks read different image caches at ``path``."""
    if not env.distributed:
        return
    views = gather_object(env, (env.rank, socket.gethostname(), fingerprint))
    odd = [f"rank {r} ({h})" for r, h, f in views if f != views[0][2]]
    if odd:
        raise RankStopped(f"{path}: the image cache of {', '.join(odd)} differs from rank 0's "
                          "(fingerprint); every machine must read the same cache",
                          quiet=env.local_rank != 0)


# ---- collectives -----------------------------------------------------------------------------
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
    dist.broadcast_object_list(box, src=0, device=env.device)
    return box[0]


def gather_object(env: DistEnv, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * env.world
    dist.all_gather_object(parts, obj)
    return parts


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
