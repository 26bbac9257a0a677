"""Finiteness checks of trained numbers: a diverged training is an error, never an artifact.

:func:`check_epoch` is called by the encoder's training loop after every epoch (before the
epoch's checkpoint is saved); :func:`check_state` by every reader of saved weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lymph.errors import LymphError


class Diverged(LymphError):
    """Training produced a non-finite loss or weights."""


def _bad_tensors(state: Any) -> list[str]:
    """Names of tensors holding NaN or infinity in a (possibly nested) state dict."""
    import torch

    bad: list[str] = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad.append(prefix)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, (list, tuple)):
            for k, x in enumerate(v):
                walk(f"{prefix}[{k}]", x)

    walk("", state)
    return bad


def check_epoch(loss: float, epoch: int, model: Any, checkpoint: str | Path | None = None, *,
                fresh: bool = True, is_main: bool = True) -> None:
    """Raise :class:`Diverged` naming ``epoch`` and ``loss`` when the epoch's mean loss or
    any weight of ``model`` is not finite. A checkpoint this run wrote (``fresh``: not a
    resumed run) is removed with it, so no artifact of the diverged run is left."""
    params = _bad_tensors(dict(model.state_dict())) if model is not None else []
    if math.isfinite(loss) and not params:
        return
    if fresh and is_main and checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    what = f"loss {loss!r}" + (f", non-finite weights in {', '.join(params[:3])}" if params else "")
    raise Diverged(f"training diverged at epoch {epoch}: {what}; nothing was saved. Lower "
                   "the learning rate (lr) or check the input images.")


def check_state(state: Any, where: str | Path) -> None:
    """Refuse saved weights holding NaN or infinity (naming the tensor)."""
    bad = _bad_tensors(state)
    if bad:
        raise LymphError(f"{where}: tensor {bad[0]} holds NaN or infinite values"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                         + ": a diverged or corrupted model; refused")
