"""Output-path safety: what a command may write over, checked before any work.

Every command that writes calls :func:`check_outputs` with the paths it will write (each
with its *kind*) and the paths it reads. An existing output path is accepted only when it
is an artifact of the same kind that lymph wrote (recognised by its format attributes,
header or stamp); it is then replaced atomically (:mod:`lymph.atomic`). Anything else is a
:class:`LymphError` naming the path and why:

- a folder or file that is not a lymph artifact of that kind (a user's file, a folder
  with other content, a lymph artifact of another kind);
- an input of the command, or a folder holding one (replacing it would delete the input);
- two outputs of one command at the same path.

A missing parent folder is created when the output is written (every command alike).
Nothing here imports torch; reading a format stamp costs a few milliseconds.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lymph.errors import LymphError

#: the stamp lymph writes into its PNG files (tEXt chunk ``Software``)
PNG_SOFTWARE = "lymph"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_HDF5_SIG = b"\x89HDF\r\n\x1a\n"


# ---- recognising lymph artifacts -----------------------------------------------------------
def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        line = f.readline(4096)
    return line.decode("utf-8", "replace").strip().lstrip("\ufeff")


def _csv_with_header(*headers: str) -> Callable[[Path], str | None]:
    def check(p: Path) -> str | None:
        if not p.is_file():
            return "it is not a regular file"
        if _first_line(p) in headers:
            return None
        return f"its first line is not lymph's header {headers[0]!r}"
    return check


def _png(p: Path) -> str | None:
    """A PNG whose ``Software`` text names lymph or matplotlib (lymph's plots)."""
    if not p.is_file():
        return "it is not a regular file"
    data = _head(p, 1 << 16)
    if not data.startswith(_PNG_SIG):
        return "it is not a PNG file"
    pos = len(_PNG_SIG)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if ctype in (b"tEXt", b"iTXt", b"zTXt"):
            key, _, value = body.partition(b"\0")
            if ctype == b"zTXt" and value[:1] == b"\0":
                try:
                    value = zlib.decompress(value[1:])
                except zlib.error:
                    value = b""
            if key == b"Software" and (b"lymph" in value or b"atplotlib" in value):
                return None
        if ctype in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return "it is a PNG that lymph did not write"


def _json_doc(p: Path) -> str | None:
    """A JSON file lymph wrote: an object with lymph's keys, or a list of such rows."""
    if not p.is_file():
        return "it is not a regular file"
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "it is not a JSON file lymph wrote"
    keys = {"model", "rows", "n_patients", "balanced_accuracy", "stage", "fingerprint"}
    if isinstance(obj, dict) and keys & set(obj):
        return None
    if isinstance(obj, list) and all(isinstance(r, dict) and "model" in r for r in obj):
        return None
    return "it is not a JSON file lymph wrote"


def _store(p: Path) -> str | None:
    if not p.is_file():
        return "it is not a regular file"
    if not _head(p, 8).startswith(_HDF5_SIG):
        return "it is not an embedding store (not an HDF5 file)"
    try:
        import h5py

        with h5py.File(p, "r") as f:
            etype = f.attrs.get("encoding-type")
    except Exception:  # noqa: BLE001 -- any damaged file: not recognisably ours
        return "it is not a readable embedding store"
    if isinstance(etype, bytes):
        etype = etype.decode("utf-8", "replace")
    if etype == "lymph-embeddings":
        return None
    return "it is an HDF5 file but not a lymph embedding store"


def _checkpoint(p: Path) -> str | None:
    """A torch zip archive whose pickle names lymph's checkpoint format."""
    if not p.is_file():
        return "it is not a regular file"
    try:
        with zipfile.ZipFile(p) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            if pkl is not None and b"lymph-encoder" in z.read(pkl):
                return None
    except (zipfile.BadZipFile, OSError, KeyError):
        pass
    return "it is not a lymph encoder checkpoint"


def _zarr_attrs(p: Path) -> dict[str, Any]:
    try:
        meta = json.loads((p / "zarr.json").read_text(encoding="utf-8"))
        return dict(meta.get("attributes") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _only(p: Path, allowed: set[str]) -> str | None:
    extra = sorted(n for n in os.listdir(p) if n not in allowed)
    if extra:
        return f"it holds files lymph did not write ({', '.join(extra[:3])})"
    return None


def _cache(p: Path) -> str | None:
    if not p.is_dir():
        return "it is a file, not an image cache folder"
    if _zarr_attrs(p).get("encoding-type") != "lymph-image-cache":
        return "it is a folder that is not a lymph image cache"
    return _only(p, {"zarr.json", "pixels", "patient_ptr", "pixels_ok"})


def _model(p: Path) -> str | None:
    if not p.is_dir():
        return "it is a file, not a model directory"
    try:
        meta = json.loads((p / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("encoding-type") != "lymph-model":
        return "it is a folder that is not a lymph model directory"
    return _only(p, {"model.json", "head.pt", "encoder", "cv", *_named_files(meta)})


def _named_files(obj: Any) -> set[str]:
    """First components of the relative file names a ``model.json`` records under a
    ``file`` key (a later lymph may add files; they are lymph's too)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "file" and isinstance(v, str) and v and not os.path.isabs(v):
                out.add(Path(v).parts[0])
            else:
                out |= _named_files(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _named_files(v)
    return out


def _report(p: Path) -> str | None:
    if not p.is_dir():
        return "it is a file, not a report folder"
    if (p / "report.md").is_file() and _first_line(p / "report.md").startswith("# ") and (
            _json_doc(p / "comparison.json") is None):
        return None
    return "it is a folder that is not a lymph report"


def _synth(p: Path) -> str | None:
    if not p.is_dir():
        return "it is a file, not a dataset folder"
    if (p / "synth_truth.csv").is_file() and _first_line(p / "synth_truth.csv") == \
            "patient,image,atypical":
        return _only(p, {"trainset", "testset", "clinical_annotation.csv", "synth_truth.csv",
                         ".DS_Store"})
    return "it is a folder that is not a synthetic dataset lymph wrote"


def _artifacts(p: Path) -> str | None:
    """`lymph run`'s artifacts folder: only stage folders are ever written inside it, so
    any folder will do (its other content is never touched); a file will not."""
    if not p.is_dir():
        return "it is a file, not an artifacts folder"
    return None


#: kind -> (what it is, checker returning None when an existing path may be replaced)
KINDS: dict[str, tuple[str, Callable[[Path], str | None]]] = {
    "cache": ("an image cache", _cache),
    "store": ("an embedding store", _store),
    "checkpoint": ("an encoder checkpoint", _checkpoint),
    "model": ("a model directory", _model),
    "report": ("a report folder", _report),
    "synth": ("a synthetic dataset", _synth),
    "artifacts": ("an artifacts folder", _artifacts),
    "predictions": ("a predictions CSV", _csv_with_header("id,probability,predicted")),
    "attention": ("an attention CSV", _csv_with_header("id,image_index,image_path,weight")),
    "submission": ("a submission CSV", _csv_with_header("Id,Predicted")),
    "oof": ("an out-of-fold CSV",
            _csv_with_header("id,label,repeat,fold,probability,threshold,predicted")),
    "json": ("a JSON file", _json_doc),
    "png": ("a PNG image", _png),
}


# ---- the check -----------------------------------------------------------------------------
def _resolved(p: Path) -> Path:
    try:
        return p.expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare as written
        return Path(os.path.abspath(p))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output(path: str | os.PathLike[str], kind: str, *, name: str = "--out",
                 inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Refuse ``path`` as an output of ``kind`` unless writing it harms nothing."""
    what, check = KINDS[kind]
    p = Path(path)
    if str(p) == "" or p.name in ("", ".", ".."):
        raise LymphError(f"{name} {p}: expected a file or folder name to write {what}")
    r = _resolved(p)
    for inp in inputs:
        if inp is None:
            continue
        ri = _resolved(Path(inp))
        if _inside(ri, r):
            why = "is an input of this command" if ri == r else f"holds the input {inp}"
            raise LymphError(f"{name} {p}: refused: the output path {why}; "
                             "writing it would replace the input")
    if p.is_symlink() and not p.exists():
        raise LymphError(f"{name} {p}: refused: a dangling symbolic link")
    if p.exists():
        try:
            why = check(p)
        except OSError as e:
            why = f"it cannot be read ({e.strerror})"
        if why is not None and kind in ("artifacts",):
            raise LymphError(f"{name} {p}: refused: {why}")
        if why is not None:
            if p.is_dir() and not any(p.iterdir()) and kind in (
                    "cache", "model", "report", "synth"):
                return p  # an empty folder holds nothing to lose
            raise LymphError(f"{name} {p}: refused to replace an existing path: {why} "
                             f"(lymph only replaces {what} it wrote; choose another path)")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise LymphError(f"{name} {p}: refused: {parent} is a file, not a folder")
    return p


def check_outputs(outputs: dict[str, tuple[str | os.PathLike[str] | None, str]], *,
                  inputs: Iterable[str | os.PathLike[str] | None] = ()) -> None:
    """Check every output (``{name: (path, kind)}``; a None path is skipped) with
    :func:`check_output`, and that no two share a path."""
    inputs = list(inputs)
    seen: dict[Path, str] = {}
    for name, (path, _kind) in outputs.items():
        if path is None:
            continue
        r = _resolved(Path(path))
        if r in seen:
            raise LymphError(f"{name} {path}: the same path as {seen[r]}; two outputs of one "
                             "command must not share a path")
        seen[r] = name
    for name, (path, kind) in outputs.items():
        if path is not None:
            check_output(path, kind, name=name, inputs=inputs)
    # one output inside another folder output would be replaced with it
    for name, (path, kind) in outputs.items():
        if path is None or kind not in ("cache", "model", "report", "synth"):
            continue
        r = _resolved(Path(path))
        for other, (op, _) in outputs.items():
            if op is not None and other != name and r in _resolved(Path(op)).parents:
                raise LymphError(f"{other} {op}: inside the output folder {name} {path}; "
                                 "choose a path outside it")
