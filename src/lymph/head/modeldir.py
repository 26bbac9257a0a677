"""A self-contained model directory: everything ``lymph predict`` needs, nothing else.

Layout (encoding-type ``lymph-model``, encoding-version ``1``)::

    MODEL_DIR/
      model.json        format stamp, estimator name and parameters, HeadConfig, clinical
                        columns, clinical and instance scalers (JSON numbers), threshold,
                        training summary, the training store's fingerprint and provenance,
                        the encoder copy's name and sha256, the weights' sha256
      head.pt           the head's torch state dict (loaded with weights_only=True)
      encoder/NAME      a copy of the encoder checkpoint named by the store's provenance
                        (``encoder_checkpoint``), when that file exists
      cv/               fit-head's cross-validation outputs (metrics.json, oof.csv, pr.png)

Paths inside are relative, so the directory still works after being moved. It is written
atomically (a temporary folder renamed into place): an interrupted save leaves no partial
model behind. No pickles: the weights are tensors, everything else JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import atomic_path, sha256_file
from lymph.errors import LymphError
from lymph.head.registry import estimator_class, estimator_spec

log = logging.getLogger("lymph")

ENCODING_TYPE = "lymph-model"
ENCODING_VERSION = "1"


@dataclass
class SavedModel:
    """A loaded model directory."""

    path: Path
    estimator: Any  # a fitted MILClassifier
    meta: dict[str, Any]  # model.json

    @property
    def encoder_path(self) -> Path | None:
        """The encoder copy, checked against the sha256 in model.json (a file changed since
        the model was saved is refused before anything is embedded with it)."""
        info = self.meta.get("encoder") or {}
        name = info.get("file")
        if not name:
            return None
        return member_file(self.path, name, info.get("sha256"), "encoder.file")

    @property
    def store_provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("store", {}).get("provenance") or {})


_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def member_file(folder: Path, name: Any, sha256: Any, field: str) -> Path:
    """A file a model directory names: a relative name resolving inside ``folder``, a
    regular file, matching its recorded sha256. Checked before anything reads it."""
    mj = folder / "model.json"
    if not isinstance(name, str) or not name or Path(name).is_absolute() or \
            ".." in Path(name).parts or "\\" in name:
        raise LymphError(f"{mj}: '{field}': expected a file name inside the model directory, "
                         f"got {name!r}")
    path = folder / name
    root = folder.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        real = path
    if root not in real.parents:
        raise LymphError(f"{mj}: '{field}': {name!r} leads outside the model directory")
    if path.is_symlink() or not path.is_file():
        raise LymphError(f"{path}: expected a regular file inside the model directory "
                         f"('{field}' in model.json); missing or not a file")
    if not isinstance(sha256, str) or not _SHA_RE.match(sha256):
        raise LymphError(f"{mj}: '{field}' has no valid recorded sha256 (expected 64 hex "
                         f"digits, got {str(sha256)[:70]!r})")
    if sha256_file(path) != sha256:
        raise LymphError(f"{path}: content does not match the sha256 in model.json "
                         "(corrupted or replaced)")
    return path


def check_encoder_available(store: Any) -> None:
    """A model must be able to predict from raw data: when the store names an encoder
    checkpoint, it must exist and be the one the store was made with. Called by
    ``fit-head --out`` before any training, so the problem shows at fit time."""
    prov = getattr(store, "provenance", None) or {}
    src = prov.get("encoder_checkpoint")
    if not src:
        return
    src_p = Path(str(src))
    where = getattr(store, "path", None) or "the store"
    if not src_p.is_file():
        raise LymphError(
            f"{where}: provenance 'encoder_checkpoint' names {src}, which is not a file: the "
            "model directory needs a copy of the encoder (to predict from raw data); put the "
            "checkpoint back or embed again")
    want = prov.get("encoder_sha256")
    if want and sha256_file(src_p) != want:
        raise LymphError(
            f"{src}: the encoder checkpoint changed since {where} was made (its sha256 is not "
            "the store's 'encoder_sha256'); embed again with this encoder")
    import torch

    from lymph.finite import check_state

    try:
        ckpt = torch.load(src_p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises several types for foreign files)
        raise LymphError(f"{src}: not a loadable encoder checkpoint ({type(e).__name__})") from None
    check_state(ckpt, src)  # weights (and every part of a combination) finite


def _copy_encoder(store: Any, dest: Path) -> dict[str, Any]:
    prov = getattr(store, "provenance", None) or {}
    src = prov.get("encoder_checkpoint")
    info: dict[str, Any] = {"file": None, "source": src, "sha256": prov.get("encoder_sha256")}
    if not src:
        return info
    check_encoder_available(store)
    src_p = Path(str(src))
    name = f"encoder/{src_p.name}"
    (dest / "encoder").mkdir()
    shutil.copy2(src_p, dest / name)
    info["sha256"] = sha256_file(dest / name)
    info["file"] = name
    return info


def save_model(model: Any, path: str | os.PathLike[str], *, store: Any,
               extra: dict[str, str | os.PathLike[str]] | None = None) -> Path:
    """Write a fitted estimator to ``path`` atomically: a :class:`MILClassifier` (weights in
    ``head.pt``) or a JSON-state estimator (late fusion, composition: its whole state as JSON
    numbers in ``model.json``, checked on load by its ``check_json`` when it has one).

    ``store`` is the store it was fitted on (fingerprint, provenance, encoder). ``extra``
    maps names inside the directory (e.g. ``cv/oof.csv``) to files to copy in.
    """
    spec = estimator_spec(type(model).__name__, "save_model")
    if spec.state == "json":  # e.g. fit-head --fusion late: JSON state, no weights
        state = model.to_json()
        return _write_model_dir(path, model, store, extra, lambda tmp: {
            "fusion": spec.fusion, "params": state["params"],
            "clinical_columns": state["clinical_columns"],
            "feature_columns": state["feature_columns"], "dim": state["dim"],
            "threshold": state["threshold"], spec.state_key: state})
    if not hasattr(model, "model_"):
        raise LymphError("save_model: the model is not fitted")

    def mil_meta(tmp: Path) -> dict[str, Any]:
        import torch

        from lymph.finite import check_state

        check_state(model.model_.state_dict(), "the fitted head")  # never saved non-finite
        with open(tmp / "head.pt", "wb") as f:
            torch.save(model.model_.state_dict(), f)
        params = model.get_params()
        params["mlp"] = list(params["mlp"])
        return {
            "params": params,
            "config": model.config_.to_json(),
            "clinical_columns": list(model.clinical_columns_),
            "feature_columns": None if model.feature_columns_ is None else list(model.feature_columns_),
            "dim": int(model.dim_),
            "threshold": float(model.threshold_),
            "clinical_scaler": model.clinical_scaler_.to_json(),
            "instance_scaler": None if model.instance_scaler_ is None else model.instance_scaler_.to_json(),
            "training": {"best_epoch": int(model.best_epoch_), "epochs_run": int(model.epochs_run_),
                         "inner_val_ids": list(model.inner_val_ids_)},
            "weights": {"file": "head.pt", "sha256": sha256_file(tmp / "head.pt")},
        }

    return _write_model_dir(path, model, store, extra, mil_meta)


def _write_model_dir(path: str | os.PathLike[str], model: Any, store: Any,
                     extra: dict[str, str | os.PathLike[str]] | None,
                     estimator_meta: Any) -> Path:
    """The directory every estimator shares: ``model.json`` (format stamp, what the
    estimator writes via ``estimator_meta(tmp)``, training counts, the store's fingerprint
    and provenance), the encoder copy and the ``extra`` files; atomic."""
    import lymph
    from lymph.outputs import check_output

    path = Path(path)
    check_output(path, "model", name="model directory")  # replaces only a lymph model
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        meta = {"encoding-type": ENCODING_TYPE, "encoding-version": ENCODING_VERSION,
                "lymph_version": lymph.__version__, "estimator": type(model).__name__,
                **estimator_meta(tmp)}
        meta["training"] = {**meta.get("training", {}),
                            "n_patients": int(store.labelled().size),
                            "n_malignant": int((store.labels == 1).sum())}
        meta["store"] = {"path": None if store.path is None else str(Path(store.path).resolve()),
                         "fingerprint": store.fingerprint, "provenance": store.provenance}
        meta["encoder"] = _copy_encoder(store, tmp)
        for name, src in (extra or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / name)
        _finite_numbers(path / "model.json", "model.json", meta)  # never written non-finite
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=str) + "\n",
                                        encoding="utf-8")
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    mj = path / "model.json"
    if not path.is_dir():
        raise LymphError(f"{path}: not a model directory (make one with `lymph fit-head --out`)")
    if not mj.is_file():
        raise LymphError(f"{path}: not a model directory (expected {mj.name}; "
                         "make one with `lymph fit-head --out`)")
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise LymphError(f"{mj}: unreadable model description ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise LymphError(f"{mj}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("encoding-type") != ENCODING_TYPE:
        raise LymphError(f"{mj}: 'encoding-type': expected {ENCODING_TYPE!r}, "
                         f"got {meta.get('encoding-type')!r}")
    if meta.get("encoding-version") != ENCODING_VERSION:
        raise LymphError(f"{mj}: 'encoding-version' is {meta.get('encoding-version')!r}; this "
                         f"lymph reads {ENCODING_VERSION}. Upgrade lymph to read it.")
    return meta


def _expect(mj: Path, meta: dict[str, Any], key: str, types: Any, what: str) -> Any:
    if key not in meta:
        raise LymphError(f"{mj}: missing key '{key}' (expected {what})")
    v = meta[key]
    if not isinstance(v, types) or isinstance(v, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        raise LymphError(f"{mj}: '{key}': expected {what}, got {type(v).__name__} {str(v)[:60]}")
    return v


def _finite_numbers(mj: Path, key: str, obj: Any) -> None:
    """Every number inside ``obj`` (nested lists / dicts) is finite."""
    def walk(v: Any) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, dict):
            return all(walk(x) for x in v.values())
        if isinstance(v, list):
            return all(walk(x) for x in v)
        return True
    if not walk(obj):
        raise LymphError(f"{mj}: '{key}': expected finite numbers, got NaN or infinity")


def _check_common(mj: Path, meta: dict[str, Any]) -> float:
    from lymph.checks import check_float, check_int

    thr = check_float(f"{mj}: 'threshold'", _expect(mj, meta, "threshold", (int, float),
                                                     "a number in (0, 1)"),
                      0.0, 1.0, lo_open=True, hi_open=True)
    check_int(f"{mj}: 'dim'", _expect(mj, meta, "dim", int, "an integer"), 0)
    cols = _expect(mj, meta, "clinical_columns", list, "a list of column names")
    if not all(isinstance(c, str) for c in cols):
        raise LymphError(f"{mj}: 'clinical_columns': expected a list of strings")
    fc = meta.get("feature_columns")
    if fc is not None and not (isinstance(fc, list) and all(isinstance(c, str) for c in fc)):
        raise LymphError(f"{mj}: 'feature_columns': expected null or a list of strings")
    enc = meta.get("encoder")
    if enc is not None and not isinstance(enc, dict):
        raise LymphError(f"{mj}: 'encoder': expected an object, got {type(enc).__name__}")
    if enc and enc.get("file") is not None:
        member_file(mj.parent, enc.get("file"), enc.get("sha256"), "encoder.file")
    st = meta.get("store")
    if st is not None and not isinstance(st, dict):
        raise LymphError(f"{mj}: 'store': expected an object, got {type(st).__name__}")
    if st is not None and not isinstance(st.get("provenance") or {}, dict):
        raise LymphError(f"{mj}: 'store.provenance': expected an object")
    _finite_numbers(mj, "model.json", meta)
    return thr


def load_model(path: str | os.PathLike[str]) -> SavedModel:
    """Load and check a model directory; :class:`LymphError` says what is wrong.

    Every file it names is checked (inside the folder, a regular file, its recorded
    sha256) and every value type- and range-checked before anything is loaded."""
    path = Path(path)
    meta = _read_meta(path)
    mj = path / "model.json"
    try:
        return _load(path, mj, meta)
    except LymphError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise LymphError(f"{mj}: malformed model description ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def _load(path: Path, mj: Path, meta: dict[str, Any]) -> SavedModel:
    spec = estimator_spec(meta.get("estimator"), f"{mj}: 'estimator'")
    _check_common(mj, meta)
    if spec.state == "json":  # e.g. fit-head --fusion late (lymph.baselines)
        state = _expect(mj, meta, str(spec.state_key), dict,
                        f"an object (the {spec.name} state)")
        cls = estimator_class(spec.name)
        if hasattr(cls, "check_json"):  # shapes and ranges, each message naming its field
            cls.check_json(state, f"{mj}: '{spec.state_key}")
        est = cls.from_json(state)
        from lymph.checks import check_threshold

        check_threshold(f"{mj}: '{spec.state_key}.threshold'", getattr(est, "threshold_", 0.5))
        return SavedModel(path=path, estimator=est, meta=meta)
    import torch

    from lymph.finite import check_state
    from lymph.head.bags import Scaler
    from lymph.head.estimator import MILClassifier
    from lymph.head.ensemble import build_head
    from lymph.head.model import HeadConfig

    weights = _expect(mj, meta, "weights", dict, "an object with 'file' and 'sha256'")
    wfile = member_file(path, weights.get("file"), weights.get("sha256"), "weights.file")
    params = dict(_expect(mj, meta, "params", dict, "an object (the estimator's parameters)"))
    config = _expect(mj, meta, "config", dict, "an object (the head's configuration)")
    cs = _expect(mj, meta, "clinical_scaler", dict, "an object with 'mean' and 'std'")
    isc = meta.get("instance_scaler")
    if isc is not None and not isinstance(isc, dict):
        raise LymphError(f"{mj}: 'instance_scaler': expected null or an object")
    training = _expect(mj, meta, "training", dict, "an object")
    if "mlp" in params:
        params["mlp"] = tuple(params["mlp"])
    try:
        est = MILClassifier(**params)
    except TypeError as e:
        raise LymphError(f"{mj}: 'params': {e}") from None
    _check_head_params(mj, est)
    _check_config(mj, config)
    try:
        state = torch.load(wfile, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (UnpicklingError for foreign objects)
        raise LymphError(f"{wfile}: not loadable head weights ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if not isinstance(state, dict):
        raise LymphError(f"{wfile}: expected a state dict of tensors")
    check_state(state, wfile)
    est.classes_ = np.array([0, 1])
    est.config_ = HeadConfig.from_json(config)
    est.clinical_columns_ = list(meta["clinical_columns"])
    est.feature_columns_ = meta.get("feature_columns")
    est.dim_ = int(meta["dim"])
    est.threshold_ = float(meta["threshold"])
    est.clinical_scaler_ = Scaler.from_json(cs)
    est.instance_scaler_ = None if isc is None else Scaler.from_json(isc)
    for name, sc in (("clinical_scaler", est.clinical_scaler_),
                     ("instance_scaler", est.instance_scaler_)):
        if sc is not None and (sc.mean.shape != sc.std.shape or (sc.std <= 0).any()):
            raise LymphError(f"{mj}: '{name}': expected 'mean' and 'std' of one length, "
                             "std > 0")
    est.best_epoch_ = training.get("best_epoch")
    est.epochs_run_ = training.get("epochs_run")
    est.inner_val_ids_ = training.get("inner_val_ids", [])
    net = build_head(est.config_)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise LymphError(f"{wfile}: weights do not fit the config in model.json ({e})") from None
    net.eval()
    est.model_ = net
    return SavedModel(path=path, estimator=est, meta=meta)


def _check_config(mj: Path, config: dict[str, Any]) -> None:
    """The head's architecture, range-checked before a tensor is made from it."""
    from lymph.checks import check_float, check_int
    from lymph.head.registry import check_pooling

    for key, lo in (("dim", 0), ("n_clinical", 0), ("attention_hidden", 1)):
        if key in config:
            check_int(f"{mj}: 'config.{key}'", config[key], lo)
    for h in config.get("mlp") or ():
        check_int(f"{mj}: 'config.mlp'", h, 1)
    if "dropout" in config:
        check_float(f"{mj}: 'config.dropout'", config["dropout"], 0.0, 1.0, hi_open=True)
    if "pooling" in config and config["pooling"] is not None:
        check_pooling(config["pooling"], f"{mj}: 'config.pooling'")


def _check_head_params(mj: Path, est: Any) -> None:
    """The parameters read back are range-checked like fit-head's options."""
    from lymph.checks import check_float, check_int

    if hasattr(est, "_check_params"):
        est._check_params()
    p = est.get_params()
    for key in ("attention_hidden", "batch_size", "max_epochs"):
        if key in p and p[key] is not None:
            check_int(f"{mj}: 'params.{key}'", p[key], 1)
    if p.get("dropout") is not None:
        check_float(f"{mj}: 'params.dropout'", p["dropout"], 0.0, 1.0, hi_open=True)
    for h in p.get("mlp") or ():
        check_int(f"{mj}: 'params.mlp'", h, 1)
