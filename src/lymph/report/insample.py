"""Which patients a saved model trained on, so that ``predict`` and ``explain`` can say that
their result is in-sample (optimistic: the model has seen the patient's label).

A model directory records its training store (path and fingerprint, ``model.json``); the
final model is fitted on every labelled patient of that store. When the store is still there
with the same fingerprint, its labelled patient ids are the training patients; when it is not,
a prediction store with the training store's fingerprint is the training store itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def training_ids(model_dir: str | os.PathLike[str], store_path: str | os.PathLike[str] | None = None
                 ) -> set[str] | None:
    """The model's training patient ids, or None when they cannot be known."""
    from lymph.errors import LymphError
    from lymph.head.modeldir import load_model
    from lymph.store import open_store

    meta = load_model(model_dir).meta.get("store", {})
    fp = meta.get("fingerprint")
    for cand in (meta.get("path"), store_path):
        if not cand or not Path(cand).is_file():
            continue
        try:
            s = open_store(cand)
        except (LymphError, OSError):
            continue
        if fp is not None and s.fingerprint == fp:
            return {str(i) for i in np.asarray(s.ids)[s.labelled()]}
    return None


def in_sample_note(ids: list[str], train: set[str] | None, what: str) -> str | None:
    """A one-line note when some of ``ids`` are training patients (None otherwise)."""
    if not train:
        return None
    hit = [i for i in ids if i in train]
    if not hit:
        return None
    if len(ids) == 1:
        return (f"note: {hit[0]} is one of the model's training patients (same id): this "
                f"{what} is in-sample (optimistic); its out-of-fold probability is in the "
                "report / fit-head --oof")
    return (f"note: {len(hit)} of {len(ids)} patients are the model's training patients (same "
            f"ids): their {what} is in-sample (optimistic); their out-of-fold probabilities "
            "are in the report / fit-head --oof")
