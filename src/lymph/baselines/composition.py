"""Cell composition (issue 18): unsupervised cell prototypes and each patient's proportions
of them, fused with the clinical features in a regularised logistic regression.

Malignant lymphocytosis changes *which* cells a smear holds (smudge cells, small mature
lymphocytes, ...) more than how one average cell looks. :class:`CompositionFusion`:

1. standardises the fit patients' cells (any store: morphometry, autoencoder, ...);
2. clusters them with k-means into ``n_prototypes`` prototypes (no labels: fitting it on
   the training fold's cells is already nested, nothing of a test patient is seen);
   ``n_prototypes="auto"`` (the default) chooses ``K`` from ``prototype_grid``
   (4, 8, 16) jointly with ``C`` (step 4), see below;
3. gives each patient the share of its cells nearest to each prototype (vectorised: one
   ``bincount`` over ``patient * K + prototype``), as ``log((count + 0.5) / (n + 0.5 K))``
   (smoothed log proportions: a rare prototype going from 1 % to 3 % is a large change);
4. fits a class-balanced L2 logistic regression on the standardised clinical features and
   those ``K`` composition features, ``C`` chosen from ``Cs`` by inner stratified CV (log
   loss) on the fit patients, the threshold from that CV's out-of-fold probabilities.

**Choosing K** (``n_prototypes="auto"``): for each ``K`` of the grid, k-means is fitted
once on all the fit patients' cells, and each ``(K, C)`` pair is scored by the same inner
stratified CV (same folds, log loss) on the fit patients; the pair with the lowest loss
wins (ties to the smaller ``K``, then the smaller ``C``), and the threshold comes from its
out-of-fold probabilities. k-means is *not* refitted per inner fold: it reads no labels, so
centres fitted on every fit patient's cells carry nothing of an inner validation patient's
label, and nothing at all of the outer test fold (the choice stays nested w.r.t. it);
refitting would cost ``inner_folds`` times more k-means fits (15 instead of 3) to remove
only an unsupervised advantage (centres that saw the inner validation patients' cells, not
their labels; the fusion scaler is fitted the same way). Without inner folds (a class with fewer than 2 fit patients) the grid's
middle ``K`` is used. The chosen ``K`` is ``n_prototypes_``, each ``K``'s best inner loss
``prototype_losses_``; :meth:`fold_info` puts both into the comparison's per-fold rows.

``clinical=False`` gives the images-only variant (composition alone). Saved without pickles
(``fit-head --fusion composition --out``): :meth:`to_json` / :meth:`from_json`, checked
on load by :meth:`check_json` (shapes, finiteness, ranges).
:meth:`prototype_of` says which prototype each cell falls in (montages of prototypes);
:meth:`coefficients` names them ``proto<k>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from lymph.baselines.common import (
    check_predict_store,
    finish_fusion_logistic,
    fusion_state,
    restore_fusion_state,
    search_fusion_C,
    _check_threshold,
    _inner_folds,
    _need_clinical,
    _proba,
    native_threads,
)
from lymph.errors import LymphError
from lymph.head.bags import Scaler, check_bags, instances_of
from lymph.head.base import clinical_matrix, labelled_rows
from lymph.head.base import where as _where

#: The ``K`` values ``n_prototypes="auto"`` chooses from.
PROTOTYPE_GRID = (4, 8, 16)


def bag_proportions(assign: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """Per bag (``sizes`` consecutive cells each), the count of cells assigned to each of
    ``k`` prototypes: ``(n_bags, k)`` float64. No loop over bags."""
    bag = np.repeat(np.arange(sizes.size), sizes)
    counts = np.bincount(bag * k + assign, minlength=sizes.size * k)
    return counts.reshape(sizes.size, k).astype(np.float64)


class CompositionFusion(BaseEstimator, ClassifierMixin):
    """Clinical features + per-patient log proportions of ``n_prototypes`` k-means cell
    prototypes -> regularised logistic regression (see the module docstring)."""

    images = True

    def __init__(self, n_prototypes: int | str = "auto", clinical: bool = True,
                 Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), inner_folds: int = 5,
                 max_cells: int = 20000, n_init: int = 3, threshold: str | float = "inner",
                 seed: int = 0, n_threads: int | None = 1,
                 prototype_grid: tuple[int, ...] = PROTOTYPE_GRID) -> None:
        self.n_prototypes = n_prototypes
        self.clinical = clinical
        self.Cs = Cs
        self.inner_folds = inner_folds
        self.max_cells = max_cells
        self.n_init = n_init
        self.threshold = threshold
        self.seed = seed
        self.n_threads = n_threads
        self.prototype_grid = prototype_grid

    @property
    def inputs(self) -> str:
        return "images+clinical" if self.clinical else "images"

    # ---- prototypes ------------------------------------------------------------------------
    def _standardised(self, store: Any, rows: np.ndarray) -> np.ndarray:
        """The cells of ``rows``, standardised by the fitted instance scaler (float32)."""
        return self.instance_scaler_.transform(instances_of(store.embeddings, store.patient_ptr, rows))

    def _assign(self, store: Any, rows: np.ndarray, centres: np.ndarray | None = None,
                cells: np.ndarray | None = None) -> np.ndarray:
        x = self._standardised(store, rows) if cells is None else cells
        return _nearest(x, self.centres_ if centres is None else centres)

    def _composition(self, store: Any, rows: np.ndarray, centres: np.ndarray | None = None,
                     cells: np.ndarray | None = None) -> np.ndarray:
        c = self.centres_ if centres is None else centres
        sizes = store.bag_sizes[rows]
        k = c.shape[0]
        counts = bag_proportions(self._assign(store, rows, c, cells), sizes, k)
        return np.log((counts + 0.5) / (sizes[:, None] + 0.5 * k))

    def _features(self, store: Any, rows: np.ndarray, centres: np.ndarray | None = None,
                  cells: np.ndarray | None = None) -> np.ndarray:
        """``cells``: the standardised cells of ``rows`` when the caller has them already
        (fit: once for every ``K`` of the grid, not once per ``K``)."""
        comp = self._composition(store, rows, centres, cells)
        if not self.clinical:
            return comp
        clin = clinical_matrix(store, self.clinical_columns_)[rows].astype(np.float64)
        return np.concatenate([clin, comp], axis=1)

    def _grid(self) -> tuple[int, ...]:
        """The ``K`` values to try (one unless ``n_prototypes`` is "auto"), ascending."""
        if isinstance(self.n_prototypes, str):
            if self.n_prototypes != "auto":
                raise LymphError(f"n_prototypes: expected 'auto' or an integer >= 2, got "
                                 f"{self.n_prototypes!r}")
            g = self.prototype_grid
            if (not isinstance(g, (tuple, list)) or not g or any(
                    isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2 for k in g)):
                raise LymphError(f"prototype_grid: expected integers >= 2, got {g!r}")
            return tuple(sorted({int(k) for k in g}))
        if (isinstance(self.n_prototypes, bool) or not isinstance(self.n_prototypes, (int, np.integer))
                or self.n_prototypes < 2):
            raise LymphError(f"n_prototypes: expected 'auto' or an integer >= 2, got "
                             f"{self.n_prototypes!r}")
        return (int(self.n_prototypes),)

    # ---- fit -----------------------------------------------------------------------------------
    def fit(self, store: Any) -> CompositionFusion:
        with native_threads(self.n_threads):
            return self._fit(store)

    def _fit(self, store: Any) -> CompositionFusion:
        from sklearn.cluster import KMeans

        _check_threshold(self.threshold)
        grid = self._grid()
        if not self.Cs or any(float(c) <= 0 for c in self.Cs):
            raise LymphError(f"Cs: expected positive numbers, got {self.Cs!r}")
        rows, y = labelled_rows(store)
        self.clinical_columns_ = _need_clinical(store, "CompositionFusion") if self.clinical else []
        check_bags(store, rows)
        self.classes_ = np.array([0, 1])
        self.dim_ = store.dim
        self.feature_columns_ = None if store.feature_columns is None else list(store.feature_columns)
        cells = instances_of(store.embeddings, store.patient_ptr, rows)
        if cells.shape[0] < grid[0]:
            raise LymphError(f"{_where(store)}: {cells.shape[0]} cells, fewer than "
                             f"n_prototypes={grid[0]}")
        grid = tuple(k for k in grid if k <= cells.shape[0])
        self.instance_scaler_ = Scaler.fit(cells)
        standardised = self.instance_scaler_.transform(cells)  # float32, reused for every K
        del cells
        rng = np.random.default_rng(self.seed)
        x = standardised
        if x.shape[0] > self.max_cells:
            x = x[np.sort(rng.choice(x.shape[0], self.max_cells, replace=False))]
        x = np.asarray(x, dtype=np.float64)
        inner = _inner_folds(y, self.inner_folds, self.seed)
        auto = len(grid) > 1
        if auto and not inner:  # nothing to choose with: the grid's middle K
            grid = (grid[len(grid) // 2],)
        best: tuple[float, int] | None = None
        losses: dict[str, float] = {}
        for k in grid:  # ascending: ties go to the smaller K
            centres = KMeans(n_clusters=k, n_init=self.n_init,
                             random_state=self.seed).fit(x).cluster_centers_.astype(np.float64)
            feats = self._features(store, rows, centres, standardised)
            scaler = Scaler.fit(feats)
            z = np.asarray(scaler.transform(feats), dtype=np.float64)
            c, loss, oof = search_fusion_C(z, y, self.Cs, inner,
                                           force=auto or self.threshold == "inner")
            losses[str(k)] = loss
            if best is None or loss < best[0] - 1e-12:
                best = (loss, k)
                self.centres_, self.fusion_scaler_, chosen = centres, scaler, (z, c, oof)
        z, c, oof = chosen
        self.n_prototypes_ = int(self.centres_.shape[0])
        self.prototype_losses_ = losses if auto else {}
        self.C_, self.threshold_, self.coef_, self.intercept_ = finish_fusion_logistic(
            z, y, c, oof, self.threshold)
        return self

    def fold_info(self) -> dict[str, Any]:
        """What the comparison records per fold: the chosen ``K`` and ``C`` (and, with
        ``n_prototypes="auto"``, each ``K``'s inner-CV log loss)."""
        info: dict[str, Any] = {"n_prototypes": self.n_prototypes_, "C": self.C_}
        if self.prototype_losses_:
            info["prototype_losses"] = {k: round(v, 6) for k, v in self.prototype_losses_.items()}
        return info

    # ---- inference ---------------------------------------------------------------------------
    def _check_store(self, store: Any) -> np.ndarray:
        rows = check_predict_store(self, store)
        fc = getattr(self, "feature_columns_", None)
        if (fc is not None and store.feature_columns is not None
                and list(store.feature_columns) != fc):
            raise LymphError(f"{_where(store)}: /embeddings attribute 'columns' differs from the "
                             "model's feature columns: a store from another encoder?")
        return rows

    def decision_function(self, store: Any) -> np.ndarray:
        rows = self._check_store(store)
        with native_threads(getattr(self, "n_threads", 1)):
            z = self.fusion_scaler_.transform(self._features(store, rows))
        return np.asarray(z, dtype=np.float64) @ self.coef_ + self.intercept_

    def predict_proba(self, store: Any) -> np.ndarray:
        return _proba(1.0 / (1.0 + np.exp(-self.decision_function(store))))

    def predict(self, store: Any) -> np.ndarray:
        return (self.predict_proba(store)[:, 1] >= self.threshold_).astype(np.int64)

    def prototype_of(self, store: Any) -> list[np.ndarray]:
        """Per patient, the prototype index of each cell."""
        rows = self._check_store(store)
        a = self._assign(store, rows)
        return np.split(a, np.cumsum(store.bag_sizes)[:-1])

    def cell_scores(self, store: Any) -> list[np.ndarray]:
        """Per patient, each cell's push on the decision: the fusion logit minus the logit
        with that one cell left out (its prototype's count and the patient's cell count one
        lower). Cells of one prototype share a score; a positive one pushes towards
        malignant. ``lymph explain`` orders a patient's cells by it. Vectorised over
        patients and prototypes (an ``(n_patients, K, K)`` array, no loop over bags)."""
        rows = self._check_store(store)
        sizes = store.bag_sizes[rows].astype(np.float64)
        k = self.centres_.shape[0]
        with native_threads(getattr(self, "n_threads", 1)):
            assign = self._assign(store, rows)
        counts = bag_proportions(assign, store.bag_sizes[rows], k)  # (B, K)
        c = len(self.clinical_columns_)  # the clinical part of the logit cancels in the push
        mean, std, w = self.fusion_scaler_.mean[c:], self.fusion_scaler_.std[c:], self.coef_[c:]
        full = ((np.log((counts + 0.5) / (sizes[:, None] + 0.5 * k)) - mean) / std) @ w  # (B,)
        left = np.maximum(counts[:, None, :] - np.eye(k)[None], 0.0)  # (B, K left out, K)
        comp = np.log((left + 0.5) / (sizes[:, None, None] - 1.0 + 0.5 * k))
        push = full[:, None] - ((comp - mean) / std) @ w  # (B, K)
        bag = np.repeat(np.arange(rows.size), store.bag_sizes[rows])
        return np.split(push[bag, assign], np.cumsum(store.bag_sizes[rows])[:-1])

    def attention(self, store: Any) -> list[np.ndarray]:
        """Per patient, each cell's weight in the proportions (``1 / n``: every cell counts
        once), for ``predict``'s per-image CSV; which prototype a cell is: :meth:`prototype_of`;
        what it does to the decision: :meth:`cell_scores`."""
        rows = self._check_store(store)
        return [np.full(int(n), 1.0 / n) for n in store.bag_sizes[rows]]

    def coefficients(self) -> dict[str, float]:
        """The regression's coefficients by feature name (standardised inputs)."""
        names = list(self.clinical_columns_) + [f"proto{k}" for k in range(len(self.centres_))]
        return dict(zip(names, (float(v) for v in self.coef_)))

    # ---- JSON (model directory; no pickles) --------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        if not hasattr(self, "coef_"):
            raise LymphError("CompositionFusion: not fitted (call fit first)")
        params = self.get_params()
        params["Cs"] = [float(c) for c in params["Cs"]]
        params["prototype_grid"] = [int(k) for k in params["prototype_grid"]]
        if not isinstance(params["n_prototypes"], str):
            params["n_prototypes"] = int(params["n_prototypes"])
        return {
            "params": params,
            "instance_scaler": self.instance_scaler_.to_json(),
            "n_prototypes": self.n_prototypes_,
            "prototype_losses": {k: float(v) for k, v in self.prototype_losses_.items()},
            "centres": [[float(v) for v in row] for row in self.centres_],
            **fusion_state(self),
        }

    @classmethod
    def check_json(cls, d: Any, where: str) -> None:
        """Refuse a malformed saved state before anything is built from it: types, shapes,
        ranges (finiteness: the model directory checks every number). ``where`` names the
        state, e.g. ``MODEL/model.json: 'composition``; messages add ``.field'``."""
        from lymph.checks import check_float, check_int

        def fail(field: str, expected: str, got: Any) -> None:
            raise LymphError(f"{where}.{field}': expected {expected}, got {str(got)[:60]}")

        def get(obj: Any, field: str, types: Any, expected: str) -> Any:
            key = field.rpartition(".")[2]
            if not isinstance(obj, dict) or key not in obj:
                raise LymphError(f"{where}.{field}': missing (expected {expected})")
            v = obj[key]
            if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
                fail(field, expected, v)
            if not isinstance(v, types):
                fail(field, expected, v)
            return v

        def vector(obj: Any, field: str, n: int) -> np.ndarray:
            v = get(obj, field, list, f"a list of {n} numbers")
            if len(v) != n or any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in v):
                fail(field, f"a list of {n} numbers", f"{len(v)} values" if len(v) != n else v)
            return np.asarray(v, dtype=np.float64)

        def scaler(field: str, n: int) -> None:
            sc = get(d, field, dict, "an object with 'mean' and 'std'")
            vector(sc, f"{field}.mean", n)
            if (vector(sc, f"{field}.std", n) <= 0).any():
                fail(f"{field}.std", "numbers > 0", sc["std"])

        if not isinstance(d, dict):
            raise LymphError(f"{where}': expected an object, got {type(d).__name__}")
        params = get(d, "params", dict, "an object (the estimator's parameters)")
        unknown = sorted(set(params) - set(cls().get_params()))
        if unknown:
            fail("params", f"only {', '.join(sorted(cls().get_params()))}", ", ".join(unknown))
        try:
            est = cls(**{k: tuple(v) if k in ("Cs", "prototype_grid") and isinstance(v, list) else v
                         for k, v in params.items()})
            grid = est._grid()
            if not est.Cs or any(isinstance(c, bool) or not isinstance(c, (int, float))
                                 or not c > 0 for c in est.Cs):
                raise LymphError(f"Cs: expected positive numbers, got {est.Cs!r}")
            _check_threshold(est.threshold)
        except (LymphError, TypeError) as e:
            raise LymphError(f"{where}.params': {e}") from None
        if not isinstance(est.clinical, bool):
            fail("params.clinical", "true or false", est.clinical)
        for key, lo in (("inner_folds", 2), ("max_cells", 1), ("n_init", 1), ("seed", 0)):
            check_int(f"{where}.params.{key}'", getattr(est, key), lo)
        dim = check_int(f"{where}.dim'", get(d, "dim", int, "an integer >= 1"), 1)
        cols = get(d, "clinical_columns", list, "a list of column names")
        if not all(isinstance(c, str) for c in cols) or bool(cols) != est.clinical:
            fail("clinical_columns", "column names (none without clinical)", cols)
        fc = d.get("feature_columns")
        if fc is not None and not (isinstance(fc, list) and len(fc) == dim
                                   and all(isinstance(c, str) for c in fc)):
            fail("feature_columns", f"null or {dim} column names", fc)
        k = check_int(f"{where}.n_prototypes'", get(d, "n_prototypes", int, "an integer >= 2"), 2)
        if k not in grid and len(grid) > 1:
            fail("n_prototypes", f"one of the grid {list(grid)}", k)
        if len(grid) == 1 and k != grid[0]:
            fail("n_prototypes", f"{grid[0]} (params.n_prototypes)", k)
        losses = d.get("prototype_losses", {})
        if not isinstance(losses, dict) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in losses.values()):
            fail("prototype_losses", "an object of numbers", losses)
        scaler("instance_scaler", dim)
        centres = get(d, "centres", list, f"{k} lists of {dim} numbers")
        if len(centres) != k:
            fail("centres", f"{k} lists of {dim} numbers (n_prototypes)", f"{len(centres)} lists")
        for i, row in enumerate(centres):
            vector({str(i): row}, f"centres.{i}", dim)
        n_feat = len(cols) + k
        scaler("fusion_scaler", n_feat)
        vector(d, "coef", n_feat)
        check_float(f"{where}.intercept'", get(d, "intercept", (int, float), "a number"))
        c = check_float(f"{where}.C'", get(d, "C", (int, float), "a number > 0"), 0.0, lo_open=True)
        if not any(abs(c - float(x)) <= 1e-12 * max(1.0, abs(c)) for x in est.Cs):
            fail("C", f"one of params.Cs {list(est.Cs)}", c)
        check_float(f"{where}.threshold'", get(d, "threshold", (int, float), "a number in (0, 1)"),
                    0.0, 1.0, lo_open=True, hi_open=True)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CompositionFusion:
        params = dict(d["params"])
        params["Cs"] = tuple(params["Cs"])
        params["prototype_grid"] = tuple(params["prototype_grid"])
        est = cls(**params)
        restore_fusion_state(est, d)
        est.instance_scaler_ = Scaler.from_json(d["instance_scaler"])
        est.n_prototypes_ = int(d["n_prototypes"])
        est.prototype_losses_ = {str(k): float(v) for k, v in d.get("prototype_losses", {}).items()}
        est.centres_ = np.asarray(d["centres"], dtype=np.float64).reshape(est.n_prototypes_, est.dim_)
        return est


def _nearest(x: np.ndarray, c: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean, in float64) of each row of ``x``, in
    blocks of rows: a million float32 cells never become one float64 copy (cohort scale)."""
    out = np.empty(x.shape[0], dtype=np.int64)
    cc = (c * c).sum(1)[None, :]
    for s in range(0, x.shape[0], block):  # blocks of rows, not a loop over bags
        b = np.asarray(x[s : s + block], dtype=np.float64)
        out[s : s + block] = np.argmin((b * b).sum(1)[:, None] - 2.0 * b @ c.T + cc, axis=1)
    return out
