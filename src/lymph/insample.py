"""Is a store's cross-validation honest? Labelled patients scored in-sample (issue 18).

A label-trained stage one (``--method weak``) writes a fold-safe store with ``--folds K``:
every labelled patient's rows come from a scorer that did not train on it (provenance
``weak_folds``, ``/patients/scorer``; :func:`lymph.encoder.weak_checks.check_fold_safety`). The same
method used through ``lymph embed --encoder CKPT`` or ``lymph predict --data`` scores every
patient with one scorer (``-1``), which trained on all labelled patients: cross-validating
stage two on such a store measures how well the scorer remembers its training labels.

:func:`in_sample_reason` finds such stores, also inside ``lymph store concat`` stores (each
source's provenance is checked; the concat carries the weak source's ``/patients/scorer``).
:func:`check_in_sample` refuses them (``fit-head``, ``compare-baselines``) or, with
``allow`` (``--allow-in-sample``), returns the warning that the outputs carry.

The check reads only the store (no torch, no checkpoints): cheap enough for every run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lymph.errors import LymphError

#: Stage-one methods trained from patient labels. A store's provenance may also say
#: ``"label_trained": true`` for methods added later.
LABEL_TRAINED_METHODS = frozenset({"weak"})

#: What the outputs say about a store that was allowed through with ``--allow-in-sample``.
WARNING = ("IN-SAMPLE: labelled patients of this store were scored by a label-trained "
           "encoder that trained on them ({reason}); every cross-validated figure that uses "
           "images is optimistic and must not be reported as an estimate")


def block_provenances(prov: dict[str, Any]) -> list[dict[str, Any]]:
    """The provenance of every feature block: the store's own, or each concat source's."""
    if prov.get("method") == "concat":
        out: list[dict[str, Any]] = []
        for src in prov.get("sources") or []:
            out.extend(block_provenances((src or {}).get("provenance") or {}))
        return out
    return [prov]


def is_label_trained(prov: dict[str, Any]) -> bool:
    return (prov.get("method") in LABEL_TRAINED_METHODS or bool(prov.get("weak_folds"))
            or prov.get("label_trained") is True)


def in_sample_reason(store: Any) -> str | None:
    """Why the store's labelled patients are scored in-sample, or None when they are not
    (no label-trained block, or every label-trained block is fold-safe)."""
    if store.labelled().size == 0:
        return None
    where = str(store.path or "store")
    for comp in block_provenances(store.provenance or {}):
        if not is_label_trained(comp):
            continue
        method = comp.get("method", "?")
        if not comp.get("weak_folds"):
            return (f"{where}: the {method!r} features of every patient come from one "
                    "label-trained scorer (no fold-safe 'weak_folds' in the provenance: made "
                    "with `lymph embed --encoder` or `lymph predict --data`)")
        if store.patient_scorer is None:
            return (f"{where}: the {method!r} features record fold-safe folds but "
                    "/patients/scorer is missing")
        from lymph.encoder.weak_checks import check_fold_safety

        try:
            check_fold_safety(replace(store, provenance=comp), checkpoints=False)
        except LymphError as e:
            return str(e)
    return None


def check_in_sample(store: Any, *, allow: bool = False, images: bool = True,
                    flag: str = "--allow-in-sample") -> str | None:
    """Raise :class:`LymphError` when the store's labelled patients were scored in-sample
    by a label-trained encoder and ``images`` are used; with ``allow`` return the warning
    instead. None when the store is clean (or ``images`` is False: clinical-only models
    never read the scores)."""
    if not images:
        return None
    reason = in_sample_reason(store)
    if reason is None:
        return None
    if not allow:
        raise LymphError(f"{reason}; cross-validation on it would leak labels. Make a "
                         f"fold-safe store (`lymph embed --method weak --folds K`), or pass "
                         f"{flag} to run anyway with every output marked in-sample")
    return WARNING.format(reason=reason)
