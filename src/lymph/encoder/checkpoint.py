"""Encoder checkpoints: everything needed to embed new images, and to resume training.

A checkpoint is a ``torch.save`` dict of tensors and plain Python values only, so it loads
with ``torch.load(..., weights_only=True)`` (no pickled code runs on load)::

    format, version     "lymph-encoder", 1
    method              registry name ("ae")
    model_config        the method's config dict (dim, size, channels, ...)
    train_config        the TrainConfig dict (epochs, batch_size, lr, seed, ...)
    normalisation       {"mean": [3 floats], "std": [3 floats]} on [0, 1] pixels
    cache               {"size": int, "crop": int | None}: how to ingest new images
    data_fingerprint    fingerprint of the image cache it was trained on
    lymph_version       version that wrote it
    epoch               epochs completed; losses: mean training loss of each
    model               state_dict; optimizer: state_dict (for --resume)

No timing is stored, so the same data, settings and seed give the same bytes on the CPU.

Written atomically (temporary file, then rename) after every epoch.

A *combined* checkpoint (``lymph embed --method contrastive+morphometry``, method
``"A+B"``) also has ``parts``: per part, in column order, its ``method``, the ``cache``
settings it was computed on, and either ``checkpoint`` (a trained part's checkpoint
dict, less the optimiser) or its settings (morphometry). See :mod:`lymph.encoder.combine`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lymph.atomic import atomic_path
from lymph.errors import LymphError

FORMAT = "lymph-encoder"
VERSION = 1
REQUIRED = ("method", "model_config", "normalisation", "cache", "data_fingerprint", "model")


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **ckpt}, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint (``weights_only=True``); tensors land on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise LymphError(f"{path}: encoder checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for foreign or broken files
        raise LymphError(
            f"{path}: not a loadable encoder checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise LymphError(f"{path}: 'format': expected {FORMAT!r}, got {got!r} (not a lymph encoder)")
    if ckpt.get("version") != VERSION:
        raise LymphError(
            f"{path}: checkpoint version {ckpt.get('version')!r}; this lymph reads {VERSION}. "
            "Upgrade lymph, or retrain with `lymph embed`."
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise LymphError(f"{path}: checkpoint lacks field(s) {', '.join(missing)}")
    _check_finite(path, ckpt)
    return ckpt


def _check_finite(path: Path, ckpt: dict[str, Any]) -> None:
    """Refuse weights that are not finite numbers (a diverged training, a damaged file):
    they would turn every cell's embedding, hence every prediction, into NaN. The model's
    tensors and those of a combined checkpoint's parts (:func:`lymph.finite.check_state`),
    and the normalisation values."""
    import math

    from lymph.finite import check_state

    check_state({k: ckpt[k] for k in ("model", "parts") if k in ckpt}, path)
    norm = ckpt.get("normalisation")
    for key in ("mean", "std"):
        vals = norm.get(key) if isinstance(norm, dict) else None
        if isinstance(vals, (list, tuple)) and any(
                isinstance(v, float) and not math.isfinite(v) for v in vals):
            raise LymphError(f"{path}: 'normalisation.{key}': expected finite numbers, got "
                             f"{list(vals)}")
