"""Weak supervision: a cell scorer trained from patient labels, written fold-safe.

Every cell is labelled with its patient's label (1 malignant, 0 reactive) and a small CNN
learns P(malignant | cell) on the centre crop of the image (default: the 112 px centre of
the 224 px image, resized to 64 px), with class-balanced BCE and random rotations / flips.
A patient's image score is then a pooled cell score (stage two, :class:`LateFusion`).

A label-trained encoder must never score a patient it was trained on, or every later
cross-validation is optimistic. ``lymph embed --method weak --folds K`` therefore trains

- K **fold scorers**, scorer ``k`` on the labelled patients outside stratified patient-level
  fold ``k`` (:func:`lymph.head.evaluate.make_folds`, seeded), saved beside the store as
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

Public API::

    run_weak(cache, out, folds=5, seed=0, ...) -> WeakSummary
    check_fold_safety(store, checkpoints=True)    # raises LymphError on a leak
    fold_checkpoint_path(out, k)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lymph.errors import LymphError

log = logging.getLogger("lymph")

FEATURE_COLUMNS = ("logit", "prob")


# ---- the model -----------------------------------------------------------------------------
@dataclass
class WeakConfig:
    """Architecture of :class:`CellScorer` (stored whole in the checkpoint).

    ``dim`` is the number of per-cell features written (``logit``, ``prob``): always 2.
    Four 3x3 conv blocks (conv, batch norm, ReLU, halving the side), global average
    pooling, dropout, one linear unit. The first block halves the side with a stride-2
    convolution (``stem_stride`` 2), the others with 2x2 max pooling. Cost at 64 px:
    12 M multiply-adds per image forward (0.4 + 4.7 + 4.7 + 2.4 M). Measured on the
    shared 2-core CPU (bf16, batch 128, one thread): 236 training images/s against 132
    with a stride-1 first convolution followed by pooling (``stem_stride`` 1): the
    full-resolution first block is memory-bound and dominated the step.
    """

    dim: int = 2
    size: int = 64
    channels: tuple[int, ...] = (16, 32, 64, 64)
    dropout: float = 0.2
    stem_stride: int = 2  # 1: conv at full resolution then max pool (1.8x slower)

    def check(self) -> None:
        if self.dim != len(FEATURE_COLUMNS):
            raise LymphError(f"--dim: the weak scorer writes {len(FEATURE_COLUMNS)} features "
                             f"({', '.join(FEATURE_COLUMNS)}), got {self.dim}")
        f = 2 ** len(self.channels)
        if self.size % f or self.size < f:
            raise LymphError(f"image size {self.size}: the weak scorer needs a side divisible by "
                             f"{f} (e.g. 32, 64, 112); re-ingest with --size")
        if self.stem_stride not in (1, 2):
            raise LymphError(f"stem_stride: expected 1 or 2, got {self.stem_stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise LymphError(f"dropout: expected a number in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeakConfig:
        d = dict(d)
        d["channels"] = tuple(d.get("channels", cls.channels))
        return cls(**d)


class CellScorer(nn.Module):
    """``forward(x)``: ``(B, 3, S, S)`` normalised images -> ``(B,)`` cell logits."""

    def __init__(self, config: WeakConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        layers: list[nn.Module] = []
        chans = (3, *config.channels)
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            stride = config.stem_stride if i == 0 else 1
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if stride == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)  # (B, C, S/16, S/16)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout),
                                  nn.Linear(chans[-1], 1))
        # the calibration a * logit + b fitted after training (:func:`calibrate`); identity
        # until then. Buffers, so the checkpoint that scores new patients carries it.
        self.register_buffer("cal_scale", torch.tensor(1.0))
        self.register_buffer("cal_shift", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The raw (uncalibrated) cell logit, ``(B,)``: what the loss trains."""
        h = self.features(x).mean(dim=(2, 3))  # global average pooling: (B, C)
        return self.head(h).squeeze(1)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, v in (("cal_scale", 1.0), ("cal_shift", 0.0)):  # checkpoints from before
            state_dict.setdefault(prefix + name, torch.tensor(v))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass(frozen=True)
class WeakMethod:
    """The registry entry: class-balanced BCE of an augmented view against the per-image
    ``targets[:, 0]`` (the patient's label) weighted by ``targets[:, 1]``."""

    name: str = "weak"
    config_cls: type = WeakConfig
    trainable: bool = True
    needs_labels: bool = True
    #: how `lymph embed --method weak --data` ingests: the 112 px centre, resized to 64 px
    default_size: int = 64
    default_crop: int = 112
    feature_columns: tuple[str, ...] = FEATURE_COLUMNS
    loss_name: str = "class-balanced BCE"

    def build(self, config: WeakConfig) -> nn.Module:
        return CellScorer(config)

    def loss(self, model: nn.Module, batch: torch.Tensor, normalise: Any,
             targets: torch.Tensor) -> torch.Tensor:
        x = normalise(normalise.augment(batch))
        logit = model(x).float()
        y, w = targets[:, 0].float(), targets[:, 1].float()
        bce = nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
        return (w * bce).mean()

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        logit = model(x).float() * model.cal_scale + model.cal_shift  # calibrated
        return torch.stack([logit, torch.sigmoid(logit)], dim=1)  # (B, 2): logit, prob


def _register() -> None:
    from lymph.encoder.methods import register

    register(WeakMethod())


_register()


# ---- targets and paths ---------------------------------------------------------------------
def image_targets(patient_ptr: np.ndarray, labels: np.ndarray,
                  patients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image rows of ``patients``, ``(n_images, 2)`` float32 targets: label, weight).

    Weights balance the classes over the training images (each class carries half of the
    total weight; mean weight 1 over the rows); images outside ``patients`` get weight 0.
    """
    n_img = int(patient_ptr[-1])
    targets = np.zeros((n_img, 2), dtype=np.float32)
    rows = np.concatenate([np.arange(patient_ptr[p], patient_ptr[p + 1]) for p in patients])
    y = np.repeat(labels[patients].astype(np.float32), np.diff(patient_ptr)[patients])
    n_pos, n = float(y.sum()), float(y.size)
    if n_pos == 0 or n_pos == n:
        raise LymphError("weak scorer: its training patients hold a single class; "
                         "use fewer --folds or more labelled patients")
    targets[rows, 0] = y
    targets[rows, 1] = np.where(y == 1, n / (2 * n_pos), n / (2 * (n - n_pos)))
    return rows.astype(np.int64), targets


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

    @property
    def images_per_s(self) -> float:
        return self.images_trained / max(self.train_seconds, 1e-9)


def run_weak(cache: Any, out: str | Path, *, folds: int = 5, seed: int = 0,
             config: Any = None, model_config: WeakConfig | None = None, env: Any = None,
             resume: bool = False, progress: bool = True) -> WeakSummary:
    """Train the K fold scorers and the final scorer on ``cache``; write the store ``out``.

    ``config`` is a :class:`~lymph.encoder.train.TrainConfig` (default: 6 epochs, batch
    128, lr 1e-3, weight decay 1e-4); ``seed`` fixes the folds and each scorer's training.
    With ``resume`` every scorer continues from its checkpoint (finished ones are reused).
    """
    from lymph.atomic import sha256_file
    from lymph.encoder import distributed as D
    from lymph.encoder.embed import checkpoint_path, compute_features, load_encoder
    from lymph.encoder.methods import Preprocess
    from lymph.encoder.train import train
    from lymph.head.evaluate import make_folds

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
            extra = {"weak": {"scorer": k, "folds": folds, "seed": seed,
                              "train_ids": [str(i) for i in ids[tr]]}}
            res = train(cache, path, method="weak", model_config=mcfg, config=config,
                        resume=resume, env=env, progress=progress, rows=rows, targets=targets,
                        extra=extra)
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
        if env.is_main:
            summary.store = _write(cache, out, fold_list, scorers, feats, folds, seed, labels,
                                   ids, sha256_file, summary)
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

    from lymph.encoder import distributed as D
    from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
    from lymph.encoder.embed import compute_features, load_encoder
    from lymph.encoder.methods import Preprocess

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


def default_train_config(seed: int = 0) -> Any:
    """The scorer's optimisation defaults (see ``docs/weak-supervision.md``): 6 epochs of
    batch 128 at lr 1e-3 (Adam), weight decay 1e-4. K = 5 plus the final scorer is about
    5 x the labelled images per epoch: 299,730 presentations at 6 epochs on the dev set,
    ~9 minutes on the shared 2-core CPU (``docs/benchmarks.md``)."""
    from lymph.encoder.train import TrainConfig

    return TrainConfig(epochs=6, batch_size=128, lr=1e-3, seed=seed, weight_decay=1e-4)


def _write(cache: Any, out: Path, fold_list: list[Any], scorers: list[tuple[int, np.ndarray, Path]],
           feats: dict[int, np.ndarray], folds: int, seed: int, labels: np.ndarray,
           ids: np.ndarray, sha256_file: Any, summary: WeakSummary) -> Path:
    from lymph.encoder.embed import training_processes, write_embedding_store

    ptr = cache.patient_ptr
    n_pat = len(ids)
    scorer = np.full(n_pat, -1, dtype=np.int16)
    for _, k, _tr, te in fold_list:
        scorer[te] = k
    emb = np.empty_like(feats[-1])
    for p in range(n_pat):
        emb[ptr[p] : ptr[p + 1]] = feats[int(scorer[p])][ptr[p] : ptr[p + 1]]
    final = scorers[-1][2]
    from lymph.encoder.checkpoint import load_checkpoint

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
            "k": folds, "seed": seed,
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


# ---- diagnostics ---------------------------------------------------------------------------
def oof_metrics(emb: np.ndarray, ptr: np.ndarray, labels: np.ndarray,
                scorer: np.ndarray) -> dict[str, Any]:
    """Out-of-fold patient ROC AUC of the mean cell logit and mean cell probability, pooled
    over all labelled patients and per fold (pooled ~ per fold when scales agree)."""
    from sklearn.metrics import roc_auc_score

    lab = np.flatnonzero(labels >= 0)
    mean_logit = np.array([emb[ptr[p] : ptr[p + 1], 0].mean() for p in range(len(labels))])
    mean_prob = np.array([emb[ptr[p] : ptr[p + 1], 1].mean() for p in range(len(labels))])

    def auc(rows: np.ndarray, v: np.ndarray) -> float | None:
        y = labels[rows]
        return float(roc_auc_score(y, v[rows])) if np.unique(y).size == 2 else None

    per_fold = {}
    for k in sorted(set(scorer[lab].tolist())):
        r = lab[scorer[lab] == k]
        per_fold[str(k)] = {"n": int(r.size), "auc_mean_logit": auc(r, mean_logit),
                            "auc_mean_prob": auc(r, mean_prob)}
    return {"auc_mean_logit": auc(lab, mean_logit), "auc_mean_prob": auc(lab, mean_prob),
            "per_fold": per_fold}


def comparability(feats: dict[int, np.ndarray], ptr: np.ndarray, labels: np.ndarray,
                  order: list[int]) -> dict[str, Any] | None:
    """Do the scorers put cells on one scale? Measured on the cells of the unlabelled
    patients, which no scorer trained on: per scorer the mean and standard deviation of
    the logit and the mean probability, and the smallest pairwise Pearson correlation of
    the logits. None when there are no unlabelled patients."""
    unl = np.flatnonzero(labels < 0)
    if unl.size == 0:
        return None
    rows = np.concatenate([np.arange(ptr[p], ptr[p + 1]) for p in unl])
    per = {}
    for k in order:
        lg = feats[k][rows, 0].astype(np.float64)
        per[str(k)] = {"logit_mean": float(lg.mean()), "logit_std": float(lg.std()),
                       "prob_mean": float(feats[k][rows, 1].mean())}
    corr = np.corrcoef(np.stack([feats[k][rows, 0] for k in order]).astype(np.float64))
    off = corr[~np.eye(len(order), dtype=bool)]
    return {"n_cells": int(rows.size), "per_scorer": per,
            "min_logit_corr": float(off.min()) if off.size else None,
            "mean_logit_corr": float(off.mean()) if off.size else None}


# ---- fold safety ---------------------------------------------------------------------------
def check_fold_safety(store: Any, checkpoints: bool = True) -> None:
    """Raise :class:`LymphError` unless every labelled patient's rows come from a scorer
    that did not train on it.

    From the store: ``/patients/scorer`` and provenance ``weak_folds`` (fold ``k``'s test
    patients; scorer ``k`` trained on the other labelled patients, the final scorer ``-1``
    on all of them). With ``checkpoints`` (when the files recorded in the provenance
    exist), also each checkpoint's sha256 and its own record of the patients it trained on.
    """
    where = str(store.path or "store")
    wf = (store.provenance or {}).get("weak_folds")
    if not wf:
        raise LymphError(f"{where}: provenance has no 'weak_folds' (not a fold-safe weak store)")
    if store.patient_scorer is None:
        raise LymphError(f"{where}: /patients/scorer is missing (not a fold-safe weak store)")
    k_total = int(wf["k"])
    test_ids = [set(t) for t in wf["test_ids"]]
    if len(test_ids) != k_total:
        raise LymphError(f"{where}: provenance 'weak_folds': expected {k_total} folds, got "
                         f"{len(test_ids)}")
    all_labelled = {str(i) for i, y in zip(store.ids, store.labels) if y >= 0}
    trained: dict[int, set[str]] = {-1: set(all_labelled)}  # the final scorer: all of them
    for k in range(k_total):
        trained[k] = all_labelled - test_ids[k]
    if checkpoints:
        recorded = [(int(c["fold"]), c) for c in wf.get("checkpoints", [])]
        recorded.append((-1, wf.get("final") or {}))
        for k, c in recorded:
            p = Path(c.get("path", ""))
            if not c.get("path") or not p.is_file():
                continue
            from lymph.atomic import sha256_file
            from lymph.encoder.checkpoint import load_checkpoint

            if c.get("sha256") and sha256_file(p) != c["sha256"]:
                raise LymphError(f"{where}: scorer {k} checkpoint {p} changed since the store "
                                 "was written (sha256 mismatch)")
            ids_ck = set((load_checkpoint(p).get("weak") or {}).get("train_ids", []))
            trained[k] |= ids_ck
    for pid, y, s in zip(store.ids, store.labels, store.patient_scorer):
        pid, s = str(pid), int(s)
        if s != -1 and not 0 <= s < k_total:
            raise LymphError(f"{where}: /patients/scorer: patient {pid} has scorer {s}, "
                             f"expected -1 or 0..{k_total - 1}")
        if y < 0:
            continue
        if pid in trained[s]:
            who = "the final scorer" if s == -1 else f"fold scorer {s}"
            raise LymphError(f"{where}: labelled patient {pid} was scored by {who}, which "
                             "trained on it: the store leaks labels into every later "
                             "cross-validation")
