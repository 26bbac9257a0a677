"""Operations on whole embedding stores: combining feature blocks (``lymph store concat``)
and summarising a store (``lymph store info``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lymph.errors import LymphError
from lymph.store import EmbeddingStore, open_store

#: short column prefixes of the known methods; others use the method name itself
PREFIXES = {"morphometry": "morph", "autoencoder": "ae", "ae": "ae", "contrastive": "con"}


def _prefix(store: EmbeddingStore, k: int, used: set[str]) -> str:
    method = store.provenance.get("method")
    base = PREFIXES.get(str(method), str(method)) if method else f"s{k}"
    name, j = base, 2
    while name in used:
        name, j = f"{base}{j}", j + 1
    used.add(name)
    return name


def _columns(store: EmbeddingStore, prefix: str) -> list[str]:
    if store.provenance.get("method") == "concat" and store.feature_columns is not None:
        return list(store.feature_columns)  # already prefixed by an earlier concat
    cols = store.feature_columns or [str(j) for j in range(store.dim)]
    return [f"{prefix}:{c}" for c in cols]


def check_same_images(first: EmbeddingStore, other: EmbeddingStore) -> None:
    a, b = first.path, other.path

    def bad(field: str, detail: str) -> LymphError:
        return LymphError(
            f"{b}: {field} differs from {a} ({detail}); concat needs stores of the same "
            "images in the same order (embed both from the same image cache)"
        )

    if other.n_patients != first.n_patients or not np.array_equal(other.ids, first.ids):
        diff = next((i for i, (x, y) in enumerate(zip(first.ids, other.ids)) if x != y), None)
        raise bad("/patients/id", f"{other.n_patients} vs {first.n_patients} patients"
                  + (f", first difference at row {diff}: {other.ids[diff]!r} vs {first.ids[diff]!r}"
                     if diff is not None else ""))
    if not np.array_equal(other.patient_ptr, first.patient_ptr):
        raise bad("/patient_ptr", f"{other.n_images} vs {first.n_images} images")
    if not np.array_equal(other.labels, first.labels):
        raise bad("/patients/label", "same patients with different labels")
    if other.clinical_columns != first.clinical_columns or not np.allclose(
        other.clinical, first.clinical, equal_nan=True
    ):
        raise bad("/patients/clinical", "different clinical features")
    if first.image_paths is not None and other.image_paths is not None:
        if not np.array_equal(other.image_paths, first.image_paths):
            k = int(np.flatnonzero(other.image_paths != first.image_paths)[0])
            raise bad("/images/path",
                      f"image {k}: {other.image_paths[k]!r} vs {first.image_paths[k]!r}")


def concat_stores(paths: list[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                  provenance: dict[str, Any] | None = None) -> Path:
    """Write one store with the feature blocks of ``paths`` side by side.

    The stores must describe the same images in the same order (same patient ids,
    ``patient_ptr``, labels, clinical data, and image paths where both carry them).
    Feature columns are prefixed with each store's method (``ae:0``, ``morph:nucleus_area``);
    the provenance lists every source's provenance and sha256 under ``sources``.
    ``provenance``: extra top-level provenance fields (e.g. a combined encoder checkpoint,
    ``lymph embed --method contrastive+morphometry``).
    """
    from lymph.store import write_store

    if len(paths) < 2:
        raise LymphError(f"store concat: expected at least 2 stores, got {len(paths)}")
    out = Path(out)
    stores = [open_store(p) for p in paths]
    if any(s.path is not None and s.path.resolve() == out.resolve() for s in stores):
        raise LymphError(f"{out}: the output must not be one of the input stores")
    c = concat_in_memory(stores, provenance=provenance)
    return write_store(
        out, embeddings=c.embeddings, patient_ptr=c.patient_ptr, ids=c.ids, labels=c.labels,
        clinical=c.clinical, clinical_columns=c.clinical_columns,
        feature_columns=c.feature_columns, image_paths=c.image_paths,
        patient_scorer=c.patient_scorer, provenance=c.provenance,
    )


def concat_in_memory(stores: list[EmbeddingStore], *,
                     provenance: dict[str, Any] | None = None) -> EmbeddingStore:
    """The store :func:`concat_stores` writes, in memory (``path`` None): the same checks,
    columns and provenance."""
    import lymph

    first = stores[0]
    for s in stores[1:]:
        check_same_images(first, s)
    # prefixes already taken inside earlier concats, so new blocks never clash with them
    used: set[str] = {
        str(src.get("prefix")) for s in stores if s.provenance.get("method") == "concat"
        for src in s.provenance.get("sources", [])
    }
    cols: list[str] = []
    sources: list[dict[str, Any]] = []
    for k, s in enumerate(stores):
        prefix = "concat" if s.provenance.get("method") == "concat" else _prefix(s, k, used)
        block = _columns(s, prefix)
        sources.append({"path": str(s.path), "sha256": s.fingerprint, "prefix": prefix,
                        "dim": s.dim, "columns": [len(cols), len(cols) + s.dim],
                        "provenance": s.provenance})
        cols += block
    if len(set(cols)) != len(cols):
        raise LymphError("store concat: duplicate feature column names after prefixing")
    prov: dict[str, Any] = {"method": "concat", "lymph_version": lymph.__version__,
                            "dim": len(cols), "sources": sources, **(provenance or {})}
    fps = {s.provenance.get("data_fingerprint") for s in stores}
    if len(fps) == 1 and None not in fps:
        prov["data_fingerprint"] = fps.pop()
    image_paths = next((s.image_paths for s in stores if s.image_paths is not None), None)
    scorer = next((s.patient_scorer for s in stores if s.patient_scorer is not None), None)
    return EmbeddingStore(
        path=None, embeddings=np.concatenate([s.embeddings for s in stores], axis=1),
        patient_ptr=first.patient_ptr, ids=first.ids, labels=first.labels,
        clinical=first.clinical, clinical_columns=first.clinical_columns,
        feature_columns=cols, image_paths=image_paths, patient_scorer=scorer, provenance=prov,
    )


def store_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``lymph store info`` prints: counts, dim, method, columns, provenance."""
    s = open_store(path)
    lab = s.labels
    prov = s.provenance
    summary: dict[str, Any] = {
        "path": str(s.path),
        "patients": s.n_patients,
        "malignant / reactive / unknown": f"{int((lab == 1).sum())} / {int((lab == 0).sum())} / "
                                          f"{int((lab == -1).sum())}",
        "images": s.n_images,
        "images per patient": (
            f"{int(s.bag_sizes.min())} to {int(s.bag_sizes.max())} "
            f"(median {float(np.median(s.bag_sizes)):g})" if s.n_patients else "-"
        ),
        "dim": s.dim,
        "method": prov.get("method", "?"),
        "clinical columns": ", ".join(s.clinical_columns) or "-",
        "feature columns": _short_list(s.feature_columns),
        "sha256": s.fingerprint,
    }
    for key in ("data_fingerprint", "lymph_version", "morphometry_version", "config"):
        if key in prov:
            summary[f"provenance.{key}"] = prov[key]
    for k, src in enumerate(prov.get("sources", [])):
        method = src.get("provenance", {}).get("method", "?")
        summary[f"source {k}"] = (f"{src.get('prefix')}: {method} dim {src.get('dim')} "
                                  f"({src.get('path')}, sha256 {str(src.get('sha256', ''))[:12]})")
    return summary


def _short_list(cols: list[str] | None, n: int = 6) -> str:
    if cols is None:
        return "- (unnamed)"
    if len(cols) <= n:
        return ", ".join(cols)
    return ", ".join(cols[: n - 1]) + f", ... {cols[-1]} ({len(cols)} in all)"
