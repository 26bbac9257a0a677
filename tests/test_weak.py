"""Weak supervision, stage one (issue 9): `lymph embed --method weak --folds K` trains K fold
scorers and a final scorer and writes a fold-safe store; leaks are caught; late fusion and
`predict --data` work on it. Tiny: the 32 px synthetic cache, 1 epoch, K = 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lymph.errors import LymphError

K = 2


def _tiny_config(seed: int = 0):  # noqa: ANN202
    from lymph.encoder.train import TrainConfig

    return TrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=seed, weight_decay=1e-4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # noqa: ANN201
    """One torch thread (via OMP_NUM_THREADS, which lymph's device setup honours): these
    tiny models gain nothing from two, and lose a lot on a CPU shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weak_store(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lymph.data.cache import open_cache
    from lymph.encoder.weak_folds import run_weak

    out = tmp_path_factory.mktemp("weak") / "weak.h5"
    run_weak(open_cache(synth_cache), out, folds=K, seed=0, config=_tiny_config(), progress=False)
    return out


def _rewrite(src: Path, dst: Path, **changes: object) -> Path:
    """A copy of the store ``src`` with some fields replaced (a deliberately corrupted store)."""
    from lymph.store import open_store, write_store

    s = open_store(src)
    fields = dict(embeddings=s.embeddings, patient_ptr=s.patient_ptr, ids=s.ids, labels=s.labels,
                  clinical=s.clinical, clinical_columns=s.clinical_columns,
                  feature_columns=s.feature_columns, image_paths=s.image_paths,
                  patient_scorer=s.patient_scorer, provenance=s.provenance)
    fields.update(changes)
    return write_store(dst, **fields)


def test_store_is_valid_with_logit_column(weak_store: Path) -> None:
    from lymph.atomic import sha256_file
    from lymph.encoder.embed import checkpoint_path
    from lymph.encoder.weak_folds import fold_checkpoint_path
    from lymph.store import open_store

    s = open_store(weak_store)
    assert s.feature_columns == ["logit", "prob"] and s.dim == 2
    np.testing.assert_allclose(s.embeddings[:, 1], 1 / (1 + np.exp(-s.embeddings[:, 0])), atol=1e-6)
    lab = s.labels >= 0
    assert (s.patient_scorer[~lab] == -1).all()
    assert set(s.patient_scorer[lab].tolist()) == set(range(K))
    prov = s.provenance
    assert prov["method"] == "weak"
    final = checkpoint_path(weak_store)
    assert prov["encoder_checkpoint"] == str(final.resolve())
    assert prov["encoder_sha256"] == sha256_file(final)
    wf = prov["weak_folds"]
    assert wf["k"] == K and len(wf["test_ids"]) == K
    for k, c in enumerate(wf["checkpoints"]):
        assert c["path"] == str(fold_checkpoint_path(weak_store, k).resolve())
        assert c["sha256"] == sha256_file(c["path"])


def test_every_labelled_patient_scored_by_a_scorer_that_did_not_train_on_it(weak_store: Path) -> None:
    """Independent of check_fold_safety: each scorer checkpoint's own list of training
    patients never holds a labelled patient whose rows it produced."""
    from lymph.encoder.checkpoint import load_checkpoint
    from lymph.encoder.weak_checks import check_fold_safety
    from lymph.store import open_store

    s = open_store(weak_store)
    check_fold_safety(s)
    paths = {c["fold"]: c["path"] for c in s.provenance["weak_folds"]["checkpoints"]}
    paths[-1] = s.provenance["encoder_checkpoint"]
    trained = {k: set(load_checkpoint(p)["weak"]["train_ids"]) for k, p in paths.items()}
    labelled = {str(i) for i, y in zip(s.ids, s.labels) if y >= 0}
    assert trained[-1] == labelled
    for k in range(K):
        assert trained[k] == labelled - set(s.provenance["weak_folds"]["test_ids"][k])
    for pid, y, k in zip(s.ids, s.labels, s.patient_scorer):
        if y >= 0:
            assert str(pid) not in trained[int(k)], (pid, k)
    # each scorer's logit calibration was fitted on its own training cells only
    sizes = dict(zip((str(i) for i in s.ids), s.bag_sizes.tolist()))
    for k, p in paths.items():
        cal = load_checkpoint(p)["calibration"]
        assert cal["n_cells"] == sum(sizes[i] for i in trained[k])


def test_rows_come_from_the_recorded_scorer(weak_store: Path, synth_cache: Path) -> None:
    from lymph.data.cache import open_cache
    from lymph.encoder import distributed as D
    from lymph.encoder.embed import compute_features, load_encoder
    from lymph.encoder.preprocess import Preprocess
    from lymph.store import open_store

    s = open_store(weak_store)
    cache = open_cache(synth_cache)
    env = D.setup("cpu")
    paths = {c["fold"]: c["path"] for c in s.provenance["weak_folds"]["checkpoints"]}
    paths[-1] = s.provenance["encoder_checkpoint"]
    for k, p in paths.items():
        ck, method, model = load_encoder(p, env.device)
        prep = Preprocess(ck["normalisation"]["mean"], ck["normalisation"]["std"], env.device,
                          channels_last=True)
        f = compute_features(model, method, cache, prep, env, progress=False)
        for i in np.flatnonzero(s.patient_scorer == k):
            a, b = s.patient_ptr[i], s.patient_ptr[i + 1]
            np.testing.assert_array_equal(s.embeddings[a:b], f[a:b])


def test_planted_leaks_are_caught(weak_store: Path, tmp_path: Path) -> None:
    from lymph.encoder.checkpoint import load_checkpoint, save_checkpoint
    from lymph.atomic import sha256_file
    from lymph.encoder.weak_checks import check_fold_safety
    from lymph.store import open_store

    s = open_store(weak_store)
    lab = np.flatnonzero(s.labels >= 0)
    # 1. a labelled patient scored by the final scorer (trained on everyone)
    sc = s.patient_scorer.copy()
    sc[lab[0]] = -1
    with pytest.raises(LymphError, match="final scorer, which trained on it"):
        check_fold_safety(open_store(_rewrite(weak_store, tmp_path / "a.h5", patient_scorer=sc)))
    # 2. a labelled patient scored by another fold's scorer (which trained on it)
    sc = s.patient_scorer.copy()
    sc[lab[0]] = (sc[lab[0]] + 1) % K
    with pytest.raises(LymphError, match=f"patient {s.ids[lab[0]]} was scored by fold scorer"):
        check_fold_safety(open_store(_rewrite(weak_store, tmp_path / "b.h5", patient_scorer=sc)))
    # 3. a scorer that trained on its own test patient (the checkpoint says so), even though
    #    the store's fold assignment looks clean
    prov = json.loads(json.dumps(s.provenance))
    c0 = prov["weak_folds"]["checkpoints"][0]
    ck = load_checkpoint(c0["path"])
    victim = prov["weak_folds"]["test_ids"][0][0]
    ck["weak"] = dict(ck["weak"], train_ids=ck["weak"]["train_ids"] + [victim])
    leaky = save_checkpoint(tmp_path / "leaky.pt", {k: v for k, v in ck.items()
                                                   if k not in ("format", "version")})
    c0.update(path=str(leaky), sha256=sha256_file(leaky))
    bad = open_store(_rewrite(weak_store, tmp_path / "c.h5", provenance=prov))
    check_fold_safety(bad, checkpoints=False)  # the store alone cannot tell
    with pytest.raises(LymphError, match=f"patient {victim} was scored by fold scorer 0"):
        check_fold_safety(bad)
    # 4. a checkpoint replaced after the store was written
    shutil.copy(weak_store.with_name("weak.weak-fold1.pt"), tmp_path / "swap.pt")
    prov2 = json.loads(json.dumps(s.provenance))
    prov2["weak_folds"]["checkpoints"][0]["path"] = str(tmp_path / "swap.pt")
    with pytest.raises(LymphError, match="sha256 mismatch"):
        check_fold_safety(open_store(_rewrite(weak_store, tmp_path / "d.h5", provenance=prov2)))
    # 5. no fold record at all
    with pytest.raises(LymphError, match="weak_folds"):
        check_fold_safety(open_store(_rewrite(weak_store, tmp_path / "e.h5", provenance={"method": "weak"})))


def test_folds_from_store(weak_store: Path, bag_store: Path) -> None:
    from lymph.head.evaluate import folds_from_store, make_folds
    from lymph.store import open_store

    s = open_store(weak_store)
    folds = folds_from_store(s)
    lab = s.labelled()
    assert len(folds) == K
    assert sorted(np.concatenate([te for *_, te in folds]).tolist()) == lab.tolist()
    for r, k, tr, te in folds:
        assert r == 0 and np.intersect1d(tr, te).size == 0
        assert sorted(np.concatenate([tr, te]).tolist()) == lab.tolist()
        assert (s.patient_scorer[te] == k).all()  # stage two's test fold k = scorer k's patients
    # stage one used make_folds(labels, K, 1, seed): the same split
    for (_, _, _tr, te), (_, _, _tr2, te2) in zip(folds, make_folds(s.labels, K, 1, 0)):
        assert np.array_equal(np.sort(te), np.sort(te2))
    with pytest.raises(LymphError, match="records no stage-one folds"):
        folds_from_store(open_store(bag_store))


def test_late_fusion_and_compare_on_weak_store(weak_store: Path) -> None:
    from lymph.baselines import LateFusion
    from lymph.compare import run_compare
    from lymph.store import open_store

    s = open_store(weak_store)
    lab = s.labelled()
    est = LateFusion(inner_folds=2).fit(s.subset(lab))
    assert est.logit_column_ == "logit" and est.projection_ is None
    p = est.predict_proba(s)[:, 1]
    assert p.shape == (s.n_patients,) and np.isfinite(p).all()
    res, _ = run_compare(s, models="logistic,late-fusion", folds_from_store=True)
    assert res.n_folds == K and res.repeats == 1
    assert [f[3].tolist() for f in res.folds] == [np.sort(te).tolist() for *_, te in res.folds]
    assert any("--folds-from-store" in n for n in res.notes)


def test_predict_on_data_equals_predict_on_store(weak_store: Path, synth_data: Path,
                                                 tmp_path: Path) -> None:
    """The model directory keeps the final scorer; `predict --data` embeds new patients
    with it, as the store's unlabelled patients were."""
    import csv

    from lymph.head.fit import fit_head
    from lymph.head.predict import predict

    model = tmp_path / "model"
    fit_head(weak_store, fusion="late", folds=2, out=model)
    a = predict(model, tmp_path / "a.csv", store=weak_store, select="unlabelled")
    b = predict(model, tmp_path / "b.csv", data=synth_data, select="unlabelled", device="cpu")
    assert list(a.ids) == list(b.ids) and len(a.ids) == 3
    np.testing.assert_array_equal(a.probability, b.probability)
    from lymph.store import open_store

    new = open_store(b.store_path)
    assert new.feature_columns == ["logit", "prob"]
    assert (new.patient_scorer == -1).all()  # every patient scored by the final scorer
    rows = list(csv.reader(open(tmp_path / "b.csv")))
    assert rows[0] == ["id", "probability", "predicted"]


def test_deterministic_and_resume(synth_cache: Path, weak_store: Path, tmp_path: Path) -> None:
    """Same seed, same store bytes (CPU); a rerun with --resume reuses the scorers."""
    from lymph.data.cache import open_cache
    from lymph.encoder.weak_folds import run_weak
    from lymph.store import open_store

    out = tmp_path / "again.h5"
    run_weak(open_cache(synth_cache), out, folds=K, seed=0, config=_tiny_config(), progress=False)
    a, b = open_store(weak_store), open_store(out)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert a.provenance["weak_folds"]["test_ids"] == b.provenance["weak_folds"]["test_ids"]
    w = run_weak(open_cache(synth_cache), out, folds=K, seed=0, config=_tiny_config(),
                 progress=False, resume=True)
    assert w.train_seconds == 0.0  # every scorer already had its epoch
    np.testing.assert_array_equal(open_store(out).embeddings, a.embeddings)


def test_embed_options(synth_cache: Path, tmp_path: Path) -> None:
    from lymph.encoder.registry import method_spec
    from lymph.encoder.run import run_embed

    m = method_spec("weak")
    assert (m.default_size, m.default_crop) == (64, 112)
    with pytest.raises(LymphError, match="folds: only for methods trained from labels"):
        run_embed(out=tmp_path / "x.h5", images=synth_cache, method="ae", folds=3)
    with pytest.raises(LymphError, match="50-fold stratified CV needs at least 50"):
        run_embed(out=tmp_path / "x.h5", images=synth_cache, method="weak", folds=50,
                  epochs=1, progress=False)


def test_cosine_schedule_decays_to_zero_and_is_checked() -> None:
    from lymph.encoder.train import TrainConfig

    c = TrainConfig(epochs=4, lr=1e-3, lr_schedule="cosine")
    c.check()
    assert c.lr_at(0, 0, 10) == pytest.approx(1e-3)
    assert c.lr_at(2, 0, 10) == pytest.approx(5e-4)
    assert c.lr_at(3, 9, 10) < 1e-5
    lrs = [c.lr_at(e, s, 10) for e in range(4) for s in range(10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing
    assert TrainConfig(lr=2e-3).lr_at(3, 9, 10) == 2e-3  # constant: the default
    with pytest.raises(LymphError, match="lr_schedule: expected constant or cosine"):
        TrainConfig(lr_schedule="step").check()


def test_cosine_training_ends_near_zero_rate(synth_cache: Path, tmp_path: Path) -> None:
    from lymph.data.cache import open_cache
    from lymph.encoder.checkpoint import load_checkpoint
    from lymph.encoder.train import TrainConfig
    from lymph.encoder.weak_folds import image_targets
    from lymph.encoder.train import train

    c = open_cache(synth_cache)
    labelled = np.flatnonzero(c.labels >= 0)
    rows, targets = image_targets(c.patient_ptr, c.labels, labelled)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-3, seed=0, lr_schedule="cosine")
    train(c, tmp_path / "s.pt", method="weak", config=cfg, rows=rows, targets=targets,
          progress=False)
    ck = load_checkpoint(tmp_path / "s.pt")
    last = ck["optimizer"]["param_groups"][0]["lr"]
    assert 0 < last < 0.05 * cfg.lr  # the last step's rate, near the end of the cosine
    assert ck["train_config"]["lr_schedule"] == "cosine"


def test_dihedral_averaging_is_invariant_to_rotations_and_flips() -> None:
    import torch

    from lymph.encoder.methods.weak import METHOD, CellScorer, WeakConfig, dihedral_mean

    torch.manual_seed(0)
    model = CellScorer(WeakConfig(size=32, tta=True)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        a = dihedral_mean(model, x)
        for y in (torch.rot90(x, 1, dims=(2, 3)), torch.flip(x, dims=(3,)),
                  torch.flip(torch.rot90(x, 3, dims=(2, 3)), dims=(2,))):
            torch.testing.assert_close(dihedral_mean(model, y), a, rtol=1e-4, atol=1e-5)
        plain = model(x)
        assert not torch.allclose(plain, a)  # one view is not the mean of eight
        f = METHOD.features(model, x)
        torch.testing.assert_close(f[:, 0], a)  # calibration is the identity until fitted
        model.config.tta = False
        torch.testing.assert_close(METHOD.features(model, x)[:, 0], plain)


def test_embed_tta_and_cosine_reach_the_checkpoints(synth_cache: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lymph.cli import app
    from lymph.encoder.checkpoint import load_checkpoint
    from lymph.store import open_store

    out = tmp_path / "w.h5"
    r = CliRunner().invoke(app, ["embed", "--method", "weak", "--images", str(synth_cache),
                                 "--out", str(out), "--folds", "2", "--epochs", "1",
                                 "--tta", "--lr-schedule", "cosine"])
    assert r.exit_code == 0, r.output
    for ck in (load_checkpoint(out.with_name("w.encoder.pt")),
               load_checkpoint(out.with_name("w.weak-fold1.pt"))):
        assert ck["model_config"]["tta"] is True
        assert ck["train_config"]["lr_schedule"] == "cosine"
    assert open_store(out).provenance["config"]["model_config"]["tta"] is True
    for args, msg in ((["--method", "ae", "--tta"], "--tta: only for training method weak"),
                      (["--method", "weak", "--lr-schedule", "linear"], "--lr-schedule: expected")):
        r = CliRunner().invoke(app, ["embed", "--images", str(synth_cache),
                                     "--out", str(tmp_path / "x.h5"), *args])
        assert r.exit_code == 1 and msg in r.output, r.output
    assert not (tmp_path / "x.h5").exists()


def test_embed_channels_reach_the_scorer_and_are_checked(synth_cache: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lymph.cli import app
    from lymph.encoder.checkpoint import load_checkpoint
    from lymph.store import open_store

    out = tmp_path / "w.h5"
    r = CliRunner().invoke(app, ["embed", "--method", "weak", "--images", str(synth_cache),
                                 "--out", str(out), "--folds", "2", "--epochs", "1",
                                 "--channels", "8,16,24"])
    assert r.exit_code == 0, r.output
    ck = load_checkpoint(out.with_name("w.weak-fold0.pt"))
    assert ck["model_config"]["channels"] == [8, 16, 24]
    assert ck["model"]["head.2.weight"].shape == (1, 24)  # the last width feeds the linear unit
    assert open_store(out).provenance["config"]["model_config"]["channels"] == [8, 16, 24]
    for args, msg in ((["--method", "weak", "--channels", "8,x"], "--channels: expected 1 to 6"),
                      (["--method", "weak", "--channels", "8,0"], "got 8,0"),
                      (["--method", "weak", "--channels", "1,2,3,4,5,6,7"], "1 to 6"),
                      (["--method", "ae", "--channels", "8,16"], "--channels: only for training "
                                                                  "method weak")):
        r = CliRunner().invoke(app, ["embed", "--images", str(synth_cache),
                                     "--out", str(tmp_path / "x.h5"), *args])
        assert r.exit_code == 1 and msg in r.output, r.output
        assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "x.h5").exists()


def test_patient_weights_keep_each_class_at_half_the_weight() -> None:
    from lymph.encoder.weak_folds import image_targets

    ptr = np.array([0, 2, 5, 6, 10])  # 4 patients: 2, 3, 1 and 4 images
    labels = np.array([1, 0, 1, 0])
    pats = np.arange(4)
    rows, plain = image_targets(ptr, labels, pats)
    _, same = image_targets(ptr, labels, pats, np.ones(4))
    np.testing.assert_allclose(same, plain, rtol=1e-6)  # equal weights: the plain targets
    _, t = image_targets(ptr, labels, pats, np.array([1.0, 0.5, 3.0, 0.5]))
    w, y = t[rows, 1], t[rows, 0]
    np.testing.assert_allclose([w[y == 1].sum(), w[y == 0].sum()], [5.0, 5.0], rtol=1e-6)
    # within a class, a patient's images weigh in proportion to its weight
    assert w[5] / w[0] == pytest.approx(3.0, rel=1e-6) and w[2] == pytest.approx(w[6], rel=1e-6)


def test_residual_weights_follow_the_clinical_model_s_mistakes_and_only_its_patients() -> None:
    from lymph.encoder.weak_folds import RESIDUAL_FLOOR, residual_weights

    rng = np.random.default_rng(0)
    n = 40
    labels = np.repeat([0, 1], n // 2)
    clin = np.c_[labels * 3.0 + rng.normal(0, 0.3, n), rng.normal(size=n)]
    clin[[0, 1], 0] = 3.0  # two reactive patients that look malignant to the clinical data
    pats = np.arange(n - 4)  # the last four are someone else's test patients
    w = residual_weights(clin, labels, pats, seed=0)
    assert w.shape == (n - 4,) and (w >= RESIDUAL_FLOOR).all() and (w <= 1).all()
    assert w[0] > 0.5 and w[1] > 0.5 and w[2:].max() < 0.3 and w.min() == RESIDUAL_FLOOR
    other = clin.copy()
    other[-4:] = 1e3  # the held-out patients' clinical data cannot matter
    np.testing.assert_array_equal(residual_weights(other, labels, pats, seed=0), w)
    bad = clin.copy()
    bad[3, 1] = np.nan
    with pytest.raises(Exception, match="finite clinical"):
        residual_weights(bad, labels, pats)


def test_clinical_residual_target_is_recorded_and_checked(synth_cache: Path, tmp_path: Path) -> None:
    from lymph.data.cache import open_cache
    from lymph.encoder.checkpoint import load_checkpoint
    from lymph.encoder.train import TrainConfig
    from lymph.encoder.weak_folds import run_weak
    from lymph.store import open_store

    cache = open_cache(synth_cache)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, seed=0, weight_decay=1e-4)
    out = tmp_path / "r.h5"
    run_weak(cache, out, folds=2, seed=0, config=cfg, progress=False, target="clinical-residual")
    assert open_store(out).provenance["weak_folds"]["target"] == "clinical-residual"
    assert load_checkpoint(tmp_path / "r.weak-fold0.pt")["weak"]["target"] == "clinical-residual"
    with pytest.raises(Exception, match="target: expected one of label, clinical-residual"):
        run_weak(cache, tmp_path / "x.h5", folds=2, config=cfg, progress=False, target="residual")
    assert not (tmp_path / "x.h5").exists()
