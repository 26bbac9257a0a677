"""Range checks with one message format: ``NAME: expected ALLOWED, got VALUE``.

Used for every numeric option (the CLI, before anything heavy is imported), every
pipeline setting and every number read from a model directory. Library callers name the
setting (``crop``, ``head.folds``), the CLI names its flag (``--crop``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from lymph.errors import LymphError


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An integer in ``[lo, hi]`` (either bound optional)."""
    if lo is not None and hi is not None:
        allowed = f"an integer from {lo} to {hi}"
    elif lo is not None:
        allowed = f"an integer >= {lo}"
    elif hi is not None:
        allowed = f"an integer <= {hi}"
    else:
        allowed = "an integer"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and (not math.isfinite(value) or value != int(value))):
        raise LymphError(f"{name}: expected {allowed}, got {_fmt(value)}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise LymphError(f"{name}: expected {allowed}, got {_fmt(value)}")
    return v


def check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite number in the interval given by ``lo``/``hi`` (open ends with ``*_open``)."""
    if lo is not None and hi is not None:
        allowed = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        allowed = f"a number {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        allowed = f"a number {'<' if hi_open else '<='} {hi}"
    else:
        allowed = "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LymphError(f"{name}: expected {allowed}, got {_fmt(value)}")
    v = float(value)
    bad = not math.isfinite(v)
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        raise LymphError(f"{name}: expected {allowed}, got {_fmt(value)}")
    return v


def check_choice(name: str, value: Any, choices: list[str] | tuple[str, ...]) -> str:
    if value not in choices:
        raise LymphError(f"{name}: expected one of {', '.join(choices)}, got {_fmt(value)}")
    return str(value)


def check_device(name: str, value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a GPU index)."""
    v = str(value)
    if v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", v):
        return v
    raise LymphError(f"{name}: expected one of auto, cpu, cuda, cuda:N, got {_fmt(value)}")


def check_threshold(name: str, value: Any) -> str | float:
    """'inner' or a number in (0, 1)."""
    if value == "inner":
        return "inner"
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise LymphError(f"{name}: expected 'inner' or a number in (0, 1), got {_fmt(value)}") from None
    if not (math.isfinite(t) and 0.0 < t < 1.0):
        raise LymphError(f"{name}: expected 'inner' or a number in (0, 1), got {_fmt(value)}")
    return t


def check_channels(name: str, value: Any) -> tuple[int, ...]:
    """Convolution widths: 1 to 6 integers, each from 1 to 1024 (``--channels 32,64,128``)."""
    vals = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not 1 <= len(vals) <= 6 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024 for v in vals):
        raise LymphError(f"{name}: expected 1 to 6 comma-separated integers from 1 to 1024, got "
                         f"{','.join(map(_fmt, vals)) or 'none'}")
    return vals
