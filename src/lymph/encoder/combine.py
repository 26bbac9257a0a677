"""Combined stage one: ``lymph embed --method A+B`` (e.g. ``contrastive+morphometry``).

Each part is computed on its own image cache (a trained method at its ``default_size`` /
``default_crop``, morphometry on the whole image at 112 px, the resolution its features
were designed on: ``docs/morphometry.md``), into its own store beside the output
(``OUT.<part>.h5``), and the parts are put side by side with
:func:`lymph.store_ops.concat_stores` (columns ``con:0``, ..., ``morph:nucleus_area``, ...).
With ``--images CACHE`` every part uses that one cache as it is.

So that ``lymph predict --data`` recomputes the same features, the combination writes one
*combined checkpoint* ``OUT.encoder.pt`` (a lymph-encoder checkpoint with ``method``
``"A+B"`` and ``parts``: each trained part's whole checkpoint, less the optimiser state,
and each untrained part's settings, every part with the cache settings it was computed
on). The combined store names it as its ``encoder_checkpoint`` (with its sha256), so the
model directory copies it like any encoder, and :func:`embed_combined_dataset` re-ingests
the data per part and embeds it exactly as here.

The run itself (every part through ``lymph embed``, then the concatenation) is
:func:`lymph.encoder.run.run_combination`; which names combine: :mod:`lymph.encoder.registry`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lymph.atomic import sha256_file
from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
from lymph.encoder.embed import embed_cache
from lymph.errors import LymphError

log = logging.getLogger("lymph")

MORPHOMETRY = "morphometry"


def part_store(out: Path, part: str) -> Path:
    """``OUT.<part>.h5``: where a part's own store goes."""
    return out.with_name(f"{out.stem}.{part}.h5")


def _part_checkpoint(ck: dict[str, Any]) -> dict[str, Any]:
    """A trained part's checkpoint as kept inside the combined one (no optimiser state)."""
    return {k: v for k, v in ck.items() if k not in ("optimizer", "format", "version")}


def write_combined_checkpoint(path: Path, method: str, parts: list[dict[str, Any]]) -> Path:
    """The combined checkpoint: ``parts`` in column order (see the module docstring)."""
    trained = [p["checkpoint"] for p in parts if "checkpoint" in p]
    first = trained[0] if trained else {}
    return save_checkpoint(path, {
        "method": method, "parts": parts,
        "model_config": {"parts": [p["method"] for p in parts]},
        "normalisation": first.get("normalisation", {}), "cache": parts[0]["cache"],
        "data_fingerprint": first.get("data_fingerprint", ""), "model": {},
    })


def _extract(part: dict[str, Any], dest: Path) -> Path:
    """A trained part's checkpoint, written back to a file of its own (for ``embed_cache``)."""
    return save_checkpoint(dest, part["checkpoint"])


def _morphometry_record(cache: Any) -> dict[str, Any]:
    from lymph.encoder.methods.morphometry import MORPHOMETRY_VERSION, morphometry_config

    return {"method": MORPHOMETRY, "cache": {"size": cache.size, "crop": cache.crop},
            "config": morphometry_config(), "morphometry_version": MORPHOMETRY_VERSION}


def _check_morphometry_version(rec: dict[str, Any], encoder: Any) -> None:
    from lymph.encoder.methods.morphometry import MORPHOMETRY_VERSION

    if rec.get("morphometry_version") != MORPHOMETRY_VERSION:
        raise LymphError(
            f"{encoder}: its morphometry part is version {rec.get('morphometry_version')!r}, this "
            f"lymph computes version {MORPHOMETRY_VERSION!r}: the features would differ; "
            "use the lymph that made it, or re-embed and refit")


def _concat(stores: list[Path], out: Path, combined: Path, method: str) -> Path:
    from lymph.store_ops import concat_stores

    return concat_stores(stores, out, provenance={
        "combination": method, "encoder_checkpoint": str(combined.resolve()),
        "encoder_sha256": sha256_file(combined),
    })


def embed_combined_dataset(data_dir: str | Path, encoder: str | Path, out: str | Path, *,
                           work_dir: str | Path | None = None, device: str = "auto") -> Path:
    """:func:`lymph.encoder.run.embed_dataset` for a combined checkpoint: each part's
    cache and store in ``work_dir`` (default: beside ``out``), then the combined store."""
    from lymph.data.cache import ingest, open_cache
    from lymph.encoder.methods.morphometry import write_morphometry_store

    out, encoder = Path(out), Path(encoder)
    ck = load_checkpoint(encoder)
    wd = Path(work_dir or out.parent)
    wd.mkdir(parents=True, exist_ok=True)
    stores = []
    for part in ck["parts"]:
        name, cs = part["method"], part["cache"]
        base = wd / f"{out.stem}.{name}"
        cache_path = base.with_name(f"{base.name}.images-{int(cs['size'])}px.zarr")
        ingest(data_dir, cache_path, size=int(cs["size"]), crop=cs.get("crop"))
        c = open_cache(cache_path)
        p_out = base.with_name(base.name + ".h5")
        if name == MORPHOMETRY:
            _check_morphometry_version(part, encoder)
            write_morphometry_store(c, p_out)
        else:
            enc = _extract(part, base.with_name(base.name + ".encoder.pt"))
            embed_cache(c, enc, p_out, device, progress=False)
        stores.append(p_out)
    return _concat(stores, out, encoder, str(ck["method"]))
