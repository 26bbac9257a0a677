"""``lymph compare-baselines``: every model on exactly the same patient-level folds.

    res = compare(store, default_models(store), folds=5, repeats=1, seed=0)
    res.rows()      # the --json rows (same keys as ``fit-head --json``, plus ``model``)
    res.paired      # best images+clinical vs best clinical-only, per fold

One :func:`~lymph.head.evaluate.make_folds` call makes the folds; every model is
cross-validated on that list by :func:`~lymph.head.evaluate.cross_validate`, so fold ``k`` of
repeat ``r`` holds the same patients for all. Paired comparison: for the best model using
images and clinical data and the best clinical-only model (each by mean balanced accuracy),
the per-fold differences of balanced accuracy and ROC AUC, their mean and standard
deviation, and the folds won / tied / lost.

MIL training settings of the comparison (:data:`FAST_MIL`): at most 30 epochs, patience 5,
64 patients per step (the ``fit-head`` defaults are 100 / 15 / 32). Measured on the dev
morphometry store this keeps 5-fold x 1 of all ten models under 15 s on 2 cores with
balanced accuracy within the fold-to-fold noise of the defaults (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lymph.errors import LymphError
from lymph.head.evaluate import (
    METRICS,
    CVResult,
    Fold,
    cross_validate_many,
    make_folds,
    summarise,
)

# the model registry (torch-free): kinds, the MIL settings (FAST_MIL: speed; see the module
# docstring), every model's entry
from lymph.compare_models import (  # noqa: F401 (CLINICAL..IMAGES: this module's API too)
    CLINICAL,
    FAST_MIL,
    IMAGES,
    IMAGES_CLINICAL,
    model_entries,
    model_names,
)


@dataclass
class ModelSpec:
    """A model of the comparison: a factory of fresh, unfitted estimators and what it reads."""

    make: Callable[[], Any]
    inputs: str  # CLINICAL, IMAGES_CLINICAL or IMAGES
    pooling: str | None = None  # MIL pooling, None for non-MIL models
    description: str = ""
    cost: float = 1.0  # relative time per fold: orders the parallel schedule, nothing else


@dataclass
class ModelResult:
    name: str
    spec: ModelSpec
    cv: CVResult
    summary: dict[str, dict[str, float]]
    params: dict[str, Any]
    #: out-of-fold instance weights by patient id, from the first repeat that scored the
    #: patient (models with ``attention``; empty otherwise)
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    #: out-of-fold cell scores by patient id, same rule (models with ``cell_scores``, e.g.
    #: late fusion, whose attention is uniform); the report's cell ranking prefers these
    cell_scores: dict[str, np.ndarray] = field(default_factory=dict)
    #: per fold, the fitted model's standardised coefficients (models with ``coefficients``)
    coefficients: list[dict[str, float]] = field(default_factory=list)


@dataclass
class ComparisonResult:
    models: dict[str, ModelResult]  # in the order given
    folds: list[Fold]
    n_folds: int
    repeats: int
    seed: int
    n_patients: int
    notes: list[str] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)  # first: best vs best
    store_info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))

    def ranked(self) -> list[ModelResult]:
        """Models by mean balanced accuracy, best first (ties: ROC AUC)."""
        return sorted(self.models.values(), key=lambda m: (
            -_nan0(m.summary["balanced_accuracy"]["mean"]), -_nan0(m.summary["roc_auc"]["mean"])))

    def rows(self) -> list[dict[str, Any]]:
        """The ``--json`` rows, sorted by mean balanced accuracy (best first)."""
        out = []
        for m in self.ranked():
            cv = m.cv
            out.append({
                "model": m.name,
                "pooling": m.spec.pooling,
                "inputs": m.spec.inputs,
                "images": m.spec.inputs != CLINICAL,
                "clinical": m.spec.inputs != IMAGES,
                "folds": self.n_folds, "repeats": self.repeats, "seed": self.seed,
                "n_patients": self.n_patients,
                "seconds": round(cv.seconds, 3),
                **m.summary,
                "threshold": {"mean": float(np.mean([f.threshold for f in cv.folds])),
                              "std": float(np.std([f.threshold for f in cv.folds]))},
                "params": m.params,
                "store": self.store_info,
                "per_fold": [{"repeat": f.repeat, "fold": f.fold, "threshold": f.threshold,
                              "seconds": round(f.seconds, 3), **f.info,
                              **{k: f.metrics[k] for k in METRICS}} for f in cv.folds],
            })
        return out

    def to_json(self) -> dict[str, Any]:
        """``comparison.json``: settings, notes, the rows, the paired comparisons."""
        return {"folds": self.n_folds, "repeats": self.repeats, "seed": self.seed,
                "n_patients": self.n_patients, "seconds": round(self.seconds, 3),
                "store": self.store_info, "notes": list(self.notes),
                "mil_settings": dict(FAST_MIL),
                "fold_patients": [{"repeat": r, "fold": k, "test": [str(i) for i in self.ids[te]]}
                                  for r, k, _, te in self.folds],
                "models": self.rows(), "paired": self.paired}


def _nan0(v: float) -> float:
    return float(v) if np.isfinite(v) else -1.0


def _params(est: Any) -> dict[str, Any]:
    out = {}
    for k, v in est.get_params().items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ---- the default model set ---------------------------------------------------------------------
def default_models(store: Any, seed: int = 0,
                   optional: bool = False) -> tuple[dict[str, ModelSpec], list[str]]:
    """The comparison's models in report order (:mod:`lymph.compare_models`), and notes on
    those skipped.

    Clinical-only: AdaBoost, logistic regression, the clinical MLP; images + clinical: the
    MIL head with every comparison pooling (mean, max, attention, gated attention); images
    only: attention; the mixture of experts; late fusion; the bag-statistics forest; cell
    composition + clinical (``optional``: also the opt-in models, ``--models`` only). On a
    store without clinical columns the models that need clinical data are skipped (with a
    note).
    """
    clinical = bool(list(store.clinical_columns))
    specs: dict[str, ModelSpec] = {
        e.name: ModelSpec(e.make(seed), IMAGES if e.clinical_optional and not clinical else e.inputs,
                          e.pooling, e.description, e.cost)
        for e in model_entries(optional=optional)}
    notes: list[str] = []
    if not list(store.clinical_columns):
        skipped = [n for n, s in specs.items() if s.inputs != IMAGES]
        notes.append("the store has no clinical columns: skipped " + ", ".join(skipped))
        specs = {n: s for n, s in specs.items() if s.inputs == IMAGES}
    return specs, notes


def select_models(specs: dict[str, ModelSpec], names: str | list[str] | None) -> dict[str, ModelSpec]:
    """The models named in ``names`` (comma-separated or a list), in the given order."""
    if names is None:
        return {n: s for n, s in specs.items() if n in model_names()}
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    known = model_names(optional=True)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise LymphError(f"models: unknown model(s) {', '.join(unknown)}; expected names from "
                         f"{', '.join(known)}")
    missing = [n for n in wanted if n not in specs]
    if missing:
        raise LymphError(f"models: {', '.join(missing)} cannot run on this store (no clinical "
                         "columns)")
    if not wanted:
        raise LymphError("models: expected at least one model name (empty selection)")
    return {n: specs[n] for n in wanted}


class _Recorder:
    """Wraps an estimator inside the CV: ``cv_extra`` returns the fold's coefficients and each
    test patient's instance weights and cell scores (kept by :func:`compare` the first time a
    patient is scored, i.e. in its repeat-0 fold); returned rather than stored, so that it
    works in fold worker processes."""

    def __init__(self, est: Any) -> None:
        self.est = est

    def fit(self, store: Any) -> _Recorder:
        self.est.fit(store)
        return self

    def predict_proba(self, store: Any) -> np.ndarray:
        return self.est.predict_proba(store)

    def cv_extra(self, store: Any) -> dict[str, Any]:
        """The fitted model's coefficients, and each test patient's instance weights and cell
        scores (models that have them)."""
        extra: dict[str, Any] = {}
        if hasattr(self.est, "coefficients"):
            extra["coefficients"] = dict(self.est.coefficients())
        if hasattr(self.est, "attention") and getattr(self.est, "images", True) is not False:
            ids = [str(pid) for pid in store.ids]
            extra["attention"] = dict(zip(ids, map(np.asarray, self.est.attention(store))))
            if hasattr(self.est, "cell_scores"):
                extra["cell_scores"] = dict(zip(ids, map(np.asarray,
                                                         self.est.cell_scores(store))))
        return extra

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["est"], name)


# ---- the comparison ------------------------------------------------------------------------------
def paired(a: ModelResult, b: ModelResult) -> dict[str, Any]:
    """Per-fold differences ``a - b`` (same folds) of balanced accuracy and ROC AUC."""
    out: dict[str, Any] = {"model": a.name, "baseline": b.name, "per_fold": []}
    for fa, fb in zip(a.cv.folds, b.cv.folds):
        if (fa.repeat, fa.fold) != (fb.repeat, fb.fold) or not np.array_equal(fa.test_rows, fb.test_rows):
            raise LymphError("paired comparison: the two models were not run on the same folds")
        out["per_fold"].append({"repeat": fa.repeat, "fold": fa.fold, **{
            m: fa.metrics[m] - fb.metrics[m] for m in ("balanced_accuracy", "roc_auc")}})
    from lymph.intervals import corrected_interval, naive_interval

    ratio = float(np.mean([f.test_rows.size / max(f.train_rows.size, 1) for f in a.cv.folds]))
    for m in ("balanced_accuracy", "roc_auc"):
        d = np.array([f[m] for f in out["per_fold"]], dtype=np.float64)
        d = d[np.isfinite(d)]
        tol = 1e-9
        out[m] = {"mean_difference": float(d.mean()) if d.size else float("nan"),
                  "std_difference": float(d.std()) if d.size else float("nan"),
                  "won": int((d > tol).sum()), "tied": int((np.abs(d) <= tol).sum()),
                  "lost": int((d < -tol).sum()),
                  # 95 % intervals of the mean difference (lymph.intervals)
                  "ci95_corrected": list(corrected_interval(d, ratio)),
                  "ci95_naive": list(naive_interval(d))}
    return out


def compare(store: Any, models: dict[str, ModelSpec] | dict[str, Callable[[], Any]],
            folds: int = 5, repeats: int = 1, seed: int = 0,
            progress: Callable[[str, int, int], None] | None = None,
            fold_list: list[Fold] | None = None, n_jobs: int = 1) -> ComparisonResult:
    """Cross-validate every model on the same folds (one :func:`make_folds` call).

    ``models`` maps names to :class:`ModelSpec` (or bare factories, treated as
    images + clinical models). ``progress(name, done, total)`` is called after each fold.
    ``fold_list`` replaces the folds (e.g. stage one's, :func:`folds_from_store`); then
    ``folds`` and ``repeats`` are taken from it. ``n_jobs``: every (model, fold) pair is one
    task of a pool of that many worker processes, the most costly models' folds first
    (``ModelSpec.cost``); same results (:func:`~lymph.head.evaluate.cross_validate_many`).
    """
    from lymph.baselines import native_threads

    if not models:
        raise LymphError("compare: no models to run (empty selection)")
    specs = {n: (m if isinstance(m, ModelSpec) else ModelSpec(m, IMAGES_CLINICAL))
             for n, m in models.items()}
    labelled = store.labelled()
    if labelled.size == 0:
        raise LymphError(f"{store.path or 'store'}: /patients/label: no labelled patients "
                         "(empty selection)")
    if fold_list is None:
        fold_list = make_folds(store.labels, folds, repeats, seed)
    else:
        folds = max(f[1] for f in fold_list) + 1
        repeats = max(f[0] for f in fold_list) + 1
    t0 = time.perf_counter()
    results: dict[str, ModelResult] = {}
    makers = {n: (lambda s=spec: _Recorder(s.make())) for n, spec in specs.items()}
    extras: dict[str, dict[int, dict[str, Any]]] = {}
    with native_threads(1):  # every (model, fold) pair one task of one pool (n_jobs workers)
        cvs = cross_validate_many(makers, store, fold_list, progress=progress, n_jobs=n_jobs,
                                  extras=extras, cost={n: s.cost for n, s in specs.items()})
    for name, spec in specs.items():
        sink: dict[str, np.ndarray] = {}
        scores: dict[str, np.ndarray] = {}
        coefs: list[dict[str, float]] = []
        ex = extras.get(name, {})
        for k in sorted(ex):  # fold order: a patient's first (repeat-0) scoring wins
            for pid, w in ex[k].get("attention", {}).items():
                sink.setdefault(pid, w)
            for pid, w in ex[k].get("cell_scores", {}).items():
                scores.setdefault(pid, w)
            if "coefficients" in ex[k]:
                coefs.append(ex[k]["coefficients"])
        results[name] = ModelResult(name, spec, cvs[name], summarise(cvs[name]),
                                    _params(spec.make()), sink, scores, coefs)
    res = ComparisonResult(
        models=results, folds=fold_list, n_folds=folds, repeats=repeats, seed=seed,
        n_patients=int(labelled.size), seconds=time.perf_counter() - t0,
        store_info={"path": None if store.path is None else str(store.path),
                    "fingerprint": store.fingerprint,
                    "method": (store.provenance or {}).get("method")},
        ids=store.ids)
    res.paired = paired_comparisons(res)
    return res


def paired_comparisons(res: ComparisonResult) -> list[dict[str, Any]]:
    """Best images+clinical model vs best clinical-only model first, then every other
    model using images vs that same clinical-only model."""
    ranked = res.ranked()
    clin = [m for m in ranked if m.spec.inputs == CLINICAL]
    img = [m for m in ranked if m.spec.inputs == IMAGES_CLINICAL]
    if not clin or not img:
        res.notes.append("paired comparison skipped: it needs a clinical-only model and an "
                         "images + clinical model")
        return []
    out = [dict(paired(img[0], clin[0]), primary=True)]
    for m in ranked:
        if m.spec.inputs != CLINICAL and m is not img[0]:
            out.append(dict(paired(m, clin[0]), primary=False))
    return out


# ---- the command -----------------------------------------------------------------------------------
def run_compare(store: Any, *, folds: int = 5, repeats: int = 1, seed: int = 0,
                out: Any = None, json_path: Any = None, models: str | list[str] | None = None,
                images: Any = None, montages: bool = True,
                progress: Callable[[str, int, int], None] | None = None,
                folds_from_store: bool = False, chosen: str | None = None,
                target_sensitivity: float = 0.95,
                predict_unlabelled: Callable[[float | None], dict[str, Any] | None] | None = None,
                n_jobs: int = 1,
                allow_in_sample: bool = False,
                ) -> tuple[ComparisonResult, dict[str, Any]]:
    """``lymph compare-baselines``: open the store, compare, write ``--json`` and the report.

    ``store`` is a path or an open store; ``images`` an image cache for the montages
    (default: the source files recorded in the store). Returns the result and the files.
    ``folds_from_store``: use stage one's K folds (a weak store's, one repeat) instead of
    ``folds`` x ``repeats`` new ones. A weak store is checked for fold safety first.
    ``chosen``: the report's chosen model (default: the best images + clinical model);
    ``target_sensitivity``: the report's triage operating point; ``predict_unlabelled(thr)``
    (``lymph run``) predicts the unlabelled patients for the report, given the chosen
    model's cohort threshold for the target sensitivity. A store whose labelled patients were
    scored in-sample by a label-trained encoder is refused (:mod:`lymph.insample`) unless
    ``allow_in_sample``; then the notes, ``store.in_sample`` and the report say so.
    """
    from lymph.report.triage import check_target

    target_sensitivity = check_target(target_sensitivity)
    import json
    import os
    from pathlib import Path

    from lymph.atomic import write_text_atomic
    from lymph.store import open_store

    s = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    specs, notes = default_models(s, seed=seed, optional=True)
    specs = select_models(specs, models)
    if chosen is not None and chosen not in specs:
        raise LymphError(f"chosen: {chosen!r} is not among the models of this comparison "
                         f"({', '.join(specs)})")
    from lymph.insample import check_in_sample

    in_sample = check_in_sample(s, allow=allow_in_sample,
                                images=any(sp.inputs != CLINICAL for sp in specs.values()))
    if in_sample:
        notes.insert(0, in_sample)
    fold_list = None
    if folds_from_store:
        from lymph.head.evaluate import folds_from_store as stage_one_folds

        fold_list = stage_one_folds(s)
        notes.append(f"folds: stage one's {len(fold_list)} folds (--folds-from-store), one "
                     "repeat; --folds and --repeats ignored")
    res = compare(s, specs, folds=folds, repeats=repeats, seed=seed, progress=progress,
                  fold_list=fold_list, n_jobs=n_jobs)
    res.notes[:0] = notes
    if in_sample:
        res.store_info["in_sample"] = in_sample
    outputs: dict[str, Any] = {}
    predictions = None
    if predict_unlabelled is not None:
        from lymph.report.analysis import choose
        from lymph.report.triage import cohort_threshold

        predictions = predict_unlabelled(
            cohort_threshold(choose(res, chosen)[0].cv, target_sensitivity))
        if predictions:
            outputs.update(predictions["outputs"])
    if json_path is not None:
        outputs["json"] = write_text_atomic(
            json_path, json.dumps(res.rows(), indent=2, default=float) + "\n")
    if out is not None:
        from lymph.report.markdown import write_report

        cache = None
        if images is not None:
            from lymph.data.cache import open_cache

            cache = open_cache(images)
        files = write_report(res, s, Path(out), cache=cache, montages=montages, chosen=chosen,
                             target_sensitivity=target_sensitivity, predictions=predictions)
        outputs.update({k: v for k, v in files.items() if not k.startswith("montage:")})
        n_m = sum(k.startswith("montage:") for k in files)
        if n_m:
            outputs["montages"] = f"{n_m} in {Path(out) / 'misclassified'}"
    return res, outputs
