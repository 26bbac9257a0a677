"""``lymph predict``: a saved model directory applied to a store or to raw challenge data.

With ``data_dir`` the images are embedded first by stage one
(:func:`lymph.encoder.run.embed_dataset`) with the encoder copy inside the model
directory, into ``PRED.store.h5`` beside the predictions. Outputs (all written atomically):

- ``PRED.csv``: ``id,probability,predicted`` (probability of malignancy, 0/1 at the
  model's threshold), one row per selected patient in store order;
- ``PRED.attention.csv`` (image models): ``id,image_index,image_path,weight``, one row per
  image (``image_path`` empty when the store records none); models that score cells
  (late fusion, composition: ``cell_scores``) add ``cell_score``, each cell's score or push
  towards malignant (their ``weight`` is the uniform ``1 / n`` of a mean);
- ``SUB.csv`` (optional): the challenge submission, header ``Id,Predicted``, 0/1.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymph.atomic import write_text_atomic
from lymph.errors import LymphError
from lymph.head.modeldir import SavedModel, load_model

SELECTIONS = ("all", "labelled", "unlabelled")


@dataclass
class Prediction:
    ids: np.ndarray
    probability: np.ndarray
    predicted: np.ndarray
    threshold: float
    store_path: Path | None
    outputs: dict[str, Path]


def check_encoder(saved: SavedModel, store: Any) -> None:
    """Refuse a store made with another encoder than the model's training store."""
    if not saved.estimator.images:
        return
    want = saved.store_provenance.get("encoder_sha256")
    got = (store.provenance or {}).get("encoder_sha256")
    if (want or got) and want != got:
        raise LymphError(
            f"{store.path or 'store'}: provenance 'encoder_sha256' is {str(got)[:12]}..., the model "
            f"{saved.path} expects {str(want)[:12]}... (its training store's encoder): a store "
            "from a different encoder; embed the data with the model's encoder "
            "(`lymph predict --data`)")


def check_probabilities(ids: Any, p: np.ndarray, where: Any) -> None:
    """No label from a number that is not a probability: every value must be finite and in
    [0, 1], else the whole prediction is refused (nothing is written)."""
    bad = ~(np.isfinite(p) & (p >= 0.0) & (p <= 1.0))
    if bad.any():
        idx = np.flatnonzero(bad)
        names = ", ".join(f"{ids[i]} ({p[i]!r})" for i in idx[:5])
        raise LymphError(
            f"{where}: no prediction written: the model gave {idx.size} patient(s) a "
            f"probability that is not a finite number in [0, 1]: {names}"
            + (" ..." if idx.size > 5 else "") + " (non-finite embeddings or model?)")


def _csv(rows: list[list[Any]], header: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def embed_like_model(saved: SavedModel, data: Path, store_path: Path, work_dir: Path, *,
                     device: str = "auto") -> Path | None:
    """Make a store of ``data`` the way the model's training store was made.

    With the encoder copy of the model directory (any trained method, or a combination's
    checkpoint) through :func:`lymph.encoder.run.embed_dataset`; for a morphometry model
    (no encoder) by ingesting at the training store's image size and measuring again.
    Returns the image cache used (for montages), or None.
    """
    from lymph.data.cache import ingest, open_cache

    enc = saved.encoder_path
    prov = saved.store_provenance
    if enc is not None and enc.exists():
        from lymph.encoder.run import embed_dataset

        embed_dataset(data, enc, store_path, work_dir=work_dir, device=device)
        caches = sorted(work_dir.glob("*.zarr"))
        return caches[0] if caches else None
    from lymph.encoder.registry import METHODS, resolve  # torch-free

    spec = METHODS.get(str(prov.get("method")))
    if spec is not None and spec.writer is not None:  # no network (morphometry): measure again
        if spec.version is not None:
            current = str(resolve(spec.version))
            version = str(prov.get(f"{spec.name}_version", current))
            if version != current:
                raise LymphError(
                    f"{saved.path}: the model was trained on {spec.name} version {version}, "
                    f"this lymph measures version {current}; refit the model")
        cache_path = work_dir / "images.zarr"
        ingest(data, cache_path, size=int(prov.get("image_size", spec.default_size)),
               crop=prov.get("image_crop"))
        resolve(spec.writer)(open_cache(cache_path), store_path)
        return cache_path
    raise LymphError(f"{saved.path}: the model directory holds no encoder checkpoint and its "
                     f"store's method is {prov.get('method')!r}, so --data cannot be embedded "
                     "the same way; use --store with a store made like the training store")


def predict(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
            store: str | os.PathLike[str] | None = None,
            data: str | os.PathLike[str] | None = None,
            submission: str | os.PathLike[str] | None = None, select: str = "all",
            work_dir: str | os.PathLike[str] | None = None, device: str = "auto") -> Prediction:
    """Predict every selected patient of ``store`` (or of ``data``, embedded first)."""
    from lymph.store import open_store

    if (store is None) == (data is None):
        raise LymphError("predict: expected exactly one of `store` and `data`")
    if select not in SELECTIONS:
        raise LymphError(f"select: expected one of {', '.join(SELECTIONS)}, got {select!r}")
    saved = load_model(model_dir)
    out = Path(out)
    if data is not None:
        store_path = out.with_name(out.stem + ".store.h5")
        if work_dir is None:
            from lymph.atomic import temp_dir

            with temp_dir(out.parent, "predict") as wd:
                embed_like_model(saved, Path(data), store_path, wd, device=device)
        else:
            embed_like_model(saved, Path(data), store_path, Path(work_dir), device=device)
    else:
        store_path = Path(store)  # type: ignore[arg-type]
    s = open_store(store_path)
    check_encoder(saved, s)
    rows = {"all": np.arange(s.n_patients), "labelled": s.labelled(),
            "unlabelled": np.flatnonzero(s.labels < 0)}[select]
    if rows.size == 0:
        raise LymphError(f"{store_path}: no patients selected (`select` {select}: empty selection)")
    sub = s.subset(rows) if rows.size != s.n_patients else s
    est = saved.estimator
    p = np.asarray(est.predict_proba(sub)[:, 1], dtype=np.float64)
    check_probabilities(sub.ids, p, store_path)
    pred = (p >= est.threshold_).astype(np.int64)
    outputs = {"predictions": out}
    write_text_atomic(out, _csv([[str(i), f"{v:.6f}", int(k)] for i, v, k in zip(sub.ids, p, pred)],
                                ["id", "probability", "predicted"]))
    if est.images:
        weights = est.attention(sub)
        scores = est.cell_scores(sub) if hasattr(est, "cell_scores") else None
        att_rows = []
        for k, pid in enumerate(sub.ids):
            paths = sub.bag_image_paths(k)
            for j, wgt in enumerate(weights[k]):
                att_rows.append([str(pid), j, "" if paths is None else paths[j], f"{wgt:.6g}"]
                                + ([] if scores is None else [f"{scores[k][j]:.6g}"]))
        att = out.with_name(out.stem + ".attention.csv")
        header = ["id", "image_index", "image_path", "weight"]
        write_text_atomic(att, _csv(att_rows, header + ([] if scores is None else ["cell_score"])))
        outputs["attention"] = att
    if submission is not None:
        write_text_atomic(submission, _csv([[str(i), int(k)] for i, k in zip(sub.ids, pred)],
                                           ["Id", "Predicted"]))
        outputs["submission"] = Path(submission)
    return Prediction(ids=sub.ids, probability=p, predicted=pred, threshold=est.threshold_,
                      store_path=store_path, outputs=outputs)
