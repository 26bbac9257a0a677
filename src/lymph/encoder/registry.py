"""The stage-one method registry: every ``lymph embed --method`` and what the rest of the
code reads of it. Torch-free: the CLI and the pipeline check a method name against it
before torch is imported (a typo answers in well under a second).

Each entry is a :class:`MethodSpec`: its name, the module that builds it (imported only
when the method is used), and the facts the training loop, the embedding pass, the
combinations and ``lymph predict`` read (``needs_labels``, ``default_size``,
``default_crop``, ``train_defaults``, ``feature_columns``, ``loss_name``, ``min_batch``).
The builder module defines ``METHOD``, an object with

- ``config_cls`` (a dataclass with at least ``dim`` and ``size`` fields and
  ``to_dict`` / ``from_dict``);
- ``build(config) -> nn.Module``;
- ``loss(model, batch, normalise[, targets]) -> scalar tensor``: ``batch`` is the uint8
  ``(B, 3, S, S)`` batch already on the device; ``normalise`` is a
  :class:`lymph.encoder.preprocess.Preprocess` (call it to get the normalised float batch,
  ``normalise.augment(batch)`` for a random view); ``targets`` (``(B, 2)``: label, weight)
  only when the entry ``needs_labels``. ``model`` may be wrapped by DistributedDataParallel;
- ``features(model, x) -> (B, D)``: ``x`` normalised, ``model`` the bare module in eval
  mode, under ``torch.no_grad``.

A method without a network (``morphometry``: ``trainable`` false) has no builder but a
``writer`` of its store and the ``version`` of its features (``lymph embed``, the pipeline
and ``predict --data`` call the writer; a model refuses features of another version). ``A+B`` (e.g. ``contrastive+morphometry``)
combines methods that do not need labels (:mod:`lymph.encoder.combine`).

Adding a method: one module under ``lymph/encoder/methods/`` defining ``METHOD``, and one
:func:`register_method` call below (or from a plugin, before the name is used).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from lymph.errors import LymphError

#: the loss curve's y label for a method that names none
MSE = "reconstruction MSE (normalised pixels)"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    #: module defining ``METHOD`` (None: no network, see ``trainable``)
    module: str | None
    #: one line for ``lymph embed --help``
    help: str
    trainable: bool = True
    #: trained from patient labels: fold scorers, a fold-safe store (``--folds``)
    needs_labels: bool = False
    #: how ``lymph embed --data`` ingests for it (``--images`` uses the cache as it is)
    default_size: int = 112
    default_crop: int | None = None
    #: TrainConfig defaults of the method, ``(field, value)`` pairs; the settings override
    train_defaults: tuple[tuple[str, Any], ...] = ()
    #: fixed feature column names of its store (None: numbered columns)
    feature_columns: tuple[str, ...] | None = None
    loss_name: str = MSE
    #: the smallest batch ``loss`` accepts; a shorter last batch joins the one before it
    min_batch: int = 1
    #: without a network: ``"module:function"`` writing the store, ``(cache, out, progress=None)``
    writer: str | None = None
    #: ``"module:CONSTANT"``: the version of its features, recorded in the store's
    #: provenance as ``<name>_version`` (a model refuses other versions' features)
    version: str | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


register_method(MethodSpec(
    "ae", "lymph.encoder.methods.ae", "train the autoencoder",
))
register_method(MethodSpec(
    "contrastive", "lymph.encoder.methods.contrastive",
    "SimCLR, 64 px of a 160 px centre crop",
    # the cell fills the middle ~112 px of the 224 px images; a 160 px crop keeps it whole
    # with room for the zoom and shift augmentations, and 64 px (2.5x down) keeps nucleus
    # shape and size at a quarter of the cost of 112 px
    default_size=64, default_crop=160,
    # Budget: the dev set (10,850 cells) in about 30 minutes on the shared 2-core CPU.
    # Measured there (bf16, two views, forward + backward; docs/benchmarks.md) 70 cells/s
    # on average while three other jobs shared the cores (15 epochs: 39 min) and 478
    # cells/s idle (15 epochs: 6 min); 15 epochs keeps a shared machine near 30 min. Batch
    # 256 gives 510 negatives per view (NT-Xent improves with more negatives, and a CPU
    # wastes less time per image in large batches) and still 42 updates per epoch; Adam at
    # 1e-3, with a little weight decay as in SimCLR.
    train_defaults=(("epochs", 15), ("batch_size", 256), ("lr", 1e-3), ("weight_decay", 1e-6)),
    loss_name="NT-Xent loss",
    # NT-Xent needs two images (four views) per batch (lymph.encoder.train.epoch_plan)
    min_batch=2,
))
register_method(MethodSpec(
    "weak", "lymph.encoder.methods.weak",
    "cell scorer trained from patient labels, fold-safe; see --folds",
    needs_labels=True,
    # the 112 px centre, resized to 64 px
    default_size=64, default_crop=112,
    # docs/weak-supervision.md: 6 epochs of batch 128 at lr 1e-3 (Adam), weight decay 1e-4
    train_defaults=(("epochs", 6), ("batch_size", 128), ("lr", 1e-3), ("weight_decay", 1e-4)),
    feature_columns=("logit", "prob"),
    loss_name="class-balanced BCE",
))
register_method(MethodSpec(
    "morphometry", None, "no training", trainable=False,
    # the whole 224 px image at 112 px: its features were designed there (docs/morphometry.md)
    default_size=112, default_crop=None,
    writer="lymph.encoder.methods.morphometry:write_morphometry_store",
    version="lymph.encoder.methods.morphometry:MORPHOMETRY_VERSION",
))


def method_names() -> list[str]:
    """Every single method, sorted."""
    return sorted(METHODS)


def is_combination(name: str) -> bool:
    return "+" in name


def combinable() -> list[str]:
    """The methods that may be parts of ``A+B`` (not those trained from labels)."""
    return [n for n in method_names() if not METHODS[n].needs_labels]


def expected_methods() -> str:
    return f"one of {', '.join(method_names())}, or methods joined by '+' (e.g. contrastive+morphometry)"


def parts_of(name: str, setting: str = "method") -> list[str]:
    """The part names of ``A+B``; each a registered method that needs no labels."""
    parts = [p.strip() for p in name.split("+")]
    if len(parts) < 2 or any(not p for p in parts) or len(set(parts)) != len(parts):
        raise LymphError(f"{setting}: expected distinct methods joined by '+' "
                         f"(e.g. contrastive+morphometry), got {name!r}")
    for p in parts:
        spec = method_spec(p, setting)
        if spec.needs_labels:
            raise LymphError(f"{setting}: {p} is trained from labels (fold-safe stores of its "
                             f"own), got {name!r}; combine its store with `lymph store concat`")
    return parts


def method_spec(name: str, setting: str = "method") -> MethodSpec:
    """The entry of a single method (``setting`` names the option in the error)."""
    if name not in METHODS:
        raise LymphError(f"{setting}: expected {expected_methods()}, got {name!r}")
    return METHODS[name]


def check_method(name: str, setting: str = "method") -> str:
    """A known method or combination (torch-free)."""
    if is_combination(name):
        parts_of(name, setting)
    else:
        method_spec(name, setting)
    return name


def get_method(name: str, setting: str = "method") -> Any:
    """The method's builder object (``METHOD`` of its module, imported now)."""
    spec = method_spec(name, setting)
    if spec.module is None:
        raise LymphError(f"{setting}: {name} computes features without a network")
    return importlib.import_module(spec.module).METHOD


def resolve(target: str) -> Any:
    """``"module:attr"`` imported now."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def help_text() -> str:
    """``lymph embed --method`` help, from the registry."""
    singles = ", ".join(f"{n} ({METHODS[n].help})" for n in method_names())
    return (f"{singles}, or A+B of those without labels (e.g. contrastive+morphometry: both "
            "feature blocks in one store).")
