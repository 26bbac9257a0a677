"""SIGINT and SIGTERM: end a command cleanly, with one line ``interrupted``.

:func:`trap_signals` turns SIGTERM into :class:`Terminated` (a ``KeyboardInterrupt``), so
every ``finally`` and ``except BaseException`` on the way out runs as it does for Ctrl-C:
temporaries are removed, pools are stopped, the previous artifact stays. The CLI prints
``interrupted`` and exits 130 (SIGINT) or 143 (SIGTERM). Pool workers call
:func:`worker_init`: they leave the signals to their parent (which stops them) and die
with it if it is killed outright.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like ``KeyboardInterrupt``."""

    exit_code = 143


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one does not cut the cleanup
    raise Terminated()


@contextlib.contextmanager
def trap_signals() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def worker_init() -> None:
    """Pool worker: ignore SIGINT (the parent handles Ctrl-C and stops the pool), die
    quietly on SIGTERM, and get SIGTERM when the parent dies (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
