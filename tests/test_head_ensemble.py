"""The inner-CV ensemble (lymph.head.ensemble) and the guarded threshold rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_bags
from lymph.head.ensemble import MILEnsemble, _key, member_weights
from lymph.head.estimator import MILClassifier
from lymph.head.model import HeadConfig, MILHead
from lymph.head.train import choose_threshold_guarded
from lymph.store import EmbeddingStore

torch.set_num_threads(1)


def store_of(**kw) -> EmbeddingStore:
    d = make_bags(**kw)
    return EmbeddingStore(path=None, embeddings=d["embeddings"], patient_ptr=d["patient_ptr"],
                          ids=np.array(d["ids"], dtype=object), labels=d["labels"],
                          clinical=d["clinical"], clinical_columns=d["clinical_columns"])


@pytest.mark.parametrize("pooling", ["attention", "gated", "mean", "max", "dsmil"])
@pytest.mark.parametrize("n_clinical", [0, 3])
def test_stacked_members_equal_separate_heads(pooling: str, n_clinical: int) -> None:
    torch.manual_seed(0)
    cfg = HeadConfig(dim=6, n_clinical=n_clinical, pooling=pooling, mlp=(8, 4), members=3)
    ens = MILEnsemble(cfg).eval()
    x = torch.randn(5, 7, 6)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[0, 2:] = False
    mask[3, 1:] = False
    x = x * mask[..., None]
    clin = torch.randn(5, n_clinical)
    z, a = ens.members(x, mask, clin)
    for k in range(3):
        head = MILHead(replace(cfg, members=1)).eval()
        head.load_state_dict({n: ens.stacked[_key(n)][k] for n in ens.names})
        zk, ak = head(x, mask, clin)
        torch.testing.assert_close(z[k], zk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[k], ak, atol=1e-6, rtol=1e-5)
    # the ensemble's logit is that of the mean member probability; weights sum to 1
    zz, aa = ens(x, mask, clin)
    torch.testing.assert_close(torch.sigmoid(zz), torch.sigmoid(z).mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(aa.sum(1), torch.ones(5), atol=1e-5, rtol=1e-5)
    assert float(aa[0, 2:].detach().abs().sum()) == 0.0


def test_member_weights_hold_out_their_fold() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    fold = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    tr, va = member_weights(fold, y, 2)
    assert (tr[0][fold == 0] == 0).all() and (va[0][fold != 0] == 0).all()
    for w, sel in ((tr[1], fold != 1), (va[1], fold == 1)):  # each class half of the weight
        assert np.isclose(w[sel & (y == 1)].sum(), w[sel & (y == 0)].sum())


@pytest.mark.parametrize("images", [True, False])
def test_validation_scores_each_patient_by_its_own_member_only(images: bool, monkeypatch) -> None:
    """fold_logits (each member on its fold, padded once) = the diagonal of all members on
    all patients; chunks cover every patient once, split when over the element budget."""
    import lymph.head.ensemble as ens_mod
    from lymph.head.bags import make_buckets
    from lymph.head.ensemble import (
        _drop_members,
        chunk_logits,
        fold_chunks,
        fold_logits,
        member_logits,
    )
    from lymph.head.train import make_groups

    d = make_bags(n_patients=40, dim=6, sizes=(1, 60))
    n, rng = 40, np.random.default_rng(1)
    fold_of = rng.permutation(np.arange(n) % 4)
    buckets = make_buckets(d["embeddings"], d["patient_ptr"], np.arange(n), None) if images else None
    groups = make_groups(buckets, d["clinical"])
    torch.manual_seed(0)
    model = MILEnsemble(HeadConfig(dim=6 if images else 0, n_clinical=3, mlp=(8, 4), members=4))
    want = member_logits(model, groups, n)[fold_of, np.arange(n)]
    torch.testing.assert_close(fold_logits(model, groups, fold_of), want, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(ens_mod, "_EVAL_ELEMENTS", 60 * 128 * 3)  # at most 3 bags a chunk
    chunks = fold_chunks(groups, fold_of, 4)
    pos = np.concatenate([c.pos.numpy() for c in chunks])
    assert sorted(pos) == list(range(n))
    assert all((fold_of[c.pos.numpy()] == c.member).all() for c in chunks)
    if images:
        assert max(c.pos.numel() for c in chunks) <= 3 and len(chunks) > 4
        for c in chunks:  # trimmed to the chunk's longest bag, every real instance kept
            assert c.mask.sum().item() == sum(d["patient_ptr"][i + 1] - d["patient_ptr"][i]
                                              for i in c.pos.tolist())
            assert c.mask[:, -1].any()
    torch.testing.assert_close(chunk_logits(model, chunks, n), want, atol=1e-6, rtol=1e-6)
    # members 0 and 2 stalled: they leave the model and the optimiser state
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    model.members(chunks[0].x, chunks[0].mask, chunks[0].clin)[0].sum().backward()
    opt.step()
    exp_avg = {n_: opt.state[p]["exp_avg"].clone() for n_, p in model.stacked.items()}
    before = {n_: p.detach().clone() for n_, p in model.stacked.items()}
    held = _drop_members(model, opt, np.arange(4), np.array([False, True, False, True]))
    assert held.tolist() == [1, 3] and model._k() == 2
    assert opt.param_groups[0]["params"] == list(model.stacked.values())
    for n_, p in model.stacked.items():
        torch.testing.assert_close(p.detach(), before[n_][[1, 3]], atol=0, rtol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], exp_avg[n_][[1, 3]], atol=0, rtol=0)
    some = chunk_logits(model, chunks, n, held)  # members 1 and 3, at stacked places 0 and 1
    assert (some[(fold_of == 0) | (fold_of == 2)] == 0).all()
    ref = MILEnsemble(model.cfg)
    with torch.no_grad():
        for n_, p in ref.stacked.items():
            p.copy_(before[n_])
    want = member_logits(ref, groups, n)[fold_of, np.arange(n)]
    for j in (1, 3):
        torch.testing.assert_close(some[fold_of == j], want[fold_of == j], atol=1e-6, rtol=1e-6)
    assert model.active is None


def test_guarded_threshold_needs_evidence() -> None:
    rng = np.random.default_rng(0)
    # few patients, a small gain: stays at 0.5
    y = np.array([0] * 10 + [1] * 10)
    p = np.r_[rng.uniform(0.0, 0.45, 9), [0.55], rng.uniform(0.45, 1.0, 10)]
    assert choose_threshold_guarded(y, p) == 0.5
    # many patients, scores all shifted up by 0.3: the tuned cut is taken
    y = np.r_[np.zeros(2000), np.ones(2000)].astype(int)
    p = np.clip(np.r_[rng.uniform(0.3, 0.75, 2000), rng.uniform(0.85, 1.0, 2000)], 0, 1)
    t = choose_threshold_guarded(y, p)
    assert 0.75 <= t <= 0.85
    assert choose_threshold_guarded(np.ones(4), np.full(4, 0.2)) == 0.5


def test_auto_members_depend_on_bag_count_and_are_reproducible() -> None:
    st = store_of(n_patients=30, signal=3.0)
    m = MILClassifier(max_epochs=6).fit(st)
    assert m.config_.members == 5 and len(m.member_best_epochs_) == 5
    assert m.inner_val_ids_ == []
    p = m.predict_proba(st)
    np.testing.assert_array_equal(p, MILClassifier(max_epochs=6).fit(st).predict_proba(st))
    assert np.isfinite(p).all() and len(m.attention(st)) == st.n_patients
    one = MILClassifier(max_epochs=6, members=1).fit(st)
    assert one.config_.members == 1 and len(one.inner_val_ids_) > 0
    # the ensemble is at least as good as chance on a planted signal
    assert (m.predict(st) == st.labels).mean() > 0.8


def test_bad_member_settings() -> None:
    from lymph.errors import LymphError

    st = store_of(n_patients=20)
    for bad in ({"members": 0}, {"members": "many"}, {"inner_folds": 1}, {"members": True}):
        with pytest.raises(LymphError, match="members|inner_folds"):
            MILClassifier(**bad).fit(st)


def test_dsmil_pooling_padding_invariant_and_in_the_ensemble() -> None:
    from lymph.head.pooling import DSMILPool

    torch.manual_seed(0)
    pool = DSMILPool(6, 8)
    x = torch.randn(1, 5, 6)
    alone, a1 = pool(x, torch.ones(1, 5, dtype=torch.bool))
    padded = torch.cat([x, torch.full((1, 3, 6), 50.0)], dim=1)  # wild padding values
    mask = torch.tensor([[True] * 5 + [False] * 3])
    out, a2 = pool(padded, mask)
    torch.testing.assert_close(out, alone)
    assert out.shape == (1, 7) and float(a2[0, 5:].detach().abs().sum()) == 0.0
    torch.testing.assert_close(a2[:, :5], a1)
    # its score is the max instance score
    torch.testing.assert_close(out[0, 6], pool.c(x).max().detach(), atol=1e-6, rtol=1e-6)
    test_stacked_members_equal_separate_heads("dsmil", 3)
    st = store_of(n_patients=30, signal=3.0)
    m = MILClassifier(pooling="dsmil", max_epochs=8).fit(st)
    assert np.isfinite(m.predict_proba(st)).all() and m.config_.members == 5


def test_parallel_folds_give_identical_results() -> None:
    from lymph.compare import compare, default_models
    from lymph.head.evaluate import cross_validate, make_folds

    st = store_of(n_patients=30, signal=3.0)
    fl = make_folds(st.labels, 3, 1, 0)
    a = cross_validate(lambda: MILClassifier(max_epochs=4), st, fl)
    b = cross_validate(lambda: MILClassifier(max_epochs=4), st, fl, n_jobs=2)
    np.testing.assert_array_equal(a.oof, b.oof)
    assert [f.metrics for f in a.folds] == [f.metrics for f in b.folds]
    specs, _ = default_models(st)
    few = {n: specs[n] for n in ("logistic", "attention-images-only")}
    r1 = compare(st, few, folds=3, seed=0)
    r2 = compare(st, few, folds=3, seed=0, n_jobs=2)
    for n in few:
        np.testing.assert_array_equal(r1.models[n].cv.oof, r2.models[n].cv.oof)
    att1, att2 = r1.models["attention-images-only"].attention, r2.models["attention-images-only"].attention
    assert set(att1) == set(att2) == set(map(str, st.ids))
    for k in att1:
        np.testing.assert_array_equal(att1[k], att2[k])


def test_many_models_in_one_pool_give_each_models_own_results() -> None:
    """cross_validate_many (every (model, fold) one task, most costly first, any n_jobs)
    = cross_validate of each model alone."""
    from lymph.baselines import LogisticClinical
    from lymph.head.evaluate import cross_validate, cross_validate_many, make_folds

    st = store_of(n_patients=30, signal=3.0)
    fl = make_folds(st.labels, 3, 1, 0)
    makers = {"mil": lambda: MILClassifier(max_epochs=3, members=1),
              "logistic": lambda: LogisticClinical(seed=0)}
    alone = {n: cross_validate(m, st, fl) for n, m in makers.items()}
    seen: list[tuple[str, int, int]] = []
    for jobs in (1, 2):
        seen.clear()
        many = cross_validate_many(makers, st, fl, n_jobs=jobs, cost={"logistic": 5.0},
                                   progress=lambda n, d, t: seen.append((n, d, t)))
        assert list(many) == ["mil", "logistic"]
        for n in makers:
            np.testing.assert_array_equal(many[n].oof, alone[n].oof)
            assert [f.metrics for f in many[n].folds] == [f.metrics for f in alone[n].folds]
            assert [(f.repeat, f.fold) for f in many[n].folds] == [(0, 0), (0, 1), (0, 2)]
            assert many[n].seconds == pytest.approx(sum(f.seconds for f in many[n].folds))
            assert sorted(d for m, d, t in seen if m == n) == [1, 2, 3]
        if jobs == 1:  # one process: model after model, in the given order
            assert [m for m, _, _ in seen] == ["mil"] * 3 + ["logistic"] * 3
    from lymph.errors import LymphError

    with pytest.raises(LymphError, match="n_jobs"):
        cross_validate_many(makers, st, fl, n_jobs=0)


def test_scaled_patience() -> None:
    from lymph.head.estimator import scaled_patience

    assert scaled_patience(15, 80) == 15 and scaled_patience(15, 1000) == 15
    assert scaled_patience(15, 2000) == 8 and scaled_patience(15, 8000) == 3
    assert scaled_patience(15, 10**6) == 3 and scaled_patience(2, 10**6) == 2
