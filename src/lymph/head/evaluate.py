"""Patient-level cross-validation for any estimator of the stage-two contract.

    folds = make_folds(store.labels, folds=5, repeats=5, seed=0)
    cv = cross_validate(lambda: MILClassifier(pooling="mean"), store, folds)
    summarise(cv)   # {"balanced_accuracy": {"mean": .., "std": ..}, ...}

Folds are stratified k-fold over the labelled patients, one independent shuffle per repeat
(``StratifiedKFold(shuffle=True, random_state=seed + repeat)``), so every model compared
with the same ``(labels, folds, repeats, seed)`` sees exactly the same splits. Each fold
fits a fresh estimator on ``store.subset(train_rows)`` and scores ``store.subset(test_rows)``
at the estimator's own ``threshold_``. Metrics come from ``sklearn.metrics``; the mean and
standard deviation are over all ``folds x repeats`` folds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lymph.errors import LymphError
from lymph.splits import Fold, make_folds  # noqa: F401 (make_folds: part of this API)

METRICS = ("balanced_accuracy", "accuracy", "f1", "roc_auc", "pr_auc")


def folds_from_store(store: Any) -> list[Fold]:
    """Stage one's folds, for a stage two on exactly the same patient splits.

    A weak-supervision store (``lymph embed --method weak --folds K``) records in its
    provenance ``weak_folds.test_ids`` the patient ids of each of its K folds; fold ``k``
    here tests those patients and trains on the store's other labelled patients (one
    repeat). Ids absent from ``store`` (a subset) are skipped. See
    ``docs/weak-supervision.md`` for what this measures.
    """
    wf = (getattr(store, "provenance", None) or {}).get("weak_folds")
    where = getattr(store, "path", None) or "store"
    if not wf or not wf.get("test_ids"):
        raise LymphError(f"{where}: `folds_from_store`: the store records no stage-one folds "
                         "(provenance 'weak_folds'); make it with `lymph embed --method weak "
                         "--folds K`")
    pos = {str(pid): i for i, pid in enumerate(store.ids)}
    labelled = np.flatnonzero(np.asarray(store.labels) >= 0)
    out: list[Fold] = []
    seen: set[int] = set()
    for k, ids in enumerate(wf["test_ids"]):
        te = np.array(sorted(pos[i] for i in ids if i in pos and store.labels[pos[i]] >= 0),
                      dtype=np.int64)
        if seen & set(te.tolist()):
            raise LymphError(f"{where}: provenance 'weak_folds': a patient is in two folds")
        seen |= set(te.tolist())
        out.append((0, k, np.setdiff1d(labelled, te), te))
    if seen != set(labelled.tolist()):
        raise LymphError(f"{where}: provenance 'weak_folds': {len(set(labelled.tolist()) - seen)} "
                         "labelled patient(s) belong to no stage-one fold")
    return out


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Balanced accuracy, accuracy and F1 of ``p >= threshold``; ROC and PR AUC of ``p``."""
    from sklearn import metrics as m

    pred = (p >= threshold).astype(int)
    two = np.unique(y).size == 2
    return {
        "balanced_accuracy": float(m.balanced_accuracy_score(y, pred)),
        "accuracy": float(m.accuracy_score(y, pred)),
        "f1": float(m.f1_score(y, pred, zero_division=0)),
        "roc_auc": float(m.roc_auc_score(y, p)) if two else float("nan"),
        "pr_auc": float(m.average_precision_score(y, p)) if two else float("nan"),
    }


@dataclass
class FoldResult:
    repeat: int
    fold: int
    train_rows: np.ndarray
    test_rows: np.ndarray
    threshold: float
    metrics: dict[str, float]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)  # e.g. best_epoch for MIL models


@dataclass
class CVResult:
    """Per-fold results and out-of-fold P(malignant): ``oof[r, row]`` (NaN if unscored)."""

    ids: np.ndarray
    labels: np.ndarray
    folds: list[FoldResult]
    oof: np.ndarray  # (repeats, n_patients) float64
    oof_threshold: np.ndarray  # (repeats, n_patients): threshold of the fold that scored it
    oof_fold: np.ndarray  # (repeats, n_patients) int, -1 if unscored
    seconds: float

    @property
    def repeats(self) -> int:
        return int(self.oof.shape[0])

    def oof_rows(self) -> list[dict[str, Any]]:
        """One record per (patient, repeat) scored out of fold: the OOF CSV's rows."""
        out = []
        for r in range(self.repeats):
            for i in np.flatnonzero(self.oof_fold[r] >= 0):
                p, t = float(self.oof[r, i]), float(self.oof_threshold[r, i])
                out.append({"id": str(self.ids[i]), "label": int(self.labels[i]), "repeat": r,
                            "fold": int(self.oof_fold[r, i]), "probability": p,
                            "threshold": t, "predicted": int(p >= t)})
        return out


def _run_fold(make_model: Callable[[], Any], store: Any, fold: Fold
              ) -> tuple[FoldResult, np.ndarray, dict[str, Any]]:
    r, f, tr, te = fold
    t0 = time.perf_counter()
    model = make_model().fit(store.subset(tr))
    p = np.asarray(model.predict_proba(store.subset(te)))[:, 1]
    thr = float(getattr(model, "threshold_", 0.5))
    y = store.labels[te].astype(np.int64)
    info = {a: getattr(model, a + "_") for a in ("best_epoch", "epochs_run")
            if hasattr(model, a + "_")}
    if hasattr(model, "fold_info"):  # e.g. the composition model's chosen K and C
        info.update(model.fold_info())
    extra = model.cv_extra(store.subset(te)) if hasattr(model, "cv_extra") else {}
    return (FoldResult(r, f, tr, te, thr, metrics(y, p, thr), time.perf_counter() - t0, info),
            p, extra)


#: What forked fold workers read (set before the pool starts; fork shares it, no pickling).
_JOB: dict[str, Any] = {}

#: One unit of work: a model factory and the fold to fit and score it on.
Task = tuple[Callable[[], Any], Fold]


def _task_worker(k: int) -> tuple[int, FoldResult, np.ndarray, dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    make, fold = _JOB["tasks"][k]
    out = (k, *_run_fold(make, _JOB["store"], fold))
    _release_memory()  # a worker runs many tasks: hand the last one's heap back
    return out


def _release_memory() -> None:
    """Free what the finished task left: cycles, then glibc's unused heap (``malloc_trim``;
    a no-op where glibc is absent). Peak memory of long-lived workers, not results."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_tasks(tasks: list[Task], store: Any, n_jobs: int = 1,
              order: list[int] | None = None) -> Any:
    """Yield ``(k, FoldResult, p, extra)`` for task ``k`` of ``tasks`` as each finishes.

    ``n_jobs > 1``: in that many forked worker processes (POSIX ``fork``: the store is
    shared, not copied), started in ``order`` (default: as given; put the longest first
    so that no long task starts last). Each fold's model is seeded by its own parameters
    and trains on one thread, so results do not depend on ``n_jobs`` or ``order``.
    """
    import sys

    order = list(range(len(tasks))) if order is None else list(order)
    jobs = min(n_jobs, len(tasks)) if sys.platform != "win32" else 1
    if jobs <= 1:
        for k in order:
            make, fold = tasks[k]
            yield (k, *_run_fold(make, store, fold))
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from lymph.signals import worker_init

    _JOB.update(tasks=tasks, store=store)
    try:
        ex = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork"),
                                 initializer=worker_init)
        try:
            futs = [ex.submit(_task_worker, k) for k in order]
            for fut in as_completed(futs):
                yield fut.result()
        except BaseException:  # Ctrl-C, SIGTERM/SIGHUP, an error, the caller stopped early
            _stop_pool(ex)  # not the queued tasks' results: stop now, not after all of them
            raise
        ex.shutdown(wait=True)
    finally:
        _JOB.clear()


def _stop_pool(ex: Any) -> None:
    """Cancel the queued tasks, end the running ones (their workers ignore SIGINT and SIGHUP,
    :func:`lymph.signals.worker_init`, and die on SIGTERM), and reap the workers."""
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        try:
            proc.terminate()
        except (OSError, ValueError):
            pass
    ex.shutdown(wait=True, cancel_futures=True)


class _Collector:
    """Assembles one model's :class:`CVResult` from fold results arriving in any order."""

    def __init__(self, store: Any, folds_list: list[Fold]) -> None:
        repeats = max(f[0] for f in folds_list) + 1
        n = store.n_patients
        self.store, self.n_folds = store, len(folds_list)
        self.oof = np.full((repeats, n), np.nan)
        self.oof_t = np.full((repeats, n), np.nan)
        self.oof_f = np.full((repeats, n), -1, dtype=np.int64)
        self.by_k: dict[int, FoldResult] = {}

    def add(self, k: int, fr: FoldResult, p: np.ndarray) -> int:
        self.by_k[k] = fr
        self.oof[fr.repeat, fr.test_rows] = p
        self.oof_t[fr.repeat, fr.test_rows] = fr.threshold
        self.oof_f[fr.repeat, fr.test_rows] = fr.fold
        return len(self.by_k)

    def result(self, seconds: float) -> CVResult:
        return CVResult(ids=self.store.ids, labels=self.store.labels,
                        folds=[self.by_k[k] for k in range(self.n_folds)], oof=self.oof,
                        oof_threshold=self.oof_t, oof_fold=self.oof_f, seconds=seconds)


def _check_cv_args(folds_list: list[Fold], n_jobs: int) -> None:
    if not folds_list:
        raise LymphError("cross_validate: no folds (empty selection)")
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs < 1:
        raise LymphError(f"n_jobs: expected an integer >= 1, got {n_jobs!r}")


def cross_validate(make_model: Callable[[], Any], store: Any, folds_list: list[Fold],
                   progress: Callable[[int, int], None] | None = None,
                   n_jobs: int = 1, extras: dict[int, dict[str, Any]] | None = None) -> CVResult:
    """Fit ``make_model()`` on each fold's training patients, score its test patients.

    ``n_jobs > 1``: folds run in that many forked worker processes (POSIX ``fork``: the
    store is shared, not copied). Every fold's model is seeded by its own parameters and
    trains on one thread, so results are identical to ``n_jobs=1`` (the tests check it).
    ``extras``: filled with ``model.cv_extra(test_store)`` per fold index when the model
    has that method (the comparison's instance weights).
    """
    _check_cv_args(folds_list, n_jobs)
    col = _Collector(store, folds_list)
    t_all = time.perf_counter()
    for k, fr, p, extra in run_tasks([(make_model, f) for f in folds_list], store, n_jobs):
        done = col.add(k, fr, p)
        if extras is not None and extra:
            extras[k] = extra
        if progress is not None:
            progress(done, len(folds_list))
    return col.result(time.perf_counter() - t_all)


def cross_validate_many(makers: dict[str, Callable[[], Any]], store: Any,
                        folds_list: list[Fold],
                        progress: Callable[[str, int, int], None] | None = None,
                        n_jobs: int = 1, extras: dict[str, dict[int, dict[str, Any]]] | None = None,
                        cost: dict[str, float] | None = None) -> dict[str, CVResult]:
    """:func:`cross_validate` of several models on the same folds, every (model, fold) pair
    one task of a single pool: with ``n_jobs`` workers, no worker waits for the last fold
    of one model before the next model starts. ``cost`` (relative time per fold, default 1)
    only orders the tasks, most costly first; results do not depend on it nor on
    ``n_jobs``. ``progress(name, done, total)`` after each fold; ``extras[name]`` as in
    :func:`cross_validate`. Each result's ``seconds`` is the sum of its folds' times (with
    ``n_jobs == 1``, its own wall time).
    """
    _check_cv_args(folds_list, n_jobs)
    names = list(makers)
    tasks: list[Task] = [(makers[n], f) for n in names for f in folds_list]
    nf = len(folds_list)
    c = cost or {}
    order = (sorted(range(len(tasks)), key=lambda t: -float(c.get(names[t // nf], 1.0)))
             if n_jobs > 1 else None)  # one process: model after model
    cols = {n: _Collector(store, folds_list) for n in names}
    for t, fr, p, extra in run_tasks(tasks, store, n_jobs, order):
        name, k = names[t // nf], t % nf
        done = cols[name].add(k, fr, p)
        if extras is not None and extra:
            extras.setdefault(name, {})[k] = extra
        if progress is not None:
            progress(name, done, nf)
    return {n: cols[n].result(float(sum(f.seconds for f in cols[n].by_k.values())))
            for n in names}


def summarise(cv: CVResult) -> dict[str, dict[str, float]]:
    """Mean and standard deviation (ddof 0) of each metric over all folds."""
    out = {}
    for name in METRICS:
        v = np.array([fr.metrics[name] for fr in cv.folds], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[name] = {"mean": float(v.mean()) if v.size else float("nan"),
                     "std": float(v.std()) if v.size else float("nan")}
    return out
