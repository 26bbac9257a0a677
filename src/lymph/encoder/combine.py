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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lymph.atomic import sha256_file
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
from lymph.errors import LymphError

log = logging.getLogger("lymph")

MORPHOMETRY = "morphometry"
#: morphometry's cache: the whole 224 px image at 112 px (its features were designed there)
MORPHOMETRY_CACHE: dict[str, Any] = {"size": 112, "crop": None}


def is_combination(method: str) -> bool:
    return "+" in method


def parts_of(method: str) -> list[str]:
    """The part names of ``A+B``; each a registered method or ``morphometry``."""
    from lymph.encoder.methods import get_method

    parts = [p.strip() for p in method.split("+")]
    if len(parts) < 2 or any(not p for p in parts) or len(set(parts)) != len(parts):
        raise LymphError(f"--method {method!r}: expected distinct methods joined by '+', "
                         "e.g. contrastive+morphometry")
    for p in parts:
        if p != MORPHOMETRY:
            m = get_method(p)  # unknown names fail here
            if getattr(m, "needs_labels", False):
                raise LymphError(f"--method {method}: {p} is trained from labels (fold-safe stores "
                                 "of its own); combine its store with `lymph store concat`")
    return parts


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
    from lymph.encoder.morphometry import MORPHOMETRY_VERSION, morphometry_config

    return {"method": MORPHOMETRY, "cache": {"size": cache.size, "crop": cache.crop},
            "config": morphometry_config(), "morphometry_version": MORPHOMETRY_VERSION}


def _check_morphometry_version(rec: dict[str, Any], encoder: Any) -> None:
    from lymph.encoder.morphometry import MORPHOMETRY_VERSION

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


def run_combination(*, out: Path, data: str | Path | None, images: str | Path | None,
                    method: str, encoder: str | Path | None, device: str, size: int | None,
                    crop: int | None, cache: str | Path | None, progress: bool,
                    **train_args: Any) -> Any:
    """``lymph embed --method A+B`` (or ``--encoder COMBINED.pt``): every part into its own
    store, then the combined store ``out`` and (when training) ``OUT.encoder.pt``.

    ``size`` / ``crop`` apply to the trained parts' caches when ingesting ``data``;
    ``train_args`` (dim, epochs, batch_size, lr, seed, resume) go to the trained parts."""
    from lymph.encoder.embed import EmbedSummary, checkpoint_path, run_embed
    from lymph.store import open_store

    if cache is not None:
        raise LymphError(f"--cache: not with a combined method ({method}); each part's "
                         "cache goes beside the store (OUT.<part>.images-<size>px.zarr)")
    env = D.setup(device)  # held across the parts, so torchrun's process group lives on
    try:
        # rank 0 reads the checkpoint; the other ranks get it
        given = D.main_decides(env, lambda: load_checkpoint(encoder)) if encoder is not None else None
        if given is not None:
            if not is_combination(str(given["method"])) or "parts" not in given:
                raise LymphError(f"--encoder {encoder}: a {given['method']} checkpoint, not a "
                                 f"combined one; drop --method {method} to use it alone")
            method = str(given["method"])
        parts = parts_of(method)
        summary = EmbedSummary(store=None, is_main=env.is_main, world=env.world)
        stores, records = [], []
        for k, part in enumerate(parts):
            p_out = part_store(out, part)
            rec = given["parts"][k] if given is not None else None
            if part == MORPHOMETRY:
                cs = rec["cache"] if rec is not None else MORPHOMETRY_CACHE
                if rec is not None:
                    _check_morphometry_version(rec, encoder)
                s = run_embed(out=p_out, data=data, images=images, method=MORPHOMETRY,
                              device=device, size=int(cs["size"]), crop=cs.get("crop"),
                              progress=progress)
            else:
                enc = None
                if rec is not None:  # embed only: the part's weights back in a file
                    enc = _extract(rec, checkpoint_path(p_out)) if env.is_main else checkpoint_path(p_out)
                    D.barrier(env)
                s = run_embed(out=p_out, data=data, images=images, method=part, device=device,
                              encoder=enc, size=size, crop=crop, progress=progress,
                              **({} if enc is not None else train_args))
                summary.checkpoint = s.checkpoint
                summary.trained_epochs, summary.losses = s.trained_epochs, s.losses
                summary.train_seconds = s.train_seconds
                summary.train_images_per_s = s.train_images_per_s
                summary.loss_curve = s.loss_curve
                summary.cache, summary.cache_reused = s.cache, s.cache_reused
                summary.embed_seconds += s.embed_seconds
            summary.n_images, summary.n_patients = s.n_images, s.n_patients
            summary.notes.append(f"part {part}: {p_out} (dim {s.dim}, images {s.cache})")
            stores.append(p_out)
            if env.is_main and rec is None:
                from lymph.data.cache import open_cache

                c = open_cache(s.cache)  # type: ignore[arg-type]
                if part == MORPHOMETRY:
                    rec = _morphometry_record(c)
                else:
                    rec = {"method": part, "cache": {"size": c.size, "crop": c.crop},
                           "checkpoint": _part_checkpoint(load_checkpoint(s.checkpoint))}  # type: ignore[arg-type]
            records.append(rec)
        combined = Path(encoder) if encoder is not None else checkpoint_path(out)
        if env.is_main:
            if given is None:
                write_combined_checkpoint(combined, method, records)
            _concat(stores, out, combined, method)
            summary.dim = open_store(out).dim
        D.barrier(env)
        summary.checkpoint, summary.store = combined, out
        summary.notes.append(f"combined {method}: checkpoint {combined} (all parts, for "
                             "`lymph predict --data`)")
        return summary
    except BaseException as e:  # tell the other ranks (or stop quietly if one failed first)
        err = D.fail(env, e)
        if err is e:
            raise
        raise err from None
    finally:
        D.teardown(env)


def embed_combined_dataset(data_dir: str | Path, encoder: str | Path, out: str | Path, *,
                           work_dir: str | Path | None = None, device: str = "auto") -> Path:
    """:func:`lymph.encoder.embed.embed_dataset` for a combined checkpoint: each part's
    cache and store in ``work_dir`` (default: beside ``out``), then the combined store."""
    from lymph.data.cache import ingest, open_cache
    from lymph.encoder.embed import embed_cache
    from lymph.encoder.morphometry import write_morphometry_store

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
