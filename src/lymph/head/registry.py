"""Stage two's registries, torch-free (the CLI and the pipeline check names against them
before torch is imported): the MIL **poolings** and the **estimators** a model directory
may hold.

A pooling entry names its builder (``"module:callable"``, imported on first use, or a
callable): ``builder(dim, hidden) -> nn.Module`` whose ``forward(x (B, N, D), mask (B, N))``
returns ``(pooled (B, out_dim), weights (B, N))`` (``out_dim`` attribute when it is not
``D``), padded positions never counting. ``compare_rank`` places the pooling's
``<name>+clinical`` model in ``lymph compare-baselines``' default set (None: not there).

An estimator entry names its class (``"module:Class"``) and how the model directory keeps
its fitted state: ``"weights"`` (a torch head: ``head.pt``, scalers, HeadConfig) or
``"json"`` (``to_json()`` / ``from_json(state)``, no weights).

Adding a pooling: one module with the ``nn.Module`` and one :func:`register_pooling` call
(here, or from your own code before the name is used).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lymph.errors import LymphError


def _resolve(target: str | Callable[..., Any]) -> Any:
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---- poolings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolingSpec:
    name: str
    builder: str | Callable[..., Any]
    help: str
    compare_rank: int | None = None


POOLINGS: dict[str, PoolingSpec] = {}


def register_pooling(spec: PoolingSpec) -> PoolingSpec:
    POOLINGS[spec.name] = spec
    return spec


register_pooling(PoolingSpec("attention", "lymph.head.pooling:AttentionPool",
                             "Ilse et al. 2018", compare_rank=3))
register_pooling(PoolingSpec("gated", "lymph.head.pooling:GatedAttentionPool",
                             "gated attention, Ilse et al. 2018", compare_rank=4))
register_pooling(PoolingSpec("mean", "lymph.head.pooling:mean_pool", "", compare_rank=1))
register_pooling(PoolingSpec("max", "lymph.head.pooling:max_pool", "per-feature maximum",
                             compare_rank=2))
# not in the comparison's default set (issue 17 compared it on its own: docs/results.md)
register_pooling(PoolingSpec("dsmil", "lymph.head.pooling:DSMILPool",
                             "dual stream: max-instance score + attention anchored on it"))


def pooling_names() -> tuple[str, ...]:
    """Every pooling, in registration order."""
    return tuple(POOLINGS)


def check_pooling(name: Any, setting: str = "pooling") -> str:
    if name not in POOLINGS:
        raise LymphError(f"{setting}: expected one of {', '.join(POOLINGS)}, got {name!r}")
    return str(name)


def build_pooling(name: str, dim: int, hidden: int = 128) -> Any:
    """The pooling module ``name`` for ``dim``-wide instances."""
    return _resolve(POOLINGS[check_pooling(name)].builder)(dim, hidden)


def comparison_poolings() -> list[str]:
    """The poolings of the comparison's ``<pooling>+clinical`` models, in report order."""
    ranked = [(s.compare_rank, n) for n, s in POOLINGS.items() if s.compare_rank is not None]
    return [n for _, n in sorted(ranked)]


def pooling_help() -> str:
    return ", ".join(f"{n} ({s.help})" if s.help else n for n, s in POOLINGS.items()) + "."


# ---- estimators of a model directory --------------------------------------------------------
@dataclass(frozen=True)
class EstimatorSpec:
    name: str  # the class name, as model.json's "estimator" records it
    cls: str | type
    #: "weights": a torch head (head.pt, scalers, HeadConfig); "json": ``to_json()`` /
    #: ``from_json(state)`` kept in model.json under ``state_key``
    state: str
    #: the ``fit-head --fusion`` value that fits it (None: not a fit-head model)
    fusion: str | None = None
    state_key: str | None = None


ESTIMATORS: dict[str, EstimatorSpec] = {}


def register_estimator(spec: EstimatorSpec) -> EstimatorSpec:
    ESTIMATORS[spec.name] = spec
    return spec


register_estimator(EstimatorSpec("MILClassifier", "lymph.head.estimator:MILClassifier",
                                 "weights", fusion="concat"))
register_estimator(EstimatorSpec("LateFusion", "lymph.baselines.late_fusion:LateFusion", "json",
                                 fusion="late", state_key="late_fusion"))
register_estimator(EstimatorSpec("CompositionFusion", "lymph.baselines.composition:CompositionFusion",
                                 "json", fusion="composition", state_key="composition"))


def estimator_spec(name: Any, where: str = "estimator") -> EstimatorSpec:
    if name not in ESTIMATORS:
        expected = " or ".join(repr(n) for n in ESTIMATORS)
        raise LymphError(f"{where}: expected {expected}, got {name!r}")
    return ESTIMATORS[name]


def estimator_class(name: str) -> Any:
    return _resolve(estimator_spec(name).cls)


def fusion_names() -> tuple[str, ...]:
    return tuple(s.fusion for s in ESTIMATORS.values() if s.fusion is not None)


def fusion_estimator(fusion: Any, setting: str = "fusion") -> EstimatorSpec:
    """The estimator that ``fit-head --fusion FUSION`` fits."""
    for s in ESTIMATORS.values():
        if s.fusion is not None and s.fusion == fusion:
            return s
    raise LymphError(f"{setting}: expected one of {', '.join(fusion_names())}, got {fusion!r}")
