"""Range checks with one message format: ``NAME: expected ALLOWED, got VALUE``.

Used for every numeric option (the CLI, before anything heavy is imported), every
pipeline setting and every number read from a model directory. Library callers name the
setting (``crop``, ``head.folds``), the CLI names its flag (``--crop``).
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path
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


def module_constant(module: str, name: str) -> Any:
    """A literal constant of a lymph module, read from its source without importing it
    (so the CLI can check a name against a registry before torch is imported). None when
    it cannot be read that way."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return None
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (ImportError, OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            if isinstance(t, ast.Name) and t.id == name and node.value is not None:
                try:
                    return ast.literal_eval(node.value)
                except ValueError:
                    return None
    return None


def _module_tree(module: str) -> ast.Module | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            return None
        return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (ImportError, OSError, SyntaxError, ValueError):
        return None


def registered_names(module: str, modules_constant: str) -> list[str] | None:
    """Names registered with ``register(SomeClass())`` at module level of ``module`` and of
    the modules its literal ``modules_constant`` lists, each class's ``name`` attribute
    read from the source (torch is never imported). None when the sources cannot be read
    that way (the library's own check then answers)."""
    extra = module_constant(module, modules_constant)
    names: list[str] = []
    for mod in [module, *(extra if isinstance(extra, (tuple, list)) else [])]:
        tree = _module_tree(str(mod))
        if tree is None:
            return None
        classes: dict[str, str] = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    target = (item.target if isinstance(item, ast.AnnAssign) else
                              item.targets[0] if isinstance(item, ast.Assign) else None)
                    if isinstance(target, ast.Name) and target.id == "name" and isinstance(
                            getattr(item, "value", None), ast.Constant):
                        classes[node.name] = str(item.value.value)  # type: ignore[union-attr]
        for call in ast.walk(tree):  # register(X()) anywhere, also inside functions
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id == "register"):
                continue
            arg = call.args[0] if call.args else None
            if not (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name)
                    and arg.func.id in classes):
                return None  # registered some other way: no early check
            names.append(classes[arg.func.id])
    return names or None
