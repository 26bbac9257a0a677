"""Weak supervision: a cell scorer trained from patient labels, written fold-safe.

Every cell is labelled with its patient's label (1 malignant, 0 reactive) and a small CNN
learns P(malignant | cell) on the centre crop of the image (default: the 112 px centre of
the 224 px image, resized to 64 px), with class-balanced BCE and random rotations / flips.
A patient's image score is then a pooled cell score (stage two, :class:`LateFusion`).

A label-trained encoder must never score a patient it was trained on, or every later
cross-validation is optimistic. ``lymph embed --method weak --folds K`` therefore trains

- K **fold scorers**, scorer ``k`` on the labelled patients outside stratified patient-level
  fold ``k`` (:func:`lymph.splits.make_folds`, seeded), saved beside the store as
  ``<stem>.weak-fold<k>.pt``; the cells of fold ``k``'s patients are scored by scorer ``k``;
- a **final scorer** on all labelled patients, saved at the usual checkpoint path
  (``<stem>.encoder.pt``, named by the store's ``encoder_checkpoint``): it scores the
  unlabelled patients, and new patients (``lymph predict --data``).

The store records which scorer produced each patient's rows in ``/patients/scorer``
(``k``, or ``-1`` for the final scorer) and, in provenance ``weak_folds``, the patient ids
of each fold and every scorer checkpoint's sha256; :func:`check_fold_safety` checks them.

Per-cell features (``/embeddings`` columns): ``logit``, the **calibrated** cell logit
(each scorer's ``a * logit + b`` fitted on its own training cells, :func:`calibrate`), and
``prob``, its sigmoid. Raw logits of different scorers are not on one scale (their offsets
wander with the last epoch); calibrated ones are, measured at write time on the cells no
scorer trained on (provenance ``weak_comparability``). Penultimate activations are never
written.

Public API (diagnostics and the fold-safety check: :mod:`lymph.encoder.weak_checks`)::

    run_weak(cache, out, folds=5, seed=0, ...) -> WeakSummary
    check_fold_safety(store, checkpoints=True)    # raises LymphError on a leak
    fold_checkpoint_path(out, k)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymph.atomic import sha256_file
from lymph.encoder import distributed as D
from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
from lymph.encoder.embed import (checkpoint_path, compute_features, load_encoder,
                                 training_processes, write_embedding_store)
from lymph.encoder.methods.weak import FEATURE_COLUMNS, WeakConfig
from lymph.encoder.preprocess import Preprocess
from lymph.encoder.registry import METHODS
from lymph.encoder.train import TrainConfig, train
from lymph.encoder.weak_checks import comparability, oof_metrics
from lymph.errors import LymphError
from lymph.splits import make_folds
from lymph.store import bag_rows

log = logging.getLogger("lymph")


# ---- targets and paths ---------------------------------------------------------------------
#: what the scorer learns: ``label`` (every cell its patient's label) or
#: ``clinical-residual`` (the same, each patient's cells weighted by how wrong a clinical-only
#: model is about that patient: :func:`residual_weights`)
TARGETS = ("label", "clinical-residual")
RESIDUAL_FLOOR = 0.05  # no training patient's weight falls below this


def image_targets(patient_ptr: np.ndarray, labels: np.ndarray, patients: np.ndarray,
                  patient_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image rows of ``patients``, ``(n_images, 2)`` float32 targets: label, weight).

    Weights balance the classes over the training images (each class carries half of the
    total weight; mean weight 1 over the rows); images outside ``patients`` get weight 0.
    ``patient_weight`` (one per patient of ``patients``) scales each patient's images
    within its class before the balancing.
    """
    n_img = int(patient_ptr[-1])
    targets = np.zeros((n_img, 2), dtype=np.float32)
    rows = bag_rows(patient_ptr, patients)[0]
    sizes = np.diff(patient_ptr)[patients]
    y = np.repeat(labels[patients].astype(np.float32), sizes)
    n_pos, n = float(y.sum()), float(y.size)
    if n_pos == 0 or n_pos == n:
        raise LymphError("weak scorer: its training patients hold a single class; "
                         "use fewer --folds or more labelled patients")
    targets[rows, 0] = y
    if patient_weight is None:
        targets[rows, 1] = np.where(y == 1, n / (2 * n_pos), n / (2 * (n - n_pos)))
    else:
        w = np.repeat(np.asarray(patient_weight, dtype=np.float64), sizes)
        for c in (0, 1):  # each class carries half of the total weight n, as above
            m = y == c
            w[m] *= (n / 2) / w[m].sum()
        targets[rows, 1] = w
    return rows.astype(np.int64), targets


def residual_weights(clinical: np.ndarray, labels: np.ndarray, patients: np.ndarray,
                     seed: int = 0, inner_folds: int = 5) -> np.ndarray:
    """Per patient of ``patients``: ``max(|y - p|, RESIDUAL_FLOOR)``, ``p`` the probability
    of malignancy of a class-balanced logistic regression on the standardised clinical
    columns, out of fold over ``inner_folds`` stratified folds of ``patients`` only (no
    other patient's label or clinical data is used)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(clinical, dtype=np.float64)[patients]
    y = labels[patients].astype(np.int64)
    if x.shape[1] == 0 or not np.isfinite(x).all():
        raise LymphError("weak scorer: target clinical-residual needs finite clinical "
                         "features for every training patient")
    k = min(inner_folds, int(np.bincount(y, minlength=2).min()))
    if k < 2:
        raise LymphError("weak scorer: target clinical-residual needs at least 2 training "
                         "patients of each class")
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced",
                                                               max_iter=1000))
    p = cross_val_predict(model, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                          method="predict_proba")[:, 1]
    return np.maximum(np.abs(y - p), RESIDUAL_FLOOR)


def fold_checkpoint_path(out: str | Path, k: int) -> Path:
    """Where fold scorer ``k`` of the store ``out`` is kept: ``<stem>.weak-fold<k>.pt``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.weak-fold{k}.pt")


# ---- stage one ---------------------------------------------------------------------------
@dataclass
class WeakSummary:
    store: Path | None
    final_checkpoint: Path
    fold_checkpoints: list[Path]
    train_seconds: float = 0.0
    images_trained: int = 0  # image presentations over all scorers
    embed_seconds: float = 0.0
    losses: dict[str, list[float]] = field(default_factory=dict)
    oof: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    #: every scorer's calibrated per-cell features ``(n_images, 2)`` for every image, by
    #: scorer id (``k``, ``-1`` final): what :func:`fold_mean_features` averages
    features: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images_trained / max(self.train_seconds, 1e-9)


def run_weak(cache: Any, out: str | Path, *, folds: int = 5, seed: int = 0,
             config: Any = None, model_config: WeakConfig | None = None, env: Any = None,
             resume: bool = False, progress: bool = True, target: str = "label") -> WeakSummary:
    """Train the K fold scorers and the final scorer on ``cache``; write the store ``out``.

    ``config`` is a :class:`~lymph.encoder.train.TrainConfig` (default: 6 epochs, batch
    128, lr 1e-3, weight decay 1e-4); ``seed`` fixes the folds and each scorer's training.
    With ``resume`` every scorer continues from its checkpoint (finished ones are reused).
    ``target``: one of :data:`TARGETS` (recorded in the store's ``weak_folds``, so a nested
    run retrains the same way); the calibration always uses the plain class-balanced
    weights.
    """
    if target not in TARGETS:
        raise LymphError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    out = Path(out)
    config = config or default_train_config(seed)
    mcfg = model_config or WeakConfig(size=cache.size)
    labels = cache.labels
    ids = np.asarray(cache.ids, dtype=object)
    fold_list = make_folds(labels, folds, 1, seed)  # raises on too few patients per class
    labelled = np.flatnonzero(labels >= 0)
    own_env = env is None
    env = env or D.setup("auto")
    try:
        scorers: list[tuple[int, np.ndarray, Path]] = []  # (scorer id, training patients, path)
        for _, k, tr, _te in fold_list:
            scorers.append((k, tr, fold_checkpoint_path(out, k)))
        scorers.append((-1, labelled, checkpoint_path(out)))
        summary = WeakSummary(store=None, final_checkpoint=checkpoint_path(out),
                              fold_checkpoints=[p for k, _, p in scorers if k >= 0])
        for k, tr, path in scorers:
            name = "final" if k < 0 else f"fold {k}"
            if env.is_main:
                log.info("weak scorer %s: %d training patients", name, tr.size)
            rows, targets = image_targets(cache.patient_ptr, labels, tr)
            fit_targets = targets
            if target == "clinical-residual":
                w = residual_weights(cache.clinical()[0], labels, tr, seed=seed + 17 * (k + 1))
                fit_targets = image_targets(cache.patient_ptr, labels, tr, w)[1]
            extra = {"weak": {"scorer": k, "folds": folds, "seed": seed, "target": target,
                              "train_ids": [str(i) for i in ids[tr]]}}
            res = train(cache, path, method="weak", model_config=mcfg, config=config,
                        resume=resume, env=env, progress=progress, rows=rows,
                        targets=fit_targets, extra=extra)
            summary.train_seconds += res.seconds
            summary.images_trained += int(round(res.images_per_s * res.seconds))
            summary.losses[name] = res.losses
            summary.calibration[name] = calibrate(path, cache, rows, targets, env,
                                                  progress=progress)
        # every scorer embeds every image (forward only; cheap next to training) so that
        # the comparability of the scorers can be measured on the cells none trained on
        t0 = time.perf_counter()
        feats: dict[int, np.ndarray] = {}
        for k, _, path in scorers:
            ck, method, model = load_encoder(path, env.device, env)
            norm = ck["normalisation"]
            prep = Preprocess(norm["mean"], norm["std"], env.device, channels_last=True)
            f = compute_features(model, method, cache, prep, env, progress=progress)
            if f is not None:
                feats[k] = f
        summary.embed_seconds = time.perf_counter() - t0
        summary.features = feats
        if env.is_main:
            summary.store = _write(cache, out, fold_list, scorers, feats, folds, seed, labels,
                                   ids, sha256_file, summary, target)
        D.barrier(env)
        return summary
    finally:
        if own_env:
            D.teardown(env)


def calibrate(path: Path, cache: Any, rows: np.ndarray, targets: np.ndarray, env: Any, *,
              progress: bool = True) -> dict[str, float]:
    """Fit the scorer's logit calibration ``a * logit + b`` on its own training cells and
    store it in the checkpoint ``path`` (buffers ``cal_scale``, ``cal_shift``).

    A class-balanced logistic regression of the cells' patient labels on the raw logit
    (the weights of ``targets``, i.e. the training objective's). Why: scorers trained on
    different patients end their last epoch with different offsets (on the dev set, the
    mean raw logit of the same 859 unlabelled cells ranged from -0.35 to 1.85 across the
    six scorers; after calibration 0.25 to 0.50), which makes one ``logit`` column mix
    scales. Only the scorer's training patients are used, so fold safety holds.
    """
    from sklearn.linear_model import LogisticRegression

    ck, method, model = load_encoder(path, env.device, env)
    model.cal_scale.fill_(1.0)
    model.cal_shift.fill_(0.0)
    norm = ck["normalisation"]
    prep = Preprocess(norm["mean"], norm["std"], env.device, channels_last=True)
    raw = compute_features(model, method, cache, prep, env, progress=progress)
    out: dict[str, float] = {}
    if env.is_main:
        assert raw is not None
        x = raw[rows, :1].astype(np.float64)
        lr = LogisticRegression(C=1e4, max_iter=1000)
        lr.fit(x, targets[rows, 0].astype(np.int64), sample_weight=targets[rows, 1])
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        ck = load_checkpoint(path)
        ck["model"]["cal_scale"] = torch.tensor(a, dtype=torch.float32)
        ck["model"]["cal_shift"] = torch.tensor(b, dtype=torch.float32)
        out = {"scale": a, "shift": b, "n_cells": int(rows.size)}
        ck["calibration"] = out
        save_checkpoint(path, {k: v for k, v in ck.items() if k not in ("format", "version")})
    D.barrier(env)
    return out


def fold_mean_features(features: dict[int, np.ndarray]) -> np.ndarray:
    """Per-cell features from the mean of the fold scorers (``k >= 0``): the mean calibrated
    logit and its sigmoid. The alternative to the final scorer for patients no scorer saw
    (issue 18: score new patients the way training patients were; ``docs/weak-supervision.md``
    says which one is used and what the difference measured)."""
    folds = [f for k, f in sorted(features.items()) if k >= 0]
    if not folds:
        raise LymphError("weak scorer: no fold scorer features to average")
    logit = np.mean([f[:, 0].astype(np.float64) for f in folds], axis=0)
    return np.stack([logit, 1.0 / (1.0 + np.exp(-logit))], axis=1).astype(np.float32)


def default_train_config(seed: int = 0) -> TrainConfig:
    """The scorer's optimisation defaults (the registry's ``train_defaults``; see
    ``docs/weak-supervision.md``): 6 epochs of batch 128 at lr 1e-3 (Adam), weight decay 1e-4. K = 5 plus the final scorer is about
    5 x the labelled images per epoch: 299,730 presentations at 6 epochs on the dev set,
    ~9 minutes on the shared 2-core CPU (``docs/benchmarks.md``)."""
    return TrainConfig(seed=seed, **dict(METHODS["weak"].train_defaults))


def _write(cache: Any, out: Path, fold_list: list[Any], scorers: list[tuple[int, np.ndarray, Path]],
           feats: dict[int, np.ndarray], folds: int, seed: int, labels: np.ndarray,
           ids: np.ndarray, sha256_file: Any, summary: WeakSummary,
           target: str = "label") -> Path:
    ptr = cache.patient_ptr
    n_pat = len(ids)
    scorer = np.full(n_pat, -1, dtype=np.int16)
    for _, k, _tr, te in fold_list:
        scorer[te] = k
    emb = np.empty_like(feats[-1])
    for p in range(n_pat):
        emb[ptr[p] : ptr[p + 1]] = feats[int(scorer[p])][ptr[p] : ptr[p + 1]]
    final = scorers[-1][2]
    ck = load_checkpoint(final)
    summary.oof = oof_metrics(emb, ptr, labels, scorer)
    prov = {
        "method": "weak",
        "encoder_checkpoint": str(final.resolve()),
        "encoder_sha256": sha256_file(final),
        "encoder_data_fingerprint": ck["data_fingerprint"],
        "config": {k: ck.get(k) for k in ("model_config", "train_config", "normalisation",
                                          "cache", "precision")},
        "dim": int(emb.shape[1]),
        "epochs": int(ck.get("epoch", 0)),
        "final_loss": float(ck["losses"][-1]) if ck.get("losses") else None,
        **training_processes(ck),
        "weak_folds": {
            "k": folds, "seed": seed, "target": target,
            "test_ids": [[str(i) for i in ids[te]] for _, _, _, te in fold_list],
            "checkpoints": [{"fold": k, "path": str(p.resolve()), "sha256": sha256_file(p)}
                            for k, _, p in scorers if k >= 0],
            "final": {"path": str(final.resolve()), "sha256": sha256_file(final),
                      "train_ids": [str(i) for i in ids[scorers[-1][1]]]},
        },
        "weak_oof": summary.oof,
        "weak_calibration": summary.calibration,
        "weak_comparability": comparability(feats, ptr, labels, [k for k, _, _ in scorers]),
    }
    return write_embedding_store(cache, emb, out, prov, feature_columns=list(FEATURE_COLUMNS),
                                 patient_scorer=scorer)
