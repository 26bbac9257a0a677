"""Nested evaluation of a label-trained stage one (issue 18): ``compare-baselines --nested``.

A fold-safe weak store (``lymph embed --method weak --folds K``) scores every labelled
patient with a scorer that did not train on it, but stage two's cross-validation on that
store is ordinary stacking: in a stage-two fold, the training patients' scores come from
scorers that trained on that fold's *test* patients. Nested evaluation removes the path:

for each outer fold ``(r, k, train, test)`` of :func:`~lymph.head.evaluate.make_folds` (the
same folds ``compare-baselines`` makes on the same labels and seed),

1. the test patients' labels are hidden (an image cache view whose test patients are
   unlabelled, :func:`masked_cache`);
2. stage one runs on that view (:func:`lymph.encoder.weak_folds.run_weak`, ``inner_folds`` inner
   folds): the training patients get out-of-fold scores from inner scorers, the test
   patients are scored by the inner "final" scorer, trained on the training patients only;
3. every stage-two model is fitted on the training patients of that store and scores the
   test patients.

No number that reaches an outer test patient ever saw its label (checked: the final
scorer's recorded training ids never include a test patient). Cost: one full stage-one run
per outer fold, i.e. ``folds x repeats x (inner_folds + 1)`` scorer trainings on about
``(folds - 1) / folds`` of the labelled cells, against ``K + 1`` for the plain store
(5-fold x 5 with 5 inner folds: 150 scorer trainings, 25x the plain weak run).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lymph.errors import LymphError


#: how outer test patients may be scored (see :func:`nested_compare`)
TEST_SCORING = ("final", "fold-mean")


def parse_test_scoring(text: str) -> tuple[str, ...]:
    """``"final,fold-mean"`` -> ``("final", "fold-mean")``; refuses anything else."""
    items = tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in items if t not in TEST_SCORING]
    if bad or not items or len(set(items)) != len(items):
        raise LymphError(f"test_scoring: expected a comma-separated subset of "
                         f"{', '.join(TEST_SCORING)}, got {text!r}")
    return items


def masked_cache(cache: Any, hide: np.ndarray) -> Any:
    """A shallow copy of the image cache whose patients ``hide`` (row indices) are unlabelled
    (label -1); pixels and everything else are shared."""
    view = copy.copy(cache)
    hidden = {int(i) for i in hide}
    view.patients = [dict(p, label=-1) if i in hidden else p for i, p in enumerate(cache.patients)]
    return view


def nested_compare(cache: Any, models: dict[str, Any], *, folds: int = 5, repeats: int = 1,
                   seed: int = 0, inner_folds: int = 5, config: Any = None,
                   model_config: Any = None, workdir: str | Path | None = None,
                   test_scoring: tuple[str, ...] = ("final",), with_stores: Any = (),
                   from_repeat: int = 0, target: str = "label",
                   progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Cross-validate ``models`` (``lymph.compare.ModelSpec``) with stage one (the weak
    scorer) retrained inside every outer fold; returns a
    :class:`lymph.compare.ComparisonResult` (notes say it is nested, and its cost).

    ``test_scoring``: how the outer test patients (new patients to stage one) are scored:
    ``"final"`` by the scorer trained on all outer training patients (what ``lymph predict``
    does), ``"fold-mean"`` by the mean calibrated logit of the inner fold scorers (the way
    the training patients' scores were made, by scorers of the same size). With both, every
    model is fitted once and scored both ways; the fold-mean results are named
    ``<model>@fold-mean``, on the same folds, so the two are paired.

    ``with_stores``: stores of the same images made without labels (e.g. morphometry); in
    every outer fold their feature blocks join the fold's weak block (first, prefix
    ``weak``) as ``lymph store concat`` would, so that ``multi-score+clinical`` fuses the
    nested weak score with theirs.

    ``from_repeat``: run only repeats ``from_repeat .. repeats - 1`` (their folds and
    stage-one seeds are those of the whole run), so that a long run can be split and its
    rows merged (``benchmarks/merge_comparisons.py``).
    """
    from lymph.compare import ComparisonResult, ModelResult, _params, paired_comparisons
    from lymph.encoder.weak_folds import fold_mean_features, run_weak
    from lymph.store import bag_rows
    from lymph.head.evaluate import CVResult, FoldResult, make_folds, metrics, summarise
    from lymph.store import open_store
    from lymph.store_ops import concat_in_memory

    bad = [t for t in test_scoring if t not in TEST_SCORING]
    if bad or not test_scoring:
        raise LymphError(f"test_scoring: expected some of {', '.join(TEST_SCORING)}, got "
                         f"{', '.join(map(str, test_scoring)) or 'none'}")
    labels = np.asarray(cache.labels)
    if (labels >= 0).sum() == 0:
        raise LymphError(f"{cache.path}: no labelled patients (empty selection)")
    if not 0 <= from_repeat < repeats:
        raise LymphError(f"from_repeat: expected an integer from 0 to {repeats - 1} (repeats "
                         f"{repeats}), got {from_repeat}")
    fold_list = [f for f in make_folds(labels, folds, repeats, seed) if f[0] >= from_repeat]
    n = len(labels)
    ids = np.asarray(cache.ids, dtype=object)
    names = {(m, t): m if t == "final" else f"{m}@{t}" for m in models for t in test_scoring}
    per_model: dict[str, list[FoldResult]] = {m: [] for m in names.values()}
    oof = {m: np.full((repeats, n), np.nan) for m in per_model}
    oof_t = {m: np.full((repeats, n), np.nan) for m in per_model}
    oof_f = {m: np.full((repeats, n), -1, dtype=np.int64) for m in per_model}
    secs = {m: 0.0 for m in per_model}
    t0 = time.perf_counter()
    stage_one_s = 0.0
    with tempfile.TemporaryDirectory(prefix="lymph-nested-", dir=workdir) as td:
        for j, (r, k, tr, te) in enumerate(fold_list):
            out = Path(td) / f"outer-r{r}-k{k}.h5"
            t1 = time.perf_counter()
            weak = run_weak(masked_cache(cache, te), out, folds=inner_folds,
                            seed=seed + 1000 * r + k, config=config, model_config=model_config,
                            progress=False, target=target)
            stage_one_s += time.perf_counter() - t1
            s = open_store(out)
            seen = set((s.provenance.get("weak_folds") or {}).get("final", {}).get("train_ids", []))
            if seen & {str(i) for i in ids[te]}:  # cannot happen with masked_cache; checked
                raise LymphError("nested evaluation: an outer test patient was in stage one's "
                                 "training set")
            s = replace(s, labels=labels.astype(s.labels.dtype))  # the test labels, for scoring
            scored = {"final": s}
            if "fold-mean" in test_scoring:  # the test patients' cells by the inner fold scorers
                emb = s.embeddings.copy()
                cells = bag_rows(s.patient_ptr, te)[0]
                emb[cells] = fold_mean_features(weak.features)[cells]
                scored["fold-mean"] = replace(s, embeddings=emb)
            if with_stores:
                scored = {t: concat_in_memory([v, *with_stores]) for t, v in scored.items()}
            train = scored["final"].subset(tr)
            tests = {t: v.subset(te) for t, v in scored.items()}
            for m, spec in models.items():
                t2 = time.perf_counter()
                est = spec.make().fit(train)
                fit_s = time.perf_counter() - t2
                for t in test_scoring:
                    t3 = time.perf_counter()
                    p = np.asarray(est.predict_proba(tests[t]))[:, 1]
                    thr = float(getattr(est, "threshold_", 0.5))
                    dt = fit_s + time.perf_counter() - t3
                    name = names[(m, t)]
                    secs[name] += dt
                    per_model[name].append(FoldResult(
                        r, k, tr, te, thr, metrics(labels[te].astype(np.int64), p, thr), dt))
                    oof[name][r, te], oof_t[name][r, te], oof_f[name][r, te] = p, thr, k
            if progress is not None:
                progress("outer fold", j + 1, len(fold_list))
            for f in Path(td).iterdir():  # the outer fold's store and scorers are not kept
                f.unlink()
    results = {}
    for (m, _t), name in names.items():
        spec = models[m]
        cv = CVResult(ids=ids, labels=labels, folds=per_model[name], oof=oof[name],
                      oof_threshold=oof_t[name], oof_fold=oof_f[name], seconds=secs[name])
        results[name] = ModelResult(name, spec, cv, summarise(cv), _params(spec.make()))
    res = ComparisonResult(
        models=results, folds=fold_list, n_folds=folds, repeats=repeats, seed=seed,
        n_patients=int((labels >= 0).sum()), seconds=time.perf_counter() - t0,
        store_info={"path": None, "fingerprint": None, "method": "weak", "nested": True,
                    "inner_folds": inner_folds, "test_scoring": list(test_scoring),
                    "stage_one_seconds": round(stage_one_s, 3),
                    "with_stores": [str(w.path) for w in with_stores],
                    "from_repeat": from_repeat,
                    "scorers_trained": len(fold_list) * (inner_folds + 1)},
        ids=ids)
    res.notes.append(f"nested: stage one retrained in each of the {len(fold_list)} outer folds "
                     f"({inner_folds} inner folds + 1 scorer each, "
                     f"{len(fold_list) * (inner_folds + 1)} scorers, {stage_one_s:.0f} s)")
    res.paired = paired_comparisons(res)
    return res


def run_nested(store: str | Path, images: str | Path, *, folds: int = 5, repeats: int = 1,
               seed: int = 0, inner_folds: int = 5, models: str | list[str] | None = None,
               json_path: str | Path | None = None, test_scoring: tuple[str, ...] = ("final",),
               with_stores: list[str | Path] | tuple[str | Path, ...] = (), from_repeat: int = 0,
               progress: Callable[[str, int, int], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """``compare-baselines --nested``: retrain the weak store's stage one (its recorded model
    and training settings) inside each outer fold, on the image cache ``images`` it was
    embedded from; the comparison's models are those of ``store``. ``with_stores``
    (``--with-store``): stores of the same images made without labels, joined to every
    outer fold's weak block (:func:`nested_compare`)."""
    import dataclasses
    import json

    from lymph.atomic import write_text_atomic
    from lymph.compare import default_models, select_models
    from lymph.data.cache import open_cache
    from lymph.encoder.train import TrainConfig
    from lymph.encoder.methods.weak import WeakConfig
    from lymph.insample import is_label_trained
    from lymph.store import open_store

    s = open_store(store)
    prov = s.provenance or {}
    if not is_label_trained(prov) or prov.get("method") != "weak":
        raise LymphError(f"{store}: `nested`: provenance 'method' is {prov.get('method')!r}, "
                         "expected 'weak' (a stage one trained from labels); other stores are "
                         "already nested by the ordinary folds: drop `nested`")
    cache = open_cache(images)
    if prov.get("data_fingerprint") and cache.fingerprint != prov["data_fingerprint"]:
        raise LymphError(f"{images}: `images`: the cache's fingerprint differs from the store's "
                         "provenance 'data_fingerprint': pass the cache the store was made from")
    extra = [_unsupervised_store(p, s) for p in with_stores]
    cfg = prov.get("config") or {}
    tc = cfg.get("train_config") or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in tc.items() if k in known}) if tc else None
    mc = cfg.get("model_config")
    model_config = WeakConfig.from_dict(mc) if mc else None
    specs, notes = default_models(s, seed=seed, optional=True)
    specs = select_models(specs, models)
    res = nested_compare(cache, specs, folds=folds, repeats=repeats, seed=seed,
                         inner_folds=inner_folds, config=config, model_config=model_config,
                         test_scoring=test_scoring, with_stores=extra,
                         from_repeat=from_repeat,
                         target=(prov.get("weak_folds") or {}).get("target", "label"),
                         progress=progress)
    res.notes[:0] = notes
    res.store_info.update(path=str(store), fingerprint=s.fingerprint)
    outputs: dict[str, Any] = {}
    if json_path is not None:
        outputs["json"] = write_text_atomic(
            json_path, json.dumps(res.rows(), indent=2, default=float) + "\n")
    return res, outputs


def _unsupervised_store(path: str | Path, weak: Any) -> Any:
    """``--with-store PATH``: a store of the weak store's images, made without labels."""
    from lymph.insample import block_provenances, is_label_trained
    from lymph.store import open_store
    from lymph.store_ops import check_same_images

    other = open_store(path)
    trained = [c.get("method") for c in block_provenances(other.provenance or {}) if is_label_trained(c)]
    if trained:
        raise LymphError(f"{path}: `with-store`: provenance 'method' {trained[0]!r} is a stage "
                         "one trained from labels; only stores made without labels (e.g. "
                         "morphometry, ae, contrastive) can join the nested weak block")
    check_same_images(weak, other)
    return other
