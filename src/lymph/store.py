"""The embedding store: the feature store between stage one and stage two.

One HDF5 file holds every image's feature vector, grouped by patient (CSR layout), the
patient table and the clinical features. The format is specified in
``docs/store-format.md`` (encoding-type ``lymph-embeddings``, encoding-version ``1``); this
module holds its constants, the writer, the checking reader and the Python API::

    from lymph.store import open_store
    s = open_store("artifacts/dev.h5")
    s.bag("P26")            # (n_images_of_P26, dim) float32
    s.embeddings, s.patient_ptr, s.ids, s.labels, s.clinical   # everything, in memory

Stores are small (10,850 x 60 float32 is 2.6 MB) so the reader loads everything at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import atomic_path
from lymph.errors import LymphError

ENCODING_TYPE = "lymph-embeddings"
ENCODING_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
#: root attribute: SHA-256 of the whole content (see :func:`content_sha256`)
CONTENT_DIGEST = "content-sha256"
#: larger embeddings are refused before reading (the dev set's are 2.6 MB): a compressed
#: dataset declaring terabytes must not exhaust memory
MAX_EMBEDDING_BYTES = 8 * 2**30

_STR = None  # h5py string dtype, created lazily (h5py import is cheap but keep module light)


def _str_dtype() -> Any:
    import h5py

    return h5py.string_dtype("utf-8")


def bag_rows(patient_ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The instance rows of patients ``rows`` (in that order, concatenated) and each
    instance's position within its bag; vectorised, no loop over bags."""
    rows = np.asarray(rows, dtype=np.int64)
    sizes = patient_ptr[rows + 1] - patient_ptr[rows]
    within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(patient_ptr[rows], sizes) + within, within


@dataclass
class EmbeddingStore:
    """An embedding store loaded in memory. Build with :func:`open_store`.

    Required content (format 1): ``embeddings`` (n_images, dim) float32, ``patient_ptr``
    (n_patients + 1,) int64, ``ids``, ``labels`` (1, 0, -1 = unknown), ``clinical``
    (n_patients, n_features) float32 and ``clinical_columns``. The rest is optional and
    ``None`` / empty when the file does not carry it.
    """

    path: Path | None
    embeddings: np.ndarray
    patient_ptr: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    clinical: np.ndarray
    clinical_columns: list[str]
    feature_columns: list[str] | None = None
    image_paths: np.ndarray | None = None
    patient_scorer: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    # ---- shape helpers -------------------------------------------------------------
    @property
    def n_patients(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def bag_sizes(self) -> np.ndarray:
        return np.diff(self.patient_ptr)

    def __len__(self) -> int:
        return self.n_patients

    def index_of(self, patient_id: str) -> int:
        hits = np.flatnonzero(self.ids == patient_id)
        if hits.size == 0:
            where = self.path if self.path is not None else "the store"
            raise LymphError(f"{where}: no patient with id {patient_id!r}")
        return int(hits[0])

    def bag(self, patient: str | int) -> np.ndarray:
        """Embeddings of one patient, by id or row index: ``(n_images_of_patient, dim)``."""
        i = self.index_of(patient) if isinstance(patient, str) else int(patient)
        return self.embeddings[self.patient_ptr[i] : self.patient_ptr[i + 1]]

    def bag_image_paths(self, patient: str | int) -> list[str] | None:
        if self.image_paths is None:
            return None
        i = self.index_of(patient) if isinstance(patient, str) else int(patient)
        return [str(p) for p in self.image_paths[self.patient_ptr[i] : self.patient_ptr[i + 1]]]

    def labelled(self) -> np.ndarray:
        """Row indices of patients with a known label (0 or 1)."""
        return np.flatnonzero(self.labels >= 0)

    def subset(self, rows: np.ndarray | list[int]) -> EmbeddingStore:
        """A new in-memory store with the given patient rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        sizes = self.bag_sizes[rows]
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        take, _ = bag_rows(self.patient_ptr, rows)
        return EmbeddingStore(
            path=self.path,
            embeddings=self.embeddings[take],
            patient_ptr=ptr,
            ids=self.ids[rows],
            labels=self.labels[rows],
            clinical=self.clinical[rows],
            clinical_columns=list(self.clinical_columns),
            feature_columns=self.feature_columns,
            image_paths=None if self.image_paths is None else self.image_paths[take],
            patient_scorer=None if self.patient_scorer is None else self.patient_scorer[rows],
            provenance=dict(self.provenance),
            fingerprint=self.fingerprint,
        )

    def patients_frame(self) -> Any:
        """The patient table as a pandas DataFrame (id, label, n_images, clinical columns)."""
        import pandas as pd

        df = pd.DataFrame({"id": self.ids, "label": self.labels, "n_images": self.bag_sizes})
        for j, c in enumerate(self.clinical_columns):
            df[c] = self.clinical[:, j]
        return df


# ---- writer ------------------------------------------------------------------------------
def write_store(
    path: str | os.PathLike[str],
    *,
    embeddings: np.ndarray,
    patient_ptr: np.ndarray,
    ids: list[str] | np.ndarray,
    labels: np.ndarray | list[int],
    clinical: np.ndarray | None = None,
    clinical_columns: list[str] | None = None,
    feature_columns: list[str] | None = None,
    image_paths: list[str] | np.ndarray | None = None,
    patient_scorer: np.ndarray | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a format-1 store atomically (temporary file, then rename) and return its path.

    The result is byte-identical for identical inputs (no timestamps are recorded).
    """
    import h5py

    path = Path(path)
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    ptr = np.asarray(patient_ptr, dtype=np.int64)
    ids_arr = np.asarray([str(i) for i in ids], dtype=object)
    lab = np.asarray(labels, dtype=np.int8)
    n_pat = ids_arr.shape[0]
    if clinical is None:
        clinical = np.zeros((n_pat, 0), dtype=np.float32)
    clin = np.ascontiguousarray(clinical, dtype=np.float32)
    cols = list(clinical_columns or [])
    _check_arrays(
        str(path), emb, ptr, ids_arr, lab, clin, cols, feature_columns,
        image_paths, patient_scorer,
    )
    from lymph.outputs import check_output

    check_output(path, "store", name="store")  # replaces only a lymph store
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as f:
            chunk_rows = max(1, min(emb.shape[0], max(1, (1 << 18) // max(1, emb.shape[1] * 4))))
            d = f.create_dataset(
                "embeddings", data=emb, chunks=(chunk_rows, max(1, emb.shape[1])) if emb.size else None,
                compression="gzip" if emb.size else None, shuffle=bool(emb.size),
                fletcher32=bool(emb.size), track_times=False,
            )
            d.attrs["sha256"] = hashlib.sha256(emb.tobytes()).hexdigest()
            if feature_columns is not None:
                d.attrs["columns"] = np.asarray(feature_columns, dtype=_str_dtype())
            f.create_dataset("patient_ptr", data=ptr, track_times=False)
            g = f.create_group("patients")
            g.create_dataset("id", data=ids_arr, dtype=_str_dtype(), track_times=False)
            g.create_dataset("label", data=lab, track_times=False)
            c = g.create_dataset("clinical", data=clin, track_times=False)
            c.attrs["columns"] = np.asarray(cols, dtype=_str_dtype())
            if patient_scorer is not None:
                g.create_dataset(
                    "scorer", data=np.asarray(patient_scorer, dtype=np.int16), track_times=False
                )
            if image_paths is not None:
                im = f.create_group("images")
                im.create_dataset(
                    "path", data=np.asarray([str(p) for p in image_paths], dtype=object),
                    dtype=_str_dtype(), track_times=False,
                )
            prov_json = json.dumps(provenance, sort_keys=True, default=str) if provenance else None
            if prov_json is not None:
                f.attrs["provenance"] = prov_json
            f.attrs[CONTENT_DIGEST] = content_sha256(
                emb, ptr, ids_arr, lab, clin, cols, feature_columns, image_paths,
                patient_scorer, prov_json,
            )
            # Stamped last: a file interrupted before this line never opens as a store.
            f.attrs["encoding-type"] = ENCODING_TYPE
            f.attrs["encoding-version"] = ENCODING_VERSION
    return path


def _check_arrays(
    where: str,
    emb: np.ndarray,
    ptr: np.ndarray,
    ids: np.ndarray,
    lab: np.ndarray,
    clin: np.ndarray,
    cols: list[str],
    feature_columns: list[str] | None,
    image_paths: Any,
    patient_scorer: Any,
) -> None:
    def bad(field_: str, expected: str, got: Any) -> LymphError:
        return LymphError(f"{where}: {field_}: expected {expected}, got {got}")

    if emb.ndim != 2:
        raise bad("/embeddings", "a 2-d array (n_images, dim)", f"shape {emb.shape}")
    n_pat = ids.shape[0]
    if ptr.ndim != 1 or ptr.shape[0] != n_pat + 1:
        raise bad("/patient_ptr", f"shape ({n_pat + 1},) for {n_pat} patients", f"shape {ptr.shape}")
    if ptr[0] != 0 or ptr[-1] != emb.shape[0] or np.any(np.diff(ptr) < 0):
        raise bad(
            "/patient_ptr",
            f"non-decreasing offsets from 0 to n_images={emb.shape[0]}",
            f"{ptr[:3].tolist()}...{ptr[-1:].tolist()}",
        )
    if lab.shape != (n_pat,):
        raise bad("/patients/label", f"shape ({n_pat},)", f"shape {lab.shape}")
    if not np.isin(lab, (-1, 0, 1)).all():
        raise bad("/patients/label", "values in {1, 0, -1}", sorted(set(lab.tolist())))
    if len(set(ids.tolist())) != n_pat:
        raise bad("/patients/id", "unique patient ids", "duplicates")
    for pid in ids.tolist():  # ids name report files (misclassified/<id>.png): never a path
        if not _ID_RE.match(str(pid)) or ".." in str(pid):
            raise bad("/patients/id", "plain patient names (no path separators, '..' or "
                      "control characters)", repr(str(pid))[:80])
    _check_finite(where, "/embeddings", emb, ptr, ids)
    _check_finite(where, "/patients/clinical", clin, None, ids)
    if clin.ndim != 2 or clin.shape[0] != n_pat:
        raise bad("/patients/clinical", f"shape ({n_pat}, n_features)", f"shape {clin.shape}")
    if len(cols) != clin.shape[1]:
        raise bad(
            "/patients/clinical attribute 'columns'",
            f"{clin.shape[1]} names", f"{len(cols)} names",
        )
    if feature_columns is not None and len(feature_columns) != emb.shape[1]:
        raise bad("/embeddings attribute 'columns'", f"{emb.shape[1]} names", len(feature_columns))
    if image_paths is not None and len(image_paths) != emb.shape[0]:
        raise bad("/images/path", f"{emb.shape[0]} paths", len(image_paths))
    if patient_scorer is not None and np.asarray(patient_scorer).shape != (n_pat,):
        raise bad("/patients/scorer", f"shape ({n_pat},)", np.asarray(patient_scorer).shape)


#: a patient id that is safe as a file name: no separators, no control characters (the
#: challenge CSVs are stricter, lymph.data.challenge; imported stores may use other names)
_ID_RE = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,200}$")


def _check_finite(where: str, name: str, x: np.ndarray, ptr: np.ndarray | None,
                  ids: np.ndarray) -> None:
    """NaN or infinity never enters or leaves a store: name the first patient holding one."""
    if x.size == 0 or np.isfinite(x).all():
        return
    rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    n_bad = int((~np.isfinite(x)).sum())
    if ptr is not None:  # instance rows -> patients
        pats = np.unique(np.searchsorted(ptr, rows, side="right") - 1)
    else:
        pats = rows
    names = ", ".join(str(ids[i]) for i in pats[:5] if 0 <= i < len(ids))
    raise LymphError(f"{where}: {name}: expected finite numbers, got {n_bad} NaN or infinite "
                     f"value(s) (patient(s) {names}{' ...' if pats.size > 5 else ''}); "
                     "a diverged encoder or broken input: refused")


def content_sha256(
    emb: np.ndarray,
    ptr: np.ndarray,
    ids: Any,
    lab: np.ndarray,
    clin: np.ndarray,
    cols: list[str],
    feature_columns: Any,
    image_paths: Any,
    patient_scorer: Any,
    provenance_json: str | None,
) -> str:
    """SHA-256 of a store's content, independent of the HDF5 layout (``docs/store-format.md``).

    Each part present, in this order, contributes its name, a NUL, its length in bytes (8
    bytes, little-endian) and its bytes: numbers little-endian in the written dtype (float32
    embeddings and clinical, int64 offsets, int8 labels, int16 scorers), string lists as
    each string's UTF-8 prefixed by its byte length (8 bytes, little-endian), the
    provenance as its JSON text.
    """
    h = hashlib.sha256()

    def part(name: str, data: bytes) -> None:
        h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little") + data)

    def strings(values: Any) -> bytes:
        enc = [str(v).encode("utf-8") for v in values]
        return b"".join(len(b).to_bytes(8, "little") + b for b in enc)

    part("embeddings", np.ascontiguousarray(emb, dtype="<f4").tobytes())
    part("patient_ptr", np.ascontiguousarray(ptr, dtype="<i8").tobytes())
    part("patients/id", strings(ids))
    part("patients/label", np.ascontiguousarray(lab, dtype="i1").tobytes())
    part("patients/clinical", np.ascontiguousarray(clin, dtype="<f4").tobytes())
    part("patients/clinical@columns", strings(cols))
    if feature_columns is not None:
        part("embeddings@columns", strings(feature_columns))
    if image_paths is not None:
        part("images/path", strings(image_paths))
    if patient_scorer is not None:
        part("patients/scorer", np.ascontiguousarray(patient_scorer, dtype="<i2").tobytes())
    if provenance_json is not None:
        part("@provenance", provenance_json.encode("utf-8"))
    return h.hexdigest()


# ---- reader ------------------------------------------------------------------------------
def open_store(path: str | os.PathLike[str]) -> EmbeddingStore:
    """Open, check and load a store. Raises :class:`LymphError` saying what is wrong."""
    import h5py

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise LymphError(f"{where}: no such store file (expected an HDF5 embedding store)")
    # One read of the file: the content and the fingerprint come from the same bytes, even
    # when a writer replaces the file meanwhile (stores are small, see the module docstring).
    with open(path, "rb") as raw:
        data = raw.read()
    fingerprint = hashlib.sha256(data).hexdigest()
    try:
        f = h5py.File(io.BytesIO(data), "r")
    except Exception as e:  # h5py raises OSError, and others for some damaged files
        raise LymphError(f"{where}: not a readable HDF5 file ({e}); expected an embedding store") from None
    try:
        with f:
            etype = _attr_str(f.attrs.get("encoding-type"))
            ever = _attr_str(f.attrs.get("encoding-version"))
            if etype != ENCODING_TYPE:
                raise LymphError(
                    f"{where}: root attribute 'encoding-type': expected {ENCODING_TYPE!r}, "
                    f"got {etype!r} (not a lymph embedding store, or an incomplete one)"
                )
            if ever not in SUPPORTED_VERSIONS:
                raise LymphError(
                    f"{where}: root attribute 'encoding-version' is {ever!r}; this lymph reads "
                    f"versions {', '.join(SUPPORTED_VERSIONS)}. Upgrade lymph to read it."
                )
            return _read_v1(f, path, fingerprint)
    except LymphError:
        raise
    except Exception as e:  # a damaged file: h5py raises OSError, RuntimeError, KeyError, ...
        raise LymphError(f"{where}: corrupted or malformed store ({type(e).__name__}: {e})") from None


def _attr_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v.item()
    return str(v)


def _required(f: Any, name: str, where: str) -> Any:
    if name not in f:
        raise LymphError(f"{where}: missing required dataset /{name}")
    return f[name]


def _strings(ds: Any) -> np.ndarray:
    raw = ds[()]
    return np.asarray(
        [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in np.ravel(raw)], dtype=object
    )


def _read_v1(f: Any, path: Path, fingerprint: str) -> EmbeddingStore:
    where = str(path)
    e = _required(f, "embeddings", where)
    if e.dtype != np.float32 or e.ndim != 2:
        raise LymphError(f"{where}: /embeddings: expected float32 (n_images, dim), got {e.dtype} {e.shape}")
    if int(np.prod(e.shape, dtype=np.float64)) * 4 > MAX_EMBEDDING_BYTES:
        raise LymphError(f"{where}: /embeddings: shape {e.shape} is more than lymph loads "
                         f"({MAX_EMBEDDING_BYTES / 2**30:.0f} GiB); a forged or foreign file")
    emb = e[()]
    digest = e.attrs.get("sha256")
    if digest is not None and hashlib.sha256(emb.tobytes()).hexdigest() != _attr_str(digest):
        raise LymphError(f"{where}: /embeddings: content does not match its sha256 (file corrupted)")
    p = _required(f, "patient_ptr", where)
    if p.dtype.kind not in "iu" or p.ndim != 1:
        raise LymphError(f"{where}: /patient_ptr: expected int64 (n_patients + 1,), got {p.dtype} {p.shape}")
    ptr = p[()].astype(np.int64)
    ids = _strings(_required(f, "patients/id", where))
    ld = _required(f, "patients/label", where)
    if ld.dtype.kind not in "iu":
        raise LymphError(f"{where}: /patients/label: expected int8, got {ld.dtype}")
    lab = ld[()].astype(np.int8)
    cd = _required(f, "patients/clinical", where)
    if cd.dtype.kind != "f" or cd.ndim != 2:
        raise LymphError(f"{where}: /patients/clinical: expected float32 (n_patients, n_features), got {cd.dtype} {cd.shape}")
    clin = cd[()].astype(np.float32)
    cols_attr = cd.attrs.get("columns")
    if cols_attr is None:
        if clin.shape[1] != 0:
            raise LymphError(f"{where}: /patients/clinical: missing attribute 'columns' (the feature names)")
        cols: list[str] = []
    else:
        cols = [c.decode() if isinstance(c, bytes) else str(c) for c in np.ravel(cols_attr)]
    fcols_attr = e.attrs.get("columns")
    fcols = None if fcols_attr is None else [
        c.decode() if isinstance(c, bytes) else str(c) for c in np.ravel(fcols_attr)
    ]
    paths = _strings(f["images/path"]) if "images/path" in f else None
    scorer = f["patients/scorer"][()].astype(np.int16) if "patients/scorer" in f else None
    prov_raw = _attr_str(f.attrs.get("provenance"))
    digest_attr = f.attrs.get(CONTENT_DIGEST)
    if digest_attr is not None and _attr_str(digest_attr) != content_sha256(
        emb, ptr, ids, lab, clin, cols, fcols, paths, scorer, prov_raw
    ):
        raise LymphError(
            f"{where}: content does not match its root attribute '{CONTENT_DIGEST}' "
            "(file corrupted)"
        )
    try:
        prov = json.loads(prov_raw) if prov_raw else {}
    except json.JSONDecodeError:
        raise LymphError(f"{where}: root attribute 'provenance' is not valid JSON") from None
    _check_arrays(where, emb, ptr, ids, lab, clin, cols, fcols, paths, scorer)
    return EmbeddingStore(
        path=path, embeddings=emb, patient_ptr=ptr, ids=ids, labels=lab, clinical=clin,
        clinical_columns=cols, feature_columns=fcols, image_paths=paths, patient_scorer=scorer,
        provenance=prov, fingerprint=fingerprint,
    )


load_store = open_store
