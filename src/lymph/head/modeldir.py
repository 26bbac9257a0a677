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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import atomic_path, sha256_file
from lymph.errors import LymphError

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
        info = self.meta.get("encoder", {})
        name = info.get("file")
        if not name:
            return None
        enc = self.path / name
        want = info.get("sha256")
        if want and enc.is_file() and sha256_file(enc) != want:
            raise LymphError(f"{enc}: content does not match the sha256 in model.json "
                             "(corrupted or replaced encoder copy)")
        return enc

    @property
    def store_provenance(self) -> dict[str, Any]:
        return dict(self.meta.get("store", {}).get("provenance") or {})


def _copy_encoder(store: Any, dest: Path) -> dict[str, Any]:
    prov = getattr(store, "provenance", None) or {}
    src = prov.get("encoder_checkpoint")
    info: dict[str, Any] = {"file": None, "source": src, "sha256": prov.get("encoder_sha256")}
    if not src:
        return info
    src_p = Path(str(src))
    if not src_p.exists():
        log.warning("encoder checkpoint %s (named by the store) not found: the model directory "
                    "will have no encoder, so `lymph predict --data` cannot be used with it", src)
        return info
    name = f"encoder/{src_p.name}"
    (dest / "encoder").mkdir()
    if src_p.is_dir():
        shutil.copytree(src_p, dest / name)
    else:
        want = prov.get("encoder_sha256")
        got = sha256_file(src_p)
        if want and got != want:
            log.warning("encoder checkpoint %s changed since the store was made (sha256 %s, the "
                        "store says %s): not copied; `lymph predict --data` will be refused",
                        src, got[:12], str(want)[:12])
            shutil.rmtree(dest / "encoder")
            return info
        shutil.copy2(src_p, dest / name)
        info["sha256"] = got
    info["file"] = name
    return info


def save_model(model: Any, path: str | os.PathLike[str], *, store: Any,
               extra: dict[str, str | os.PathLike[str]] | None = None) -> Path:
    """Write a fitted estimator to ``path`` atomically: a :class:`MILClassifier` (weights in
    ``head.pt``) or a late-fusion model (its whole state as JSON numbers in ``model.json``).

    ``store`` is the store it was fitted on (fingerprint, provenance, encoder). ``extra``
    maps names inside the directory (e.g. ``cv/oof.csv``) to files to copy in.
    """
    if type(model).__name__ == "LateFusion":  # fit-head --fusion late: JSON state, no weights
        state = model.to_json()
        return _write_model_dir(path, model, store, extra, lambda tmp: {
            "fusion": "late", "params": state["params"],
            "clinical_columns": state["clinical_columns"],
            "feature_columns": state["feature_columns"], "dim": state["dim"],
            "threshold": state["threshold"], "late_fusion": state})
    if not hasattr(model, "model_"):
        raise LymphError("save_model: the model is not fitted")

    def mil_meta(tmp: Path) -> dict[str, Any]:
        import torch

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

    path = Path(path)
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
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=str) + "\n",
                                        encoding="utf-8")
    return path


def load_model(path: str | os.PathLike[str]) -> SavedModel:
    """Load and check a model directory; :class:`LymphError` says what is wrong."""
    import torch

    from lymph.head.bags import Scaler
    from lymph.head.estimator import MILClassifier
    from lymph.head.model import HeadConfig, build_head

    path = Path(path)
    mj = path / "model.json"
    if not mj.is_file():
        raise LymphError(f"{path}: not a model directory (expected {mj.name}; "
                         "make one with `lymph fit-head --out`)")
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LymphError(f"{mj}: unreadable model description ({e})") from None
    if meta.get("encoding-type") != ENCODING_TYPE:
        raise LymphError(f"{mj}: 'encoding-type': expected {ENCODING_TYPE!r}, "
                         f"got {meta.get('encoding-type')!r}")
    if meta.get("encoding-version") != ENCODING_VERSION:
        raise LymphError(f"{mj}: 'encoding-version' is {meta.get('encoding-version')!r}; this "
                         f"lymph reads {ENCODING_VERSION}. Upgrade lymph to read it.")
    if meta.get("estimator") == "LateFusion":  # fit-head --fusion late (lymph.baselines)
        from lymph.baselines import LateFusion

        return SavedModel(path=path, estimator=LateFusion.from_json(meta["late_fusion"]), meta=meta)
    if meta.get("estimator") != "MILClassifier":
        raise LymphError(f"{mj}: 'estimator': expected 'MILClassifier', got {meta.get('estimator')!r}")
    wfile = path / meta["weights"]["file"]
    if not wfile.is_file():
        raise LymphError(f"{wfile}: missing head weights")
    if sha256_file(wfile) != meta["weights"]["sha256"]:
        raise LymphError(f"{wfile}: content does not match the sha256 in model.json (corrupted)")
    try:
        state = torch.load(wfile, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types (UnpicklingError for foreign objects)
        raise LymphError(f"{wfile}: not loadable head weights ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    params = dict(meta["params"])
    params["mlp"] = tuple(params["mlp"])
    est = MILClassifier(**params)
    est.classes_ = np.array([0, 1])
    est.config_ = HeadConfig.from_json(meta["config"])
    est.clinical_columns_ = list(meta["clinical_columns"])
    est.feature_columns_ = meta["feature_columns"]
    est.dim_ = int(meta["dim"])
    est.threshold_ = float(meta["threshold"])
    est.clinical_scaler_ = Scaler.from_json(meta["clinical_scaler"])
    est.instance_scaler_ = (None if meta["instance_scaler"] is None
                            else Scaler.from_json(meta["instance_scaler"]))
    est.best_epoch_ = meta["training"]["best_epoch"]
    est.epochs_run_ = meta["training"]["epochs_run"]
    est.inner_val_ids_ = meta["training"]["inner_val_ids"]
    net = build_head(est.config_)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise LymphError(f"{wfile}: weights do not fit the config in model.json ({e})") from None
    net.eval()
    est.model_ = net
    return SavedModel(path=path, estimator=est, meta=meta)
