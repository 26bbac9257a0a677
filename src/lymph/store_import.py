"""``lymph store import``: a format-1 store from features written by other tools, streamed.

Two kinds of source (``docs/store-format.md``, "Importing features"):

- **per-bag files**: one ``.h5`` (dataset ``features``, ``(n, d)``) or ``.pt`` (a tensor
  ``(n, d)``, or a dict with key ``features``; loaded with ``torch.load(weights_only=True)``)
  per bag, as the common WSI toolkits write them; the bag id is the file name without its
  extension. Labels (and optional clinical columns) come from a labels CSV.
- **one instance table** (CSV; Parquet when pyarrow is installed): a bag id column, an
  optional label column, feature columns; the rows of a bag MUST be contiguous. Labels may
  come from a labels CSV instead.

Streaming: instances are appended block by block to a resizable, chunked ``/embeddings``
(one bag file, or ``block_rows`` table rows, in memory at a time); the store's checksums
are computed incrementally, the content digest by reading ``/embeddings`` back in blocks.
The file is written beside the target and renamed into place when complete
(:func:`lymph.atomic.atomic_path`), encoding attributes stamped last.

Checks, each a :class:`LymphError` naming the file, the row or bag and what was expected:
shapes (2-d, the same ``d`` everywhere, no empty bag), finite values, unique bag ids (and
contiguous table rows), labels in {0, 1, -1 / empty} (or ``positive`` naming the positive
value), label ids that match the bags, clinical values finite numbers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lymph.errors import LymphError

BAG_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth")
TABLE_SUFFIXES = (".csv", ".parquet")


# ---- labels ---------------------------------------------------------------------------------
def parse_label(value: str, where: str, positive: str | None) -> int:
    v = value.strip()
    if positive is not None:
        return -1 if v == "" else int(v == positive)
    if v in ("", "-1"):
        return -1
    if v in ("0", "1", "0.0", "1.0"):
        return int(float(v))
    raise LymphError(f"{where}: label {value!r}: expected 1, 0, -1 or empty (unknown); for "
                     "other label values name the positive one with --positive")


def read_labels(path: Path, id_column: str, label_column: str, positive: str | None,
                clinical: list[str]) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Labels (and clinical values) by bag id from a CSV with a header."""
    if not path.is_file():
        raise LymphError(f"{path}: no such labels file (expected a CSV with columns "
                         f"{id_column}, {label_column})")
    labels: dict[str, int] = {}
    clin: dict[str, list[float]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        missing = [c for c in [id_column, label_column, *clinical] if c not in cols]
        if missing:
            raise LymphError(f"{path}: missing column(s) {', '.join(missing)} (the header has "
                             f"{', '.join(cols) or 'nothing'})")
        for i, row in enumerate(reader, start=2):
            bid = (row[id_column] or "").strip()
            where = f"{path}: line {i}"
            if not bid:
                raise LymphError(f"{where}: empty {id_column}")
            if bid in labels:
                raise LymphError(f"{where}: bag id {bid!r} appears twice (expected unique ids)")
            labels[bid] = parse_label(row[label_column] or "", where, positive)
            vals = []
            for c in clinical:
                try:
                    v = float(row[c])
                except (TypeError, ValueError):
                    v = float("nan")
                if not np.isfinite(v):
                    raise LymphError(f"{where}: {c} = {row[c]!r}: expected a finite number")
                vals.append(v)
            clin[bid] = vals
    return labels, clin


# ---- sources --------------------------------------------------------------------------------
def _load_bag(path: Path, key: str) -> np.ndarray:
    if path.suffix in (".pt", ".pth"):
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError for foreign objects, others for damage
            raise LymphError(f"{path}: not loadable with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        if isinstance(obj, dict):
            if key not in obj:
                raise LymphError(f"{path}: no {key!r} entry (keys: {', '.join(map(str, obj))})")
            obj = obj[key]
        if not isinstance(obj, torch.Tensor):
            raise LymphError(f"{path}: expected a tensor (n, d) or a dict with {key!r}, got "
                             f"{type(obj).__name__}")
        return obj.detach().to(torch.float32).numpy()
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise LymphError(f"{path}: missing dataset /{key} (expected (n, d) features)")
            return np.asarray(f[key][()])
    except LymphError:
        raise
    except Exception as e:  # noqa: BLE001 - h5py raises OSError and others for damaged files
        raise LymphError(f"{path}: not a readable HDF5 file ({type(e).__name__}: {e})") from None


def bag_files(sources: list[Path]) -> list[Path]:
    """Per-bag files from files and folders (a folder: its .h5/.pt files, sorted by name)."""
    out: list[Path] = []
    for s in sources:
        if s.is_dir():
            out += sorted(p for p in s.iterdir() if p.suffix in BAG_SUFFIXES and p.is_file())
        elif s.is_file():
            out.append(s)
        else:
            raise LymphError(f"{s}: no such file or folder")
    if not out:
        raise LymphError(f"{', '.join(map(str, sources))}: no .h5 or .pt bag files found")
    bad = [p for p in out if p.suffix not in BAG_SUFFIXES]
    if bad:
        raise LymphError(f"{bad[0]}: expected per-bag .h5 or .pt files (or one .csv/.parquet "
                         "instance table alone)")
    return out


def _iter_bag_files(files: list[Path], key: str) -> Iterator[tuple[str, np.ndarray, str, int]]:
    seen: dict[str, Path] = {}
    for p in files:
        bid = p.stem
        if bid in seen:
            raise LymphError(f"{p}: bag id {bid!r} also comes from {seen[bid]} (expected one "
                             "file per bag)")
        seen[bid] = p
        yield bid, _load_bag(p, key), str(p), 0


def _iter_table(path: Path, id_column: str, label_column: str | None, block_rows: int,
                positive: str | None) -> Iterator[tuple[np.ndarray, np.ndarray, list[int] | None,
                                                      list[str], int]]:
    """Blocks of (ids, features, labels or None, feature names, first line number)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LymphError(f"{path}: reading Parquet needs pyarrow, which is not installed; "
                             "write the table as CSV (same columns) or install pyarrow") from None
        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
        line = 0
        for batch in pf.iter_batches(batch_size=block_rows):
            cols = batch.to_pydict()
            rows = [[str(cols[c][i]) for c in names] for i in range(batch.num_rows)]
            yield _table_block(path, names, rows, id_column, label_column, line, positive)
            line += batch.num_rows
        return
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        names = next(reader, None)
        if not names:
            raise LymphError(f"{path}: empty file (expected a header: {id_column}, features)")
        rows: list[list[str]] = []
        line = 2
        for row in reader:
            rows.append(row)
            if len(rows) == block_rows:
                yield _table_block(path, names, rows, id_column, label_column, line, positive)
                line += len(rows)
                rows = []
        if rows:
            yield _table_block(path, names, rows, id_column, label_column, line, positive)


def _table_block(path: Path, names: list[str], rows: list[list[str]], id_column: str,
                 label_column: str | None, line: int, positive: str | None
                 ) -> tuple[np.ndarray, np.ndarray, list[int] | None, list[str], int]:
    if id_column not in names:
        raise LymphError(f"{path}: no {id_column!r} column (the header has {', '.join(names)}); "
                         "name the bag id column with --id-column")
    ic = names.index(id_column)
    lc = names.index(label_column) if label_column in names else None
    fcols = [j for j in range(len(names)) if j not in (ic, lc)]
    bad = next((k for k, r in enumerate(rows) if len(r) != len(names)), None)
    if bad is not None:
        raise LymphError(f"{path}: line {line + bad}: {len(rows[bad])} fields, expected "
                         f"{len(names)} (as the header)")
    ids = np.array([r[ic].strip() for r in rows], dtype=object)
    try:
        x = np.array([[r[j] for j in fcols] for r in rows], dtype=np.float64)
    except ValueError:
        for k, r in enumerate(rows):
            for j in fcols:
                try:
                    float(r[j])
                except ValueError:
                    raise LymphError(f"{path}: line {line + k}: {names[j]} = {r[j]!r}: "
                                     "expected a number") from None
        raise
    labels = (None if lc is None else
              [parse_label(r[lc], f"{path}: line {line + k}", positive) for k, r in enumerate(rows)])
    return ids, x, labels, [names[j] for j in fcols], line


# ---- the streaming writer -------------------------------------------------------------------
class _Embeddings:
    """A resizable ``/embeddings`` appended block by block; its sha256 kept incrementally."""

    def __init__(self, f: Any) -> None:
        self.f, self.ds, self.n, self.sha = f, None, 0, hashlib.sha256()

    def append(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.ds is None:
            dim = x.shape[1]
            chunk = max(1, (1 << 18) // max(1, dim * 4))  # as lymph.store.write_store
            self.ds = self.f.create_dataset(
                "embeddings", shape=(0, dim), maxshape=(None, dim), dtype="f4",
                chunks=(chunk, max(1, dim)), compression="gzip", shuffle=True,
                fletcher32=True, track_times=False)
        self.ds.resize(self.n + x.shape[0], axis=0)
        self.ds[self.n :] = x
        self.n += x.shape[0]
        self.sha.update(x.tobytes())


def _check_block(x: np.ndarray, dim: int | None, where: str, first_row: int,
                 unit: str = "instance") -> None:
    if x.ndim != 2:
        raise LymphError(f"{where}: expected a 2-d (n, d) feature array, got shape {x.shape}")
    if x.shape[0] == 0:
        raise LymphError(f"{where}: an empty bag (expected at least one instance)")
    if dim is not None and x.shape[1] != dim:
        raise LymphError(f"{where}: {x.shape[1]} features per instance, expected {dim} (as the "
                         "first bag)")
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise LymphError(f"{where}: non-finite value at {unit} {first_row + r}, feature {c} "
                         "(expected finite numbers)")
    if np.abs(x).max() > np.finfo(np.float32).max:
        raise LymphError(f"{where}: a value beyond float32 range (expected |x| < 3.4e38)")


def _digest(f: Any, ids: list[str], lab: np.ndarray, ptr: np.ndarray, clin: np.ndarray,
            cols: list[str], fcols: list[str] | None, prov_json: str,
            block: int = 1 << 16) -> str:
    """``lymph.store.content_sha256`` of the file's content, ``/embeddings`` read in blocks."""
    h = hashlib.sha256()

    def head(name: str, n: int) -> None:
        h.update(name.encode("utf-8") + b"\0" + n.to_bytes(8, "little"))

    def part(name: str, data: bytes) -> None:
        head(name, len(data))
        h.update(data)

    def strings(values: Any) -> bytes:
        enc = [str(v).encode("utf-8") for v in values]
        return b"".join(len(b).to_bytes(8, "little") + b for b in enc)

    e = f["embeddings"]
    head("embeddings", int(e.shape[0]) * int(e.shape[1]) * 4)
    for s in range(0, e.shape[0], block):
        h.update(np.ascontiguousarray(e[s : s + block], dtype="<f4").tobytes())
    part("patient_ptr", np.ascontiguousarray(ptr, dtype="<i8").tobytes())
    part("patients/id", strings(ids))
    part("patients/label", np.ascontiguousarray(lab, dtype="i1").tobytes())
    part("patients/clinical", np.ascontiguousarray(clin, dtype="<f4").tobytes())
    part("patients/clinical@columns", strings(cols))
    if fcols is not None:
        part("embeddings@columns", strings(fcols))
    part("@provenance", prov_json.encode("utf-8"))
    return h.hexdigest()


def _refuse_foreign(out: Path) -> None:
    """Never replace a file lymph did not write: an existing output must be a store."""
    if not out.exists():
        return
    ok = False
    if out.is_file():
        import h5py

        try:
            with h5py.File(out, "r") as f:
                ok = f.attrs.get("encoding-type") in ("lymph-embeddings", b"lymph-embeddings")
        except Exception:  # noqa: BLE001 - not HDF5 at all: a foreign file
            ok = False
    if not ok:
        raise LymphError(f"{out}: exists and is not a lymph embedding store; refusing to "
                         "replace it (choose another --out)")


def import_store(sources: list[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                 labels: str | os.PathLike[str] | None = None, id_column: str = "id",
                 label_column: str = "label", positive: str | None = None,
                 clinical: list[str] | None = None, features_key: str = "features",
                 block_rows: int = 65536) -> dict[str, Any]:
    """Write a format-1 store at ``out`` from ``sources`` (see the module docstring).

    Returns a summary: ``bags``, ``instances``, ``dim``, ``labelled``, ``kind``, ``path``.
    """
    import h5py

    import lymph
    from lymph.atomic import atomic_path
    from lymph.store import CONTENT_DIGEST, ENCODING_TYPE, ENCODING_VERSION

    srcs = [Path(s) for s in sources]
    out = Path(out)
    if not srcs:
        raise LymphError("store import: expected at least one source (bag files, a folder, "
                         "or one instance table)")
    if any(s.resolve() == out.resolve() for s in srcs):
        raise LymphError(f"{out}: the output must not be one of the sources")
    table = len(srcs) == 1 and srcs[0].suffix in TABLE_SUFFIXES
    if not table and any(s.suffix in TABLE_SUFFIXES for s in srcs):
        raise LymphError("store import: an instance table (.csv/.parquet) must be the only source")
    if table and not srcs[0].is_file():
        raise LymphError(f"{srcs[0]}: no such file (expected an instance table)")
    clinical = list(clinical or [])
    if clinical and labels is None:
        raise LymphError("clinical: clinical columns are read from the labels CSV; give "
                         "--labels")
    if block_rows < 1:
        raise LymphError(f"block_rows: expected at least 1, got {block_rows}")
    lab_map, clin_map = (read_labels(Path(labels), id_column, label_column, positive, clinical)
                         if labels is not None else ({}, {}))
    _refuse_foreign(out)
    ids: list[str] = []
    sizes: list[int] = []
    row_labels: list[int] = []
    fcols: list[str] | None = None
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as f:
            emb = _Embeddings(f)
            dim: int | None = None
            if table:
                seen: set[str] = set()
                for bids, x, blabels, names, line in _iter_table(
                        srcs[0], id_column, label_column, block_rows, positive):
                    _check_block(x, dim, str(srcs[0]), line, unit="line")
                    dim, fcols = x.shape[1], names
                    if blabels is not None and labels is not None:
                        raise LymphError(f"{srcs[0]}: has a {label_column!r} column and `labels` "
                                         "was given; expected labels from one place")
                    starts = np.flatnonzero(np.r_[True, bids[1:] != bids[:-1]])
                    ends = np.r_[starts[1:], len(bids)]
                    for s, e in zip(starts, ends):  # one step per bag id run in this block
                        bid = str(bids[s])
                        if not bid:
                            raise LymphError(f"{srcs[0]}: line {line + s}: empty {id_column}")
                        lab_run = None if blabels is None else set(blabels[s:e])
                        if ids and bid == ids[-1] and s == 0:  # the previous block's bag goes on
                            sizes[-1] += e - s
                        else:
                            if bid in seen:
                                raise LymphError(
                                    f"{srcs[0]}: line {line + s}: bag {bid!r} appears again after "
                                    "other bags; expected the rows of each bag to be contiguous "
                                    f"(sort the table by {id_column})")
                            seen.add(bid)
                            ids.append(bid)
                            sizes.append(e - s)
                            row_labels.append(-2 if lab_run is None else next(iter(lab_run)))
                        if lab_run is not None and (len(lab_run) > 1 or row_labels[-1] not in lab_run):
                            raise LymphError(f"{srcs[0]}: line {line + s}: bag {bid!r} has rows "
                                             "with different labels (expected one label per bag)")
                    emb.append(x)
            else:
                for bid, x, where, _ in _iter_bag_files(bag_files(srcs), features_key):
                    _check_block(x, dim, where, 0)
                    dim = x.shape[1]
                    ids.append(bid)
                    sizes.append(x.shape[0])
                    row_labels.append(-2)
                    emb.append(x)
            if not ids:
                raise LymphError(f"{srcs[0]}: no instances (expected at least one row)")
            unknown = [i for i in lab_map if i not in set(ids)]
            if unknown:
                raise LymphError(f"{labels}: {len(unknown)} id(s) with no features in the sources: "
                                 f"{', '.join(unknown[:5])}; expected the ids of the bags "
                                 f"({', '.join(ids[:3])}, ...)")
            lab = np.array([lab_map.get(i, -1) if r == -2 else r for i, r in zip(ids, row_labels)],
                           dtype=np.int8)
            clin = (np.array([clin_map.get(i, [np.nan] * len(clinical)) for i in ids],
                             dtype=np.float32).reshape(len(ids), len(clinical)))
            if clinical and not np.isfinite(clin).all():
                missing = [ids[k] for k in np.flatnonzero(~np.isfinite(clin).all(1))[:5]]
                raise LymphError(f"{labels}: no clinical values for bag(s) {', '.join(missing)} "
                                 "(expected a row for every bag when --clinical is given)")
            ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            str_dt = h5py.string_dtype("utf-8")
            emb.ds.attrs["sha256"] = emb.sha.hexdigest()
            if fcols is not None:
                emb.ds.attrs["columns"] = np.asarray(fcols, dtype=str_dt)
            f.create_dataset("patient_ptr", data=ptr, track_times=False)
            g = f.create_group("patients")
            g.create_dataset("id", data=np.asarray(ids, dtype=object), dtype=str_dt,
                             track_times=False)
            g.create_dataset("label", data=lab, track_times=False)
            c = g.create_dataset("clinical", data=clin, track_times=False)
            c.attrs["columns"] = np.asarray(clinical, dtype=str_dt)
            prov = {"method": "import", "lymph_version": lymph.__version__, "dim": int(dim or 0),
                    "import": {"kind": "table" if table else "bag-files",
                               "sources": [str(s) for s in srcs],
                               "labels": None if labels is None else str(labels)}}
            prov_json = json.dumps(prov, sort_keys=True, default=str)
            f.attrs["provenance"] = prov_json
            f.attrs[CONTENT_DIGEST] = _digest(f, ids, lab, ptr, clin, clinical, fcols, prov_json)
            f.attrs["encoding-type"] = ENCODING_TYPE  # stamped last
            f.attrs["encoding-version"] = ENCODING_VERSION
    return {"path": str(out), "kind": "table" if table else "bag-files", "bags": len(ids),
            "instances": int(ptr[-1]), "dim": int(dim or 0), "labelled": int((lab >= 0).sum())}
