"""The registry of ``lymph compare-baselines``' models, torch-free (the CLI counts and
checks ``--models`` before torch is imported; the report reads what each model reads).

Each :class:`ModelEntry` says what the model reads (``inputs``: :data:`CLINICAL`,
:data:`IMAGES_CLINICAL` or :data:`IMAGES`), its MIL pooling (None for other models), a
one-line description, and its builder: ``build(seed, pooling) -> a fresh, unfitted
estimator`` of the stage-two contract (``"module:function"``, imported on first use, or a
callable). An entry with ``per_pooling`` stands for one model per pooling of
:func:`lymph.head.registry.comparison_poolings` (its name and description formatted with
``{pooling}``), so a new pooling joins the comparison as ``<pooling>+clinical``. The order
of registration is the report's order.

Adding a baseline: one module in ``lymph/baselines/`` with the estimator, and one
:func:`register_model` call (here, or from your own code before the comparison runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

#: Model kinds, by what they read.
CLINICAL, IMAGES_CLINICAL, IMAGES = "clinical", "images+clinical", "images"

#: Training settings of the MIL models in the comparison (speed; see :mod:`lymph.compare`).
FAST_MIL: dict[str, Any] = {"max_epochs": 30, "patience": 5, "batch_size": 64}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    inputs: str
    build: str | Callable[[int, str | None], Any]
    pooling: str | None = None
    description: str = ""
    per_pooling: bool = False
    #: reads the clinical columns when the store has them (else it is an images model)
    clinical_optional: bool = False
    #: opt-in: run only when named in ``--models``, not in the default comparison
    optional: bool = False
    #: relative time per fold (a clinical logistic regression ~0.1, a MIL head 1): orders
    #: the parallel schedule of ``compare-baselines --jobs``, most costly first; no result
    #: depends on it
    cost: float = 1.0

    def make(self, seed: int) -> Callable[[], Any]:
        """A factory of fresh, unfitted estimators with this seed."""
        build = self.build
        if isinstance(build, str):
            module, _, attr = build.partition(":")
            build = getattr(importlib.import_module(module), attr)
        return lambda: build(seed, self.pooling)  # type: ignore[operator]


_MODELS: list[ModelEntry] = []


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add (or replace, by name) a model of the comparison."""
    for i, e in enumerate(_MODELS):
        if e.name == entry.name:
            _MODELS[i] = entry
            return entry
    _MODELS.append(entry)
    return entry


def unregister_model(name: str) -> None:
    _MODELS[:] = [e for e in _MODELS if e.name != name]


def model_entries(optional: bool = False) -> list[ModelEntry]:
    """Every model of the default comparison, in report order (pooling families expanded);
    with ``optional``, the opt-in models too."""
    from lymph.head.registry import comparison_poolings

    out: list[ModelEntry] = []
    for e in _MODELS:
        if e.optional and not optional:
            continue
        if e.per_pooling:
            out += [replace(e, name=e.name.format(pooling=p), pooling=p, per_pooling=False,
                            description=e.description.format(pooling=p))
                    for p in comparison_poolings()]
        else:
            out.append(e)
    return out


def model_names(optional: bool = False) -> tuple[str, ...]:
    """The default comparison's model names (``optional``: and the opt-in ones)."""
    return tuple(e.name for e in model_entries(optional))


# ---- builders (imported lazily: torch loads when a model is made) -----------------------------
def _adaboost(seed: int, pooling: str | None) -> Any:
    from lymph.baselines import AdaBoostClinical

    return AdaBoostClinical(seed=seed, inner_folds=2)


def _logistic(seed: int, pooling: str | None) -> Any:
    from lymph.baselines import LogisticClinical

    return LogisticClinical(seed=seed)


def _mil(seed: int, pooling: str | None, **kw: Any) -> Any:
    from lymph.head.estimator import MILClassifier

    return MILClassifier(**({} if pooling is None else {"pooling": pooling}), **kw,
                         **dict(FAST_MIL, seed=seed))


def _clinical_mlp(seed: int, pooling: str | None) -> Any:
    return _mil(seed, None, images=False)


def _images_only(seed: int, pooling: str | None) -> Any:
    return _mil(seed, pooling, clinical=False)


def _moe(seed: int, pooling: str | None) -> Any:
    from lymph.baselines import MixtureOfExperts

    return MixtureOfExperts(seed=seed, max_epochs=FAST_MIL["max_epochs"],
                            patience=FAST_MIL["patience"], batch_size=FAST_MIL["batch_size"])


def _late_fusion(seed: int, pooling: str | None) -> Any:
    from lymph.baselines import LateFusion

    return LateFusion(seed=seed)


def _bag_stats_forest(seed: int, pooling: str | None) -> Any:
    from lymph.baselines.bag_stats import BagStatsForest

    return BagStatsForest(seed=seed)


def _composition(k: int | str, clinical: bool) -> Callable[[int, str | None], Any]:
    def build(seed: int, pooling: str | None) -> Any:
        from lymph.baselines.composition import CompositionFusion

        return CompositionFusion(n_prototypes=k, clinical=clinical, seed=seed)

    return build


def _multi_score(seed: int, pooling: str | None) -> Any:
    from lymph.baselines.multiscore import MultiScoreFusion

    return MultiScoreFusion(seed=seed)


def _late_fusion_composition(seed: int, pooling: str | None) -> Any:
    from lymph.baselines.multiscore import MultiScoreFusion

    return MultiScoreFusion(n_prototypes=8, seed=seed)


_HERE = "lymph.compare_models"
register_model(ModelEntry("adaboost", CLINICAL, f"{_HERE}:_adaboost", None,
                          "AdaBoost on clinical features (the report's baseline)", cost=0.2))
register_model(ModelEntry("logistic", CLINICAL, f"{_HERE}:_logistic", None,
                          "logistic regression on clinical features", cost=0.1))
register_model(ModelEntry("clinical-mlp", CLINICAL, f"{_HERE}:_clinical_mlp", None,
                          "MLP on clinical features", cost=0.2))
register_model(ModelEntry("{pooling}+clinical", IMAGES_CLINICAL, f"{_HERE}:_mil", None,
                          "MIL head, {pooling} pooling, with clinical features",
                          per_pooling=True))  # cost 1: the unit
register_model(ModelEntry("attention-images-only", IMAGES, f"{_HERE}:_images_only", "attention",
                          "MIL head, attention pooling, images only"))
register_model(ModelEntry("mixture-of-experts", IMAGES_CLINICAL, f"{_HERE}:_moe", "attention",
                          "mixture of an image and a clinical expert"))
register_model(ModelEntry("late-fusion", IMAGES_CLINICAL, f"{_HERE}:_late_fusion", None,
                          "late fusion: pooled image score + clinical, logistic", cost=1.5))
# issue 17: does attention earn its place?
register_model(ModelEntry("bag-stats-forest", IMAGES_CLINICAL, f"{_HERE}:_bag_stats_forest", None,
                          "random forest (500 trees) on per-bag [mean, max, min] (+ clinical "
                          "columns)", clinical_optional=True, cost=4.0))
# issue 18: cell composition (k-means prototypes fitted in each training fold, K chosen with C
# by inner CV from 4, 8, 16) and several image scores; all but composition+clinical are opt-in
for _name, _k, _clin, _opt in (("composition+clinical", "auto", True, False),
                               ("composition4+clinical", 4, True, True),
                               ("composition8+clinical", 8, True, True),
                               ("composition16+clinical", 16, True, True),
                               ("composition-images-only", "auto", False, True)):
    register_model(ModelEntry(
        _name, IMAGES_CLINICAL if _clin else IMAGES, _composition(_k, _clin), None,
        "cell composition: log proportions of "
        + ("K k-means prototypes (K of 4, 8, 16 chosen by inner CV)" if _k == "auto"
           else f"{_k} k-means prototypes")
        + (" + clinical, logistic" if _clin else ", logistic (no clinical)"), optional=_opt,
        cost=3.0 if _k == "auto" else 1.0))  # auto: 3 k-means fits and 3 x the inner CV
register_model(ModelEntry("multi-score+clinical", IMAGES_CLINICAL, f"{_HERE}:_multi_score", None,
                          "late fusion with one pooled score per feature block of a "
                          "concatenated store", optional=True))
register_model(ModelEntry("late-fusion+composition", IMAGES_CLINICAL,
                          f"{_HERE}:_late_fusion_composition", None,
                          "late fusion (one score per feature block) + 8-prototype cell "
                          "composition", optional=True))
