"""Terminal output shared by the commands: a rich console on stderr for progress and
warnings, stdout left for results. Library code uses :func:`progress_bar` and the
``lymph`` logger; neither imports typer."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

_console: Any = None


def console() -> Any:
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


def setup_logging(verbose: bool = False) -> None:
    """Send the ``lymph`` logger's warnings (and info with ``verbose``) to stderr."""
    log = logging.getLogger("lymph")
    if any(getattr(h, "_lymph", False) for h in log.handlers):
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    h._lymph = True  # type: ignore[attr-defined]
    log.addHandler(h)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = True


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True,
                 **fields: Any) -> Iterator[Any]:
    """A rich progress bar; yields ``update(advance=1, **fields)``.

    Extra ``fields`` (e.g. ``loss``, ``rate``) are shown after the bar. Disabled (a no-op)
    when ``enabled`` is false or stderr is not a terminal and ``LYMPH_PROGRESS`` is unset.
    """
    import os

    show = enabled and (sys.stderr.isatty() or os.environ.get("LYMPH_PROGRESS") == "1")
    if not show:
        yield lambda advance=1, **kw: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    extra = " ".join(f"{k}={{task.fields[{k}]}}" for k in fields)
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn()]
    if extra:
        cols.append(TextColumn(extra))
    with Progress(*cols, console=console(), transient=False) as p:
        task = p.add_task(description, total=total, **fields)

        def update(advance: int = 1, **kw: Any) -> None:
            p.update(task, advance=advance, **kw)

        yield update
