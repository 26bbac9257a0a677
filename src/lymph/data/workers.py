"""Chunk jobs on all cores: a fork pool, or this process when one worker is enough."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing import get_context
from typing import Any


@contextlib.contextmanager
def chunk_results(fn: Callable[[Any], Any], jobs: Sequence[Any],
                  workers: int) -> Iterator[Iterable[Any]]:
    """``fn`` over ``jobs``, results in completion order: on a fork pool of ``workers``
    processes, or in this process for one worker or one job. Leaving the block stops the
    pool (also on an error or an interrupt)."""
    if workers > 1 and len(jobs) > 1:
        from lymph.signals import worker_init  # workers leave SIGINT/SIGTERM to this process

        with get_context("fork").Pool(min(workers, len(jobs)),
                                      initializer=worker_init) as pool:  # exit: terminate
            yield pool.imap_unordered(fn, jobs)
    else:
        yield map(fn, jobs)
