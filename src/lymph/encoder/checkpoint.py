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
    _check_finite(path, ckpt, "")
    return ckpt


def _check_finite(path: Path, ckpt: dict[str, Any], where: str) -> None:
    """Refuse weights that are not finite numbers (a diverged training, a damaged file):
    they would turn every cell's embedding, hence every prediction, into NaN. Also the
    parts of a combined checkpoint."""
    model = ckpt.get("model")
    if isinstance(model, dict):
        for name, t in model.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise LymphError(
                        f"{path}: '{where}model': tensor {name!r} holds {bad} NaN or infinite "
                        "value(s), expected finite weights (a diverged training? retrain with "
                        "`lymph embed`)")
    norm = ckpt.get("normalisation")
    if isinstance(norm, dict):
        import math

        for key in ("mean", "std"):
            vals = norm.get(key)
            if isinstance(vals, (list, tuple)) and any(
                    isinstance(v, float) and not math.isfinite(v) for v in vals):
                raise LymphError(f"{path}: '{where}normalisation.{key}': expected finite "
                                 f"numbers, got {list(vals)}")
    for i, part in enumerate(ckpt.get("parts") or []):
        if isinstance(part, dict) and isinstance(part.get("checkpoint"), dict):
            _check_finite(path, part["checkpoint"], f"{where}parts.{i}.checkpoint.")
