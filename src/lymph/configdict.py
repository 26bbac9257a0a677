"""Settings dataclasses to and from JSON-able dicts, in one place: tuple fields become lists
(JSON and checkpoints hold lists) and come back as tuples. Used by every config that a
checkpoint or a model directory stores (AEConfig, ContrastiveConfig, WeakConfig, HeadConfig).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def _tuple_fields(cls: type) -> list[str]:
    # annotations are strings under ``from __future__ import annotations``
    return [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if str(f.type).startswith(("tuple", "Tuple"))]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``asdict(cfg)`` with every tuple field as a list (field order kept)."""
    d = dataclasses.asdict(cfg)
    for k in _tuple_fields(type(cfg)):
        d[k] = list(d[k])
    return d


def config_from_dict(cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**d)`` with the tuple fields given as lists turned back into tuples (a field
    missing from ``d`` takes its default)."""
    d = dict(d)
    for k in _tuple_fields(cls):
        if k in d:
            d[k] = tuple(d[k])
    return cls(**d)
