"""``lymph ls``: the cached stage outputs, with the data each was made from and its
settings in words (a placeholder such as ``lr = 0`` for "the method's default" is shown as
``lr=default``, never as a value)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: settings whose 0 / None means "the method's default" or "none", not a value
_DEFAULT_WHEN_ZERO = {"dim", "epochs", "batch_size", "lr"}


def describe_settings(settings: dict[str, Any]) -> str:
    """A stage's settings for ``lymph ls``: placeholders said in words (``lr=default``,
    ``crop=none``), never as values that read as real ones (``lr=0.0``, ``crop=None``)."""
    parts = []
    for k, v in settings.items():
        if k in _DEFAULT_WHEN_ZERO and not v:
            v = "default"
        elif (k == "crop" and not v) or v is None:
            v = "none"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


def ls_rows(artifacts: str | Path) -> list[dict[str, Any]]:
    """:func:`lymph.pipeline.stages.list_stages` plus each stage's data (path, or synthetic)."""
    import json

    from lymph.pipeline.stages import MANIFEST, list_stages

    rows = list_stages(artifacts)
    for r in rows:
        try:
            d = json.loads((Path(r["path"]) / MANIFEST).read_text(encoding="utf-8"))["config"]["data"]
            r["data"] = "synthetic" if d.get("synth") else str(d.get("path") or "")
        except (OSError, ValueError, KeyError, TypeError):
            r["data"] = ""
        r["settings_text"] = describe_settings(r["settings"])
    return rows
