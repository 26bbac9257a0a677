"""Estimators compared with the MIL head by ``lymph compare-baselines`` (and ``fit-head
--fusion late``). Every one follows the stage-two contract of :mod:`lymph.head.estimator`:
scikit-learn ``BaseEstimator``/``ClassifierMixin``, ``__init__`` stores parameters only,
``fit(store) -> self`` on the labelled patients of that store, ``predict_proba(store) ->
(n, 2)``, ``threshold_`` chosen on the fit patients only, seeded.

- :class:`AdaBoostClinical`: AdaBoost on the clinical features (the seed report's baseline).
- :class:`LogisticClinical`: L2 logistic regression on the standardised clinical features.
- :class:`MixtureOfExperts`: an attention-MIL image expert and an MLP clinical expert mixed
  by a linear gate (the report's section 3.4, after Sahasrabudhe et al. 2021).
- :class:`LateFusion`: the bag's pooled image score joins the clinical features in a
  regularised logistic regression (stacking; issue 9, stage two).

(The clinical MLP is ``MILClassifier(images=False)``.)

Threshold rule of the scikit-learn models: out-of-fold probabilities of an inner stratified
``inner_folds``-fold CV over the fit patients, then :func:`lymph.head.train.choose_threshold`
(max balanced accuracy, ties to 0.5); the final model is refitted on all fit patients.
The torch model (mixture of experts) uses the head's rule: an inner stratified validation
split for early stopping and the threshold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn

from lymph.errors import LymphError
from lymph.head.bags import Scaler, check_bags, instances_of, make_buckets
from lymph.head.estimator import _threads, _where, clinical_matrix
from lymph.head.pooling import AttentionPool
from lymph.head.train import choose_threshold, forward_groups, make_groups, weighted_bce
from lymph.head.train import train as train_head

LOGIT_COLUMNS = ("logit", "weak:logit")


# ---- shared helpers ------------------------------------------------------------------------
def _labelled(store: Any) -> tuple[np.ndarray, np.ndarray]:
    rows = store.labelled()
    if rows.size == 0:
        raise LymphError(f"{_where(store)}: /patients/label: no labelled patients to fit on "
                         "(empty selection; expected labels 0 or 1)")
    y = store.labels[rows].astype(np.int64)
    if np.unique(y).size < 2:
        raise LymphError(f"{_where(store)}: /patients/label: the fit patients are all of "
                         f"class {int(y[0])}; expected both classes")
    return rows, y


def _need_clinical(store: Any, name: str) -> list[str]:
    cols = list(store.clinical_columns)
    if not cols:
        raise LymphError(f"{_where(store)}: /patients/clinical: no clinical columns, but "
                         f"{name} needs clinical features")
    return cols


def _inner_folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified inner folds over positions ``0..len(y)-1``; [] when a class is too small."""
    from sklearn.model_selection import StratifiedKFold

    k = min(k, int(np.bincount(y, minlength=2).min()))
    if k < 2:
        return []
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _oof(make: Any, x: np.ndarray, y: np.ndarray, folds: list) -> np.ndarray:
    """Out-of-fold P(class 1) of ``make()`` (an sklearn classifier factory) over ``folds``."""
    p = np.full(len(y), np.nan)
    for tr, va in folds:
        p[va] = make().fit(x[tr], y[tr]).predict_proba(x[va])[:, 1]
    return p


@contextlib.contextmanager
def blas_threads(n: int | None = 1) -> Iterator[None]:
    """Limit the BLAS threads (OpenBLAS) while fitting small scikit-learn models: on a
    shared 2-core machine scipy's L-BFGS on a few thousand rows is ~15x faster with one
    thread than with two (thread spinning). ``None`` keeps the process setting."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def _threshold(param: str | float, y: np.ndarray, p_oof: np.ndarray | None) -> float:
    if param != "inner":
        return float(param)
    if p_oof is None or not np.isfinite(p_oof).all():
        return 0.5
    return choose_threshold(y, p_oof)


def _check_threshold(t: Any) -> None:
    if not (t == "inner" or (isinstance(t, (int, float)) and 0.0 < float(t) < 1.0)):
        raise LymphError(f"threshold: expected 'inner' or a number in (0, 1), got {t!r}")


def _proba(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.stack([1.0 - p, p], axis=1)


def bag_mean_quantile(values: np.ndarray, ptr: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Per bag (CSR ``ptr``), the mean and the ``q`` quantile (linear interpolation, as
    ``np.quantile``) of the instance ``values``. Vectorised: one sort, no loop over bags."""
    sizes = np.diff(ptr)
    if (sizes == 0).any():
        raise LymphError("bag_mean_quantile: a bag without instances (expected at least one)")
    bag = np.repeat(np.arange(sizes.size), sizes)
    v = np.asarray(values, dtype=np.float64)
    mean = np.bincount(bag, weights=v, minlength=sizes.size) / sizes
    order = np.lexsort((v, bag))  # sorted by bag, then value
    s = v[order]
    pos = q * (sizes - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, sizes - 1)
    frac = pos - lo
    start = ptr[:-1]
    quant = s[start + lo] * (1.0 - frac) + s[start + hi] * frac
    return mean, quant


# ---- clinical-only ---------------------------------------------------------------------------
class _ClinicalSK(BaseEstimator, ClassifierMixin):
    """Base of the scikit-learn clinical-only models (subclasses define ``_make``)."""

    inputs = "clinical"

    def _make(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, store: Any) -> Any:
        with blas_threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> Any:
        _check_threshold(self.threshold)
        rows, y = _labelled(store)
        self.clinical_columns_ = _need_clinical(store, type(self).__name__)
        x = clinical_matrix(store, self.clinical_columns_)[rows].astype(np.float64)
        folds = _inner_folds(y, self.inner_folds, self.seed) if self.threshold == "inner" else []
        p_oof = _oof(self._make, x, y, folds) if folds else None
        self.threshold_ = _threshold(self.threshold, y, p_oof)
        self.model_ = self._make().fit(x, y)
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, store: Any) -> np.ndarray:
        if not hasattr(self, "model_"):
            raise LymphError(f"{type(self).__name__}: not fitted (call fit first)")
        x = clinical_matrix(store, self.clinical_columns_).astype(np.float64)
        with blas_threads(self.n_threads):
            return _proba(self.model_.predict_proba(x)[:, 1])

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)


class AdaBoostClinical(_ClinicalSK):
    """AdaBoost (depth-1 trees) on the raw clinical features: the seed report's baseline."""

    def __init__(self, n_estimators: int = 50, learning_rate: float = 1.0,
                 threshold: str | float = "inner", inner_folds: int = 3, seed: int = 0,
                 n_threads: int | None = 1) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.threshold = threshold
        self.inner_folds = inner_folds
        self.seed = seed
        self.n_threads = n_threads

    def _make(self) -> Any:
        from sklearn.ensemble import AdaBoostClassifier

        return AdaBoostClassifier(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                                  random_state=self.seed)


class LogisticClinical(_ClinicalSK):
    """L2 logistic regression on standardised clinical features, class-balanced."""

    def __init__(self, C: float = 1.0, threshold: str | float = "inner", inner_folds: int = 3,
                 seed: int = 0, n_threads: int | None = 1) -> None:
        self.C = C
        self.threshold = threshold
        self.inner_folds = inner_folds
        self.seed = seed
        self.n_threads = n_threads

    def _make(self) -> Any:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(),
                             LogisticRegression(C=self.C, class_weight="balanced", max_iter=1000))


# ---- mixture of experts ------------------------------------------------------------------------
class MoENet(nn.Module):
    """Image expert (attention MIL + MLP), clinical expert (MLP), linear gate.

    ``forward(x (B, N, D), mask (B, N), clin (B, C)) -> (logit(p) (B,), attention (B, N))``
    with ``p = pi_img * sigm(l_img) + (1 - pi_img) * sigm(l_clin)``, ``pi_img = sigm(g^T
    [pooled, clin] + b)``. The logit of the mixture is computed in log space (stable), so
    the head's weighted BCE-with-logits trains the mixture's BCE end to end.
    """

    def __init__(self, dim: int, n_clinical: int, attention_hidden: int = 64, hidden: int = 64,
                 dropout: float = 0.25, image_hidden: int = 0, gate_bias: float = 0.0) -> None:
        super().__init__()
        self.pool = AttentionPool(dim, attention_hidden)
        self.image_expert = (nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, 1)) if image_hidden == 0
                             else nn.Sequential(nn.Linear(dim, image_hidden), nn.ReLU(),
                                                nn.Dropout(dropout), nn.Linear(image_hidden, 1)))
        self.clinical_expert = nn.Sequential(nn.Linear(n_clinical, hidden), nn.ReLU(),
                                             nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.gate = nn.Linear(dim + n_clinical, 1)
        with torch.no_grad():
            self.gate.bias.fill_(gate_bias)

    def parts(self, x: torch.Tensor, mask: torch.Tensor, clin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled, a = self.pool(x, mask)  # (B, D), (B, N)
        li = self.image_expert(pooled).squeeze(-1)  # (B,)
        lc = self.clinical_expert(clin).squeeze(-1)  # (B,)
        s = self.gate(torch.cat([pooled, clin], dim=1)).squeeze(-1)  # (B,) gate logit
        return li, lc, s, a

    def forward(self, x: torch.Tensor, mask: torch.Tensor, clin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        li, lc, s, a = self.parts(x, mask, clin)
        ls = nn.functional.logsigmoid
        log_p = torch.logaddexp(ls(s) + ls(li), ls(-s) + ls(lc))
        log_q = torch.logaddexp(ls(s) + ls(-li), ls(-s) + ls(-lc))
        return log_p - log_q, a


def _moe_loss(aux: float) -> Any:
    """The mixture's class-weighted BCE plus ``aux`` x each expert's own: without the
    auxiliary terms the gate tends to settle on one expert before the other has learned
    anything. Trained by the head's loop (:func:`lymph.head.train.train`: padded
    mini-batches cut from buckets, Adam, early stopping on the inner validation mixture
    BCE, best weights kept)."""
    ls = nn.functional.logsigmoid

    def loss(model: Any, x: Any, m: Any, clin: torch.Tensor, y: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor:
        li, lc, s, _ = model.parts(x, m, clin)
        mix = (torch.logaddexp(ls(s) + ls(li), ls(-s) + ls(lc))
               - torch.logaddexp(ls(s) + ls(-li), ls(-s) + ls(-lc)))
        return weighted_bce(mix, y, w) + aux * (weighted_bce(li, y, w) + weighted_bce(lc, y, w))

    return loss


class MixtureOfExperts(BaseEstimator, ClassifierMixin):
    """Mixture of an image expert and a clinical expert (Sahasrabudhe et al. 2021, the
    report's section 3.4). The image expert pools standardised instances by attention
    (Ilse et al.) into a small MLP (``image_hidden`` units; 0 = linear); the clinical expert
    is an MLP (``hidden`` units) on standardised clinical
    features; a linear gate on ``[pooled image vector, clinical]`` gives ``pi_img`` and
    ``pi_clin = 1 - pi_img``; the prediction is ``pi_img p_img + pi_clin p_clin``. Trained end
    to end with class-balanced BCE of the mixture plus ``aux_weight`` x each expert's own
    BCE (0 gives the plain mixture loss), vectorised (padded, masked buckets of the head,
    see :func:`_moe_loss`); early stopping and threshold on an inner stratified
    validation split.

    Defaults (measured on the dev morphometry store, 5-fold, and on planted synthetic
    bags): a narrow image expert (16 units) and lr 5e-3. With a 64-unit image expert the
    end-to-end mixture overfits the image side on ~100 patients and the gate trusts it
    (dev ROC AUC 0.88 against 0.94); a linear expert fails to learn a planted signal.
    """

    inputs = "images+clinical"

    def __init__(self, attention_hidden: int = 64, hidden: int = 64, image_hidden: int = 16,
                 gate_bias: float = 0.0, dropout: float = 0.25, lr: float = 5e-3,
                 weight_decay: float = 1e-4, max_epochs: int = 100,
                 patience: int = 15, batch_size: int = 32, val_fraction: float = 0.2,
                 aux_weight: float = 0.5, seed: int = 0, threshold: str | float = "inner",
                 n_threads: int | None = 1) -> None:
        self.attention_hidden = attention_hidden
        self.hidden = hidden
        self.image_hidden = image_hidden
        self.gate_bias = gate_bias
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.aux_weight = aux_weight
        self.seed = seed
        self.threshold = threshold
        self.n_threads = n_threads

    def fit(self, store: Any) -> MixtureOfExperts:
        with _threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> MixtureOfExperts:
        from sklearn.model_selection import train_test_split

        _check_threshold(self.threshold)
        rows, y = _labelled(store)
        self.clinical_columns_ = _need_clinical(store, "MixtureOfExperts")
        check_bags(store, rows)
        self.dim_ = store.dim
        self.classes_ = np.array([0, 1])
        clin = clinical_matrix(store, self.clinical_columns_)[rows]
        self.clinical_scaler_ = Scaler.fit(clin)
        self.instance_scaler_ = Scaler.fit(instances_of(store.embeddings, store.patient_ptr, rows))
        pos = np.arange(rows.size)
        n_val = int(round(self.val_fraction * rows.size))
        if self.val_fraction > 0 and np.bincount(y, minlength=2).min() >= 2 and n_val >= 2:
            tr, va = train_test_split(pos, test_size=n_val, stratify=y, random_state=self.seed)
        else:
            tr, va = pos, pos[:0]
        zc = self.clinical_scaler_.transform(clin)
        tr_groups = self._groups(store, rows[tr], zc[tr], y[tr])
        va_groups = self._groups(store, rows[va], zc[va], y[va]) if va.size else None
        rng = np.random.default_rng(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = MoENet(self.dim_, len(self.clinical_columns_), self.attention_hidden,
                                 self.hidden, self.dropout, self.image_hidden, self.gate_bias)
            res = train_head(
                self.model_, tr_groups, va_groups, va.size, lr=self.lr,
                weight_decay=self.weight_decay, max_epochs=self.max_epochs,
                patience=self.patience, batch_size=self.batch_size, rng=rng,
                batch_loss=_moe_loss(self.aux_weight), fused=False)
            self.best_epoch_, self.epochs_run_ = res.best_epoch, res.epochs_run
        if self.threshold == "inner" and va.size:
            logits, _ = forward_groups(self.model_, va_groups or [], va.size)
            self.threshold_ = choose_threshold(y[va], 1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
        else:
            self.threshold_ = 0.5 if self.threshold == "inner" else float(self.threshold)
        return self

    def _groups(self, store: Any, rows: np.ndarray, zc: np.ndarray, y: np.ndarray | None) -> list:
        buckets = make_buckets(store.embeddings, store.patient_ptr, rows, self.instance_scaler_)
        return make_groups(buckets, zc, y)

    def _prepared(self, store: Any) -> tuple[np.ndarray, list]:
        if not hasattr(self, "model_"):
            raise LymphError("MixtureOfExperts: not fitted (call fit first)")
        if store.dim != self.dim_:
            raise LymphError(f"{_where(store)}: /embeddings: expected {self.dim_} features per "
                             f"image (the model's), got {store.dim}")
        rows = np.arange(store.n_patients)
        check_bags(store, rows)
        zc = self.clinical_scaler_.transform(clinical_matrix(store, self.clinical_columns_))
        return rows, self._groups(store, rows, zc, None)

    def predict_proba(self, store: Any) -> np.ndarray:
        rows, groups = self._prepared(store)
        with _threads(self.n_threads):
            logits, _ = forward_groups(self.model_, groups, rows.size)
        return _proba(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)

    def attention(self, store: Any) -> list[np.ndarray]:
        """Per patient, the image expert's attention weight of each instance (sums to 1)."""
        rows, groups = self._prepared(store)
        with _threads(self.n_threads):
            _, w = forward_groups(self.model_, groups, rows.size, want_weights=True)
        assert w is not None
        return w

    @torch.no_grad()
    def experts(self, store: Any) -> dict[str, np.ndarray]:
        """Per patient: ``pi_img`` (the gate), ``p_img`` and ``p_clin`` (the experts)."""
        rows, groups = self._prepared(store)
        out = {k: np.zeros(rows.size) for k in ("pi_img", "p_img", "p_clin")}
        self.model_.eval()
        with _threads(self.n_threads):
            for g in groups:  # one padded bucket per step (a few per store), not per bag
                li, lc, s, _ = self.model_.parts(g.x, g.mask, g.clin)
                out["pi_img"][g.pos] = torch.sigmoid(s).numpy()
                out["p_img"][g.pos] = torch.sigmoid(li).numpy()
                out["p_clin"][g.pos] = torch.sigmoid(lc).numpy()
        return out


# ---- late fusion -------------------------------------------------------------------------------
def logit_column(store: Any) -> str | None:
    """The store's weak-supervision cell-logit column (``logit``, ``weak:logit`` or any
    ``PREFIX:logit``), or None."""
    cols = list(store.feature_columns or [])
    for name in LOGIT_COLUMNS:
        if name in cols:
            return name
    hits = [c for c in cols if c.endswith(":logit")]
    return hits[0] if hits else None


class LateFusion(BaseEstimator, ClassifierMixin):
    """Late fusion (stacking): pooled image scores + standardised clinical features ->
    regularised (L2) logistic regression, class-balanced.

    The image score of a cell:

    - a **weak-supervision store** (a cell-logit column ``logit`` / ``weak:logit``): the
      logit itself. Stage one already wrote out-of-fold logits for labelled patients, so
      nothing is learned here from images.
    - **any other store** (autoencoder, morphometry, ...): a learned linear projection, an
      instance-level L2 logistic regression on the standardised instance features with every
      instance labelled by its patient's label (instance weight ``1 / bag size``, classes
      balanced, so each patient counts once). It is fitted on the fit patients only. The
      scores the fusion regression is trained on are **nested out of fold**: for each of
      ``inner_folds`` stratified folds of the fit patients, a projection fitted on the other
      folds scores that fold's patients; the projection refitted on all fit patients scores
      new patients. So the fusion never sees a score from a projection that saw the patient.

    Pooling: each bag gives two image features, the mean and the ``quantile`` (default 0.75)
    of its cells' scores. The fusion regression's ``C`` is chosen from ``Cs`` by inner
    stratified CV (``inner_folds`` folds, log loss) on the fit patients; the threshold from
    that CV's out-of-fold probabilities at the chosen ``C``; the final regression is refitted
    on all fit patients. Saved without pickles: :meth:`to_json` / :meth:`from_json`.
    """

    inputs = "images+clinical"
    images = True  # uses the store's image features (predict checks the encoder)
    clinical = True

    def __init__(self, Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), quantile: float = 0.75,
                 projection_C: float = 1.0, inner_folds: int = 5,
                 threshold: str | float = "inner", seed: int = 0, n_threads: int | None = 1) -> None:
        self.Cs = Cs
        self.quantile = quantile
        self.projection_C = projection_C
        self.inner_folds = inner_folds
        self.threshold = threshold
        self.seed = seed
        self.n_threads = n_threads

    # ---- image scores ----------------------------------------------------------------------
    def _fit_projection(self, store: Any, rows: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """Instance-level LR on the patients ``rows`` (labels ``y``): (coef (D,), intercept)
        in the space of instances standardised by ``self.instance_scaler_``."""
        from sklearn.linear_model import LogisticRegression

        sizes = store.bag_sizes[rows]
        x = self.instance_scaler_.transform(instances_of(store.embeddings, store.patient_ptr, rows))
        yi = np.repeat(y, sizes)
        counts = np.bincount(y, minlength=2).astype(np.float64)
        w = np.repeat((len(y) / (2.0 * counts))[y] / sizes, sizes)
        lr = LogisticRegression(C=self.projection_C, max_iter=500)
        lr.fit(x, yi, sample_weight=w)
        return lr.coef_[0].astype(np.float64), float(lr.intercept_[0])

    def _cell_scores(self, store: Any, rows: np.ndarray, proj: tuple[np.ndarray, float] | None
                     ) -> np.ndarray:
        emb = instances_of(store.embeddings, store.patient_ptr, rows)
        if self.logit_column_ is not None:
            return emb[:, list(store.feature_columns).index(self.logit_column_)].astype(np.float64)
        assert proj is not None
        return self.instance_scaler_.transform(emb).astype(np.float64) @ proj[0] + proj[1]

    def _bag_features(self, store: Any, rows: np.ndarray, proj: tuple[np.ndarray, float] | None
                      ) -> np.ndarray:
        sizes = store.bag_sizes[rows]
        ptr = np.concatenate([[0], np.cumsum(sizes)])
        mean, q = bag_mean_quantile(self._cell_scores(store, rows, proj), ptr, self.quantile)
        return np.stack([mean, q], axis=1)

    # ---- fit -----------------------------------------------------------------------------------
    def fit(self, store: Any) -> LateFusion:
        with blas_threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> LateFusion:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import log_loss

        _check_threshold(self.threshold)
        if not 0.0 <= self.quantile <= 1.0:
            raise LymphError(f"quantile: expected a number in [0, 1], got {self.quantile!r}")
        if not self.Cs or any(float(c) <= 0 for c in self.Cs):
            raise LymphError(f"Cs: expected positive numbers, got {self.Cs!r}")
        rows, y = _labelled(store)
        self.clinical_columns_ = _need_clinical(store, "LateFusion")
        check_bags(store, rows)
        self.classes_ = np.array([0, 1])
        self.dim_ = store.dim
        self.feature_columns_ = None if store.feature_columns is None else list(store.feature_columns)
        self.logit_column_ = logit_column(store)
        inner = _inner_folds(y, self.inner_folds, self.seed)
        if self.logit_column_ is not None:
            self.instance_scaler_ = None
            self.projection_ = None
            img = self._bag_features(store, rows, None)
        else:
            self.instance_scaler_ = Scaler.fit(instances_of(store.embeddings, store.patient_ptr, rows))
            img = np.zeros((rows.size, 2))
            if inner:  # nested: OOF image scores for the fusion regression's training
                for tr, va in inner:
                    proj = self._fit_projection(store, rows[tr], y[tr])
                    img[va] = self._bag_features(store, rows[va], proj)
            self.projection_ = self._fit_projection(store, rows, y)
            if not inner:
                img = self._bag_features(store, rows, self.projection_)
        clin = clinical_matrix(store, self.clinical_columns_)[rows].astype(np.float64)
        feats = np.concatenate([clin, img], axis=1)
        self.fusion_scaler_ = Scaler.fit(feats)
        z = self.fusion_scaler_.transform(feats).astype(np.float64)

        def make(c: float) -> Any:
            return lambda: LogisticRegression(C=c, class_weight="balanced", max_iter=1000)

        best_c, best_loss, best_oof = float(self.Cs[-1]), np.inf, None
        if len(self.Cs) > 1 or self.threshold == "inner":
            for c in self.Cs:
                if not inner:
                    break
                p = _oof(make(float(c)), z, y, inner)
                loss = log_loss(y, np.clip(p, 1e-7, 1 - 1e-7), labels=[0, 1])
                if loss < best_loss - 1e-12:
                    best_c, best_loss, best_oof = float(c), loss, p
        self.C_ = best_c
        self.threshold_ = _threshold(self.threshold, y, best_oof)
        lr = make(best_c)().fit(z, y)
        self.coef_ = lr.coef_[0].astype(np.float64)
        self.intercept_ = float(lr.intercept_[0])
        return self

    # ---- inference ---------------------------------------------------------------------------
    def _check_store(self, store: Any) -> np.ndarray:
        if not hasattr(self, "coef_"):
            raise LymphError("LateFusion: not fitted (call fit first)")
        if store.n_patients == 0:
            raise LymphError(f"{_where(store)}: no patients to predict (empty selection)")
        if store.dim != self.dim_:
            raise LymphError(f"{_where(store)}: /embeddings: expected {self.dim_} features per "
                             f"image (the model's encoder), got {store.dim}")
        if (self.feature_columns_ is not None and store.feature_columns is not None
                and list(store.feature_columns) != self.feature_columns_):
            raise LymphError(f"{_where(store)}: /embeddings attribute 'columns' differs from the "
                             "model's feature columns: a store from another encoder?")
        rows = np.arange(store.n_patients)
        check_bags(store, rows)
        return rows

    def decision_function(self, store: Any) -> np.ndarray:
        rows = self._check_store(store)
        clin = clinical_matrix(store, self.clinical_columns_).astype(np.float64)
        with blas_threads(getattr(self, "n_threads", 1)):
            img = self._bag_features(store, rows, self.projection_)
        feats = np.concatenate([clin, img], axis=1)
        return self.fusion_scaler_.transform(feats).astype(np.float64) @ self.coef_ + self.intercept_

    def predict_proba(self, store: Any) -> np.ndarray:
        return _proba(1.0 / (1.0 + np.exp(-self.decision_function(store))))

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)

    def cell_scores(self, store: Any) -> list[np.ndarray]:
        """Per patient, each cell's image score (cell logit or learned projection)."""
        rows = self._check_store(store)
        s = self._cell_scores(store, rows, self.projection_)
        return np.split(s, np.cumsum(store.bag_sizes)[:-1])

    def attention(self, store: Any) -> list[np.ndarray]:
        """Per patient, the mean pooling's weight of each cell (``1 / n``), for the
        attention-based views; the ranking that explains a decision is :meth:`cell_scores`."""
        rows = self._check_store(store)
        return [np.full(int(n), 1.0 / n) for n in store.bag_sizes[rows]]

    def coefficients(self) -> dict[str, float]:
        """The fusion regression's coefficients by feature name (standardised inputs)."""
        names = list(self.clinical_columns_) + ["image_mean", f"image_q{round(100 * self.quantile)}"]
        return dict(zip(names, (float(v) for v in self.coef_)))

    # ---- JSON (model directory; no pickles) --------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        if not hasattr(self, "coef_"):
            raise LymphError("LateFusion: not fitted (call fit first)")
        params = self.get_params()
        params["Cs"] = [float(c) for c in params["Cs"]]
        return {
            "params": params,
            "clinical_columns": list(self.clinical_columns_),
            "feature_columns": self.feature_columns_,
            "dim": int(self.dim_),
            "logit_column": self.logit_column_,
            "instance_scaler": None if self.instance_scaler_ is None else self.instance_scaler_.to_json(),
            "projection": None if self.projection_ is None else {
                "coef": [float(v) for v in self.projection_[0]], "intercept": self.projection_[1]},
            "fusion_scaler": self.fusion_scaler_.to_json(),
            "coef": [float(v) for v in self.coef_],
            "intercept": self.intercept_,
            "C": self.C_,
            "threshold": float(self.threshold_),
            "coefficients": self.coefficients(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LateFusion:
        params = dict(d["params"])
        params["Cs"] = tuple(params["Cs"])
        est = cls(**params)
        est.classes_ = np.array([0, 1])
        est.clinical_columns_ = list(d["clinical_columns"])
        est.feature_columns_ = d["feature_columns"]
        est.dim_ = int(d["dim"])
        est.logit_column_ = d["logit_column"]
        est.instance_scaler_ = None if d["instance_scaler"] is None else Scaler.from_json(d["instance_scaler"])
        pj = d["projection"]
        est.projection_ = None if pj is None else (np.asarray(pj["coef"], dtype=np.float64),
                                                   float(pj["intercept"]))
        est.fusion_scaler_ = Scaler.from_json(d["fusion_scaler"])
        est.coef_ = np.asarray(d["coef"], dtype=np.float64)
        est.intercept_ = float(d["intercept"])
        est.C_ = float(d["C"])
        est.threshold_ = float(d["threshold"])
        return est


def save_late_fusion(model: LateFusion, path: Any, *, store: Any,
                     extra: dict[str, Any] | None = None) -> Any:
    """Write a fitted :class:`LateFusion` as a model directory (``lymph-model`` format 1,
    ``estimator: "LateFusion"``): ``model.json`` holds the whole state as JSON numbers
    (:meth:`LateFusion.to_json` under ``"late_fusion"``), no weights file, no pickles.
    Called by :func:`lymph.head.modeldir.save_model`; read back by ``load_model``."""
    import json
    import shutil
    from pathlib import Path

    import lymph
    from lymph.atomic import atomic_path
    from lymph.head.modeldir import ENCODING_TYPE, ENCODING_VERSION, _copy_encoder

    state = model.to_json()
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        meta = {
            "encoding-type": ENCODING_TYPE,
            "encoding-version": ENCODING_VERSION,
            "lymph_version": lymph.__version__,
            "estimator": "LateFusion",
            "fusion": "late",
            "params": state["params"],
            "clinical_columns": state["clinical_columns"],
            "feature_columns": state["feature_columns"],
            "dim": state["dim"],
            "threshold": state["threshold"],
            "late_fusion": state,
            "training": {"n_patients": int(store.labelled().size),
                         "n_malignant": int((store.labels == 1).sum())},
            "store": {"path": None if store.path is None else str(Path(store.path).resolve()),
                      "fingerprint": store.fingerprint, "provenance": store.provenance},
            "encoder": _copy_encoder(store, tmp),
        }
        for name, src in (extra or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / name)
        (tmp / "model.json").write_text(json.dumps(meta, indent=2, default=str) + "\n",
                                        encoding="utf-8")
    return path
