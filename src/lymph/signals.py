"""SIGINT, SIGTERM and SIGHUP: end a command cleanly, with one line ``interrupted``.

:func:`trap_signals` turns SIGTERM and SIGHUP (the terminal or the SSH session closed) into
:class:`Terminated` (a ``KeyboardInterrupt``), so every ``finally`` and ``except
BaseException`` on the way out runs as it does for Ctrl-C: temporaries are removed, pools
are stopped, the previous artifact stays. The CLI prints ``interrupted`` and exits 130
(SIGINT), 143 (SIGTERM) or 129 (SIGHUP), 128 + the signal's number as shells do. Pool
workers call :func:`worker_init`: they leave the signals to their parent (which stops them)
and die with it if it is killed outright.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like ``KeyboardInterrupt``;
    ``exit_code`` is 128 + the signal's number."""

    exit_code = 143

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.exit_code = 128 + int(signum)


#: The signals :func:`trap_signals` turns into :class:`Terminated` (SIGHUP: not on Windows).
TRAPPED = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _on_signal(signum: int, frame: object) -> None:
    for s in TRAPPED:  # a second one (of either kind) does not cut the cleanup
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def trap_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` inside the block (main thread only).
    A signal the caller ignores (``nohup`` ignores SIGHUP) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for s in TRAPPED:
        prev = signal.getsignal(s)
        if s != signal.SIGTERM and prev is signal.SIG_IGN:
            continue  # nohup: the user asked to survive the hang-up
        old[s] = signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, prev in old.items():
            signal.signal(s, prev)


def worker_init() -> None:
    """Pool worker: ignore SIGINT (the parent handles Ctrl-C and stops the pool), die
    quietly on SIGTERM, and get SIGTERM when the parent dies (Linux)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # sent to the whole group too: the parent stops the pool
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
