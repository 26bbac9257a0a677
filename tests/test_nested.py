"""Issue 18: nested evaluation of the weak stage one (`compare-baselines --nested`): stage
one is retrained inside each outer fold on that fold's training patients only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lymph.cli import app


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


def _tiny_config():
    from lymph.encoder.train import TrainConfig

    return TrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=0, weight_decay=1e-4)


def test_masked_cache_hides_only_the_given_patients(synth_cache: Path) -> None:
    from lymph.data.cache import open_cache
    from lymph.nested import masked_cache

    c = open_cache(synth_cache)
    lab = np.flatnonzero(c.labels >= 0)
    v = masked_cache(c, lab[:3])
    assert (v.labels[lab[:3]] == -1).all()
    np.testing.assert_array_equal(v.labels[lab[3:]], c.labels[lab[3:]])
    assert (c.labels[lab[:3]] >= 0).all()  # the original is untouched
    assert v.pixels is c.pixels


def test_stage_one_never_sees_an_outer_test_label(synth_cache: Path, monkeypatch) -> None:
    from lymph.compare import CLINICAL, default_models, select_models
    from lymph.data.cache import open_cache
    from lymph.encoder import weak_folds as weak
    from lymph.head.evaluate import make_folds
    from lymph.nested import nested_compare
    from lymph.store import open_store

    cache = open_cache(synth_cache)
    seen: list[np.ndarray] = []
    real = weak.run_weak

    def spy(c, out, **kw):
        seen.append(np.asarray(c.labels).copy())
        return real(c, out, **kw)

    monkeypatch.setattr(weak, "run_weak", spy)
    store0 = open_store(_plain_store(cache, synth_cache.parent))
    specs = select_models(default_models(store0, optional=True)[0], "logistic,late-fusion")
    res = nested_compare(cache, specs, folds=2, repeats=1, seed=0, inner_folds=2,
                         config=_tiny_config())
    folds = make_folds(cache.labels, 2, 1, 0)
    assert len(seen) == len(folds) == 2
    for labels, (_, _, tr, te) in zip(seen, folds):
        assert (labels[te] == -1).all()  # the outer test patients are unlabelled for stage one
        np.testing.assert_array_equal(labels[tr], cache.labels[tr])
    assert set(res.models) == {"logistic", "late-fusion"}
    for m in res.models.values():
        assert [(f.repeat, f.fold) for f in m.cv.folds] == [(0, 0), (0, 1)]
        assert all(np.isfinite(f.metrics["balanced_accuracy"]) for f in m.cv.folds)
    assert res.store_info["nested"] and res.store_info["scorers_trained"] == 6
    assert res.models["logistic"].spec.inputs == CLINICAL
    assert res.paired and res.paired[0]["model"] == "late-fusion"


def _plain_store(cache, where: Path) -> Path:
    from lymph.store import write_store

    clin, cols = cache.clinical()
    return write_store(where / "plain.h5", embeddings=np.zeros((int(cache.patient_ptr[-1]), 2), "f4"),
                       patient_ptr=cache.patient_ptr, ids=cache.ids, labels=cache.labels,
                       clinical=clin.astype("f4"), clinical_columns=cols,
                       feature_columns=["logit", "prob"])


def test_cli_nested_needs_images_and_a_weak_store(tmp_path: Path, bag_store: Path) -> None:
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(bag_store), "--nested"])
    assert r.exit_code == 1 and "--images" in r.output
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(bag_store), "--nested",
                                 "--images", str(bag_store), "--json", str(tmp_path / "x.json")])
    assert r.exit_code == 1 and "expected 'weak'" in r.output, r.output
    assert not (tmp_path / "x.json").exists()


def test_cli_nested_end_to_end(synth_cache: Path, tmp_path: Path) -> None:
    import json

    from lymph.data.cache import open_cache
    from lymph.encoder.weak_folds import run_weak

    store = tmp_path / "weak.h5"
    run_weak(open_cache(synth_cache), store, folds=2, seed=0, config=_tiny_config(), progress=False)
    js = tmp_path / "nested.json"
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(store), "--nested",
                                 "--images", str(synth_cache), "--folds", "2", "--inner-folds", "2",
                                 "--models", "logistic,late-fusion", "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "nested: stage one retrained" in r.output
    rows = json.loads(js.read_text())
    assert {x["model"] for x in rows} == {"logistic", "late-fusion"}
    assert all(x["store"]["nested"] and x["store"]["scorers_trained"] == 6 for x in rows)
    # the outer folds' stores and scorers are not left behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".h5", ".pt")) == [
        "weak.encoder.pt", "weak.h5", "weak.weak-fold0.pt", "weak.weak-fold1.pt"]


def test_fold_mean_features_average_the_fold_scorers_only() -> None:
    from lymph.encoder.weak_folds import fold_mean_features

    f = {0: np.array([[1.0, 0.7], [-2.0, 0.1]], "f4"), 1: np.array([[3.0, 0.9], [0.0, 0.5]], "f4"),
         -1: np.array([[100.0, 1.0], [100.0, 1.0]], "f4")}  # the final scorer is left out
    out = fold_mean_features(f)
    np.testing.assert_allclose(out[:, 0], [2.0, -1.0])
    np.testing.assert_allclose(out[:, 1], 1 / (1 + np.exp(-np.array([2.0, -1.0]))), rtol=1e-6)
    with pytest.raises(Exception, match="no fold scorer"):
        fold_mean_features({-1: f[-1]})


def test_nested_scores_test_patients_both_ways_on_the_same_fits(synth_cache: Path) -> None:
    from lymph.compare import default_models, select_models
    from lymph.data.cache import open_cache
    from lymph.nested import nested_compare

    cache = open_cache(synth_cache)
    store0 = _open_plain(cache, synth_cache.parent)
    specs = select_models(default_models(store0, optional=True)[0], "logistic,late-fusion")
    kw = dict(folds=2, repeats=1, seed=0, inner_folds=2, config=_tiny_config())
    both = nested_compare(cache, specs, test_scoring=("final", "fold-mean"), **kw)
    only = nested_compare(cache, specs, **kw)
    assert set(both.models) == {"logistic", "late-fusion", "logistic@fold-mean",
                                "late-fusion@fold-mean"}
    assert both.store_info["test_scoring"] == ["final", "fold-mean"]
    # "final" is exactly the default run; the clinical-only model cannot see the difference
    np.testing.assert_allclose(both.models["late-fusion"].cv.oof, only.models["late-fusion"].cv.oof)
    np.testing.assert_allclose(both.models["logistic@fold-mean"].cv.oof,
                               both.models["logistic"].cv.oof)
    # the image model's test probabilities change with the scorer (same fitted fusion)
    a, b = both.models["late-fusion"].cv.oof, both.models["late-fusion@fold-mean"].cv.oof
    assert np.isfinite(b[np.isfinite(a)]).all() and not np.allclose(a, b, equal_nan=True)


def _open_plain(cache, where: Path):
    from lymph.store import open_store

    return open_store(_plain_store(cache, where))


def test_cli_test_scoring_is_checked_before_any_work(bag_store: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(bag_store), "--nested",
                                 "--images", str(bag_store), "--test-scoring", "final,median"])
    assert r.exit_code == 1 and "--test-scoring" in r.output and "fold-mean" in r.output, r.output
    from lymph.nested import parse_test_scoring

    assert parse_test_scoring(" fold-mean , final") == ("fold-mean", "final")
    for bad in ("", "final,final", "median"):
        with pytest.raises(Exception, match="test_scoring"):
            parse_test_scoring(bad)


class _Recorder:
    """An estimator that records the stores it is fitted on and scores every patient 0.5."""

    seen: list[list[str]] = []

    def get_params(self, deep: bool = True) -> dict:
        return {}

    def fit(self, store):
        self.seen.append(list(store.feature_columns or []))
        self.embeddings_ = store.embeddings
        return self

    def predict_proba(self, store):
        return np.full((store.n_patients, 2), 0.5)


def _morph_like(cache, where: Path, name: str = "morph.h5", dim: int = 3) -> Path:
    """A store of the cache's images made without labels (random features, method 'ae')."""
    from lymph.store import write_store

    clin, cols = cache.clinical()
    rng = np.random.default_rng(0)
    return write_store(where / name, embeddings=rng.normal(size=(int(cache.patient_ptr[-1]), dim)).astype("f4"),
                       patient_ptr=cache.patient_ptr, ids=cache.ids, labels=cache.labels,
                       clinical=clin.astype("f4"), clinical_columns=cols,
                       provenance={"method": "ae"})


def test_with_stores_join_every_outer_fold_after_the_weak_block(synth_cache: Path,
                                                                 tmp_path: Path) -> None:
    from lymph.compare import IMAGES_CLINICAL, ModelSpec
    from lymph.data.cache import open_cache
    from lymph.nested import nested_compare
    from lymph.store import open_store

    cache = open_cache(synth_cache)
    morph = open_store(_morph_like(cache, tmp_path))
    _Recorder.seen = []
    specs = {"rec": ModelSpec(make=_Recorder, inputs=IMAGES_CLINICAL)}
    res = nested_compare(cache, specs, folds=2, repeats=1, seed=0, inner_folds=2,
                         config=_tiny_config(), with_stores=[morph],
                         test_scoring=("final", "fold-mean"))
    assert _Recorder.seen == [["weak:logit", "weak:prob", "ae:0", "ae:1", "ae:2"]] * 2
    assert res.store_info["with_stores"] == [str(morph.path)]
    assert set(res.models) == {"rec", "rec@fold-mean"}


def test_nested_multi_score_uses_the_joined_store(synth_cache: Path, tmp_path: Path) -> None:
    from lymph.compare import default_models, select_models
    from lymph.data.cache import open_cache
    from lymph.nested import nested_compare
    from lymph.store import open_store

    cache = open_cache(synth_cache)
    morph = open_store(_morph_like(cache, tmp_path))
    specs = select_models(default_models(_open_plain(cache, tmp_path), optional=True)[0],
                          "logistic,multi-score+clinical")
    kw = dict(folds=2, repeats=1, seed=0, inner_folds=2, config=_tiny_config())
    alone = nested_compare(cache, specs, **kw)
    joined = nested_compare(cache, specs, with_stores=[morph], **kw)
    # the clinical-only model cannot see the extra block; the multi-score model does
    np.testing.assert_allclose(joined.models["logistic"].cv.oof, alone.models["logistic"].cv.oof)
    a, b = alone.models["multi-score+clinical"].cv.oof, joined.models["multi-score+clinical"].cv.oof
    assert np.isfinite(b[np.isfinite(a)]).all() and not np.allclose(a, b, equal_nan=True)


def test_cli_with_store_is_checked_before_any_work(synth_cache: Path, tmp_path: Path,
                                                   bag_store: Path) -> None:
    from lymph.data.cache import open_cache
    from lymph.encoder.weak_folds import run_weak

    cache = open_cache(synth_cache)
    weak = tmp_path / "weak.h5"
    run_weak(cache, weak, folds=2, seed=0, config=_tiny_config(), progress=False)
    base = ["compare-baselines", "--store", str(weak), "--images", str(synth_cache),
            "--folds", "2", "--inner-folds", "2", "--json", str(tmp_path / "x.json")]
    r = CliRunner().invoke(app, [*base[:3], "--with-store", str(weak)])
    assert r.exit_code == 1 and "--with-store: only with --nested" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--nested", "--with-store", str(weak)])
    assert r.exit_code == 1 and "trained from labels" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--nested", "--with-store", str(bag_store)])
    assert r.exit_code == 1 and "/patients/id differs" in r.output, r.output
    r = CliRunner().invoke(app, [*base, "--nested", "--with-store", str(tmp_path / "none.h5")])
    assert r.exit_code == 1 and "none.h5" in r.output, r.output
    assert not (tmp_path / "x.json").exists()
    r = CliRunner().invoke(app, [*base, "--nested", "--with-store", str(_morph_like(cache, tmp_path)),
                                 "--models", "logistic,multi-score+clinical"])
    assert r.exit_code == 0, r.output
    import json

    rows = json.loads((tmp_path / "x.json").read_text())
    assert {x["model"] for x in rows} == {"logistic", "multi-score+clinical"}
    assert all(x["store"]["with_stores"] == [str(tmp_path / "morph.h5")] for x in rows)


def test_from_repeat_runs_the_later_repeats_exactly_as_the_whole_run(synth_cache: Path) -> None:
    from lymph.compare import default_models, select_models
    from lymph.data.cache import open_cache
    from lymph.nested import nested_compare

    cache = open_cache(synth_cache)
    specs = select_models(default_models(_open_plain(cache, synth_cache.parent), optional=True)[0],
                          "logistic,late-fusion")
    kw = dict(folds=2, repeats=2, seed=0, inner_folds=2, config=_tiny_config())
    whole = nested_compare(cache, specs, **kw)
    part = nested_compare(cache, specs, from_repeat=1, **kw)
    assert part.store_info["scorers_trained"] == 6 and part.store_info["from_repeat"] == 1
    for m in specs:
        later = [f for f in whole.models[m].cv.folds if f.repeat == 1]
        assert [(f.repeat, f.fold) for f in part.models[m].cv.folds] == [(1, 0), (1, 1)]
        for a, b in zip(later, part.models[m].cv.folds):
            np.testing.assert_array_equal(a.test_rows, b.test_rows)
            assert a.metrics == b.metrics  # same folds, same stage-one seeds: same numbers
    with pytest.raises(Exception, match="from_repeat: expected an integer from 0 to 1"):
        nested_compare(cache, specs, from_repeat=2, **kw)


def test_cli_from_repeat_is_checked(bag_store: Path) -> None:
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(bag_store), "--from-repeat", "1",
                                 "--repeats", "2"])
    assert r.exit_code == 1 and "--from-repeat: only with --nested" in r.output, r.output
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(bag_store), "--nested",
                                 "--images", str(bag_store), "--from-repeat", "2", "--repeats", "2"])
    assert r.exit_code == 1 and "--from-repeat: expected an integer from 0 to 1" in r.output, r.output


def test_nested_retrains_with_the_store_s_target(synth_cache: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    from lymph import nested
    from lymph.data.cache import open_cache
    from lymph.encoder.weak_folds import run_weak

    store = tmp_path / "r.h5"
    run_weak(open_cache(synth_cache), store, folds=2, seed=0, config=_tiny_config(),
             progress=False, target="clinical-residual")
    seen = {}

    class Stop(Exception):
        pass

    def spy(cache, specs, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(nested, "nested_compare", spy)
    with pytest.raises(Stop):
        nested.run_nested(store, synth_cache, folds=2, inner_folds=2, models="logistic")
    assert seen["target"] == "clinical-residual"
