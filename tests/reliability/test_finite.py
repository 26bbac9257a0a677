"""Nothing non-finite becomes a prediction (issue 15, class 2).

NaN or infinity in a store (embeddings or clinical values) is refused by the writer and
by every reader; a model giving a probability outside [0, 1] (or NaN) writes no label;
a diverged encoder training is an error naming the epoch and the loss, leaving no store,
no checkpoint and no cached stage; non-finite head weights are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from reliability_helpers import HEAD, SIZE, cli, train_tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return train_tiny(tmp_path_factory.mktemp("finite"))


def forge(src: Path, dst: Path, dataset: str, value: float) -> Path:
    """A copy of a store with one value replaced, its (optional) digests dropped: what a
    foreign writer or a bad import could produce."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        d = f[dataset]
        x = d[()]
        x[1, 0] = value
        d[...] = x
        if "sha256" in d.attrs:
            del d.attrs["sha256"]
        if "content-sha256" in f.attrs:
            del f.attrs["content-sha256"]
    return dst


READERS = {
    "fit-head": lambda b, s, w: ["fit-head", "--store", s, "--json", w / "m.json", *HEAD],
    "compare-baselines": lambda b, s, w: ["compare-baselines", "--store", s, "--json",
                                          w / "c.json", "--folds", 2, "--models", "adaboost"],
    "predict": lambda b, s, w: ["predict", "--model", b["model"], "--store", s,
                                "--out", w / "p.csv"],
    "explain": lambda b, s, w: ["explain", "P9", "--model", b["model"], "--store", s,
                                "--out", w / "e.png"],
    "store-info": lambda b, s, w: ["store", "info", s],
    "store-concat": lambda b, s, w: ["store", "concat", s, b["store"], "--out", w / "s.h5"],
}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dataset", ["embeddings", "patients/clinical"])
@pytest.mark.parametrize("command", sorted(READERS))
def test_non_finite_store_refused_by_every_reader(base: dict[str, Path], tmp_path: Path,
                                                  command: str, dataset: str,
                                                  value: float) -> None:
    bad = forge(base["store"], tmp_path / "bad.h5", dataset, value)
    work = tmp_path / "w"
    work.mkdir()
    r = cli(*READERS[command](base, bad, work))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and f"/{dataset}: expected finite numbers" in lines[0], r.output
    assert list(work.iterdir()) == []


def test_writer_refuses_non_finite(tmp_path: Path) -> None:
    from lymph.errors import LymphError
    from lymph.store import write_store

    emb = np.ones((4, 2), np.float32)
    emb[2, 1] = np.nan
    with pytest.raises(LymphError, match=r"/embeddings: expected finite numbers.*patient\(s\) B"):
        write_store(tmp_path / "s.h5", embeddings=emb, patient_ptr=[0, 2, 4], ids=["A", "B"],
                    labels=[0, 1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [np.nan, np.inf, 1.5, -0.2], ids=["nan", "inf", "1.5", "-0.2"])
def test_predict_writes_no_label_for_a_non_probability(base: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       value: float) -> None:
    from lymph.head.estimator import MILClassifier

    real = MILClassifier.predict_proba

    def broken(self: MILClassifier, store: object) -> np.ndarray:
        p = real(self, store)
        p[3] = [1 - value, value]
        return p

    monkeypatch.setattr(MILClassifier, "predict_proba", broken)
    r = cli("predict", "--model", base["model"], "--store", base["store"], "--out",
            tmp_path / "p.csv", "--submission", tmp_path / "sub.csv")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "no prediction written" in r.output and "not a finite number in [0, 1]" in r.output
    assert list(tmp_path.iterdir()) == []


def test_diverged_embed_is_an_error_and_leaves_nothing(base: dict[str, Path],
                                                       tmp_path: Path) -> None:
    args = ["--epochs", "2", "--dim", "4", "--batch-size", "8", "--device", "cpu"]
    r = cli("embed", "--data", base["data"], "--out", tmp_path / "s.h5", "--size", SIZE,
            "--lr", "1e12", *args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "error: training diverged at epoch 1: loss nan" in r.output
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["s.images-16px.zarr"], left  # the image cache is valid; nothing else


def test_diverged_stage_is_not_cached(base: dict[str, Path], tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text('[ingest]\nsize = 16\n[embed]\nepochs = 2\ndim = 4\nbatch_size = 8\n'
                 'lr = 1e12\ndevice = "cpu"\n[compare]\nenabled = false\n')
    r = cli("run", p, "--data", base["data"], "--artifacts", tmp_path / "a")
    assert r.exit_code == 1 and "training diverged at epoch" in r.output, r.output
    embed = tmp_path / "a" / "embed"
    assert not [d for d in embed.iterdir() if d.is_dir()], list(embed.iterdir())


def test_non_finite_head_weights_refused(base: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from lymph.atomic import sha256_file

    m = tmp_path / "model"
    shutil.copytree(base["model"], m)
    state = torch.load(m / "head.pt", weights_only=True)
    k = next(iter(state))
    state[k].view(-1)[0] = float("nan")
    torch.save(state, m / "head.pt")
    meta = json.loads((m / "model.json").read_text())
    meta["weights"]["sha256"] = sha256_file(m / "head.pt")
    (m / "model.json").write_text(json.dumps(meta))
    r = cli("predict", "--model", m, "--store", base["store"], "--out", tmp_path / "p.csv")
    assert r.exit_code == 1 and f"tensor {k} holds NaN or infinite values" in r.output, r.output
    assert not (tmp_path / "p.csv").exists()


def test_check_epoch_names_epoch_and_loss(tmp_path: Path) -> None:
    import torch

    from lymph.finite import Diverged, check_epoch

    net = torch.nn.Linear(2, 2)
    ck = tmp_path / "x.pt"
    ck.write_bytes(b"from an earlier epoch of this run")
    check_epoch(0.5, 1, net, ck)  # finite: nothing happens
    assert ck.exists()
    with pytest.raises(Diverged, match=r"diverged at epoch 3: loss inf"):
        check_epoch(float("inf"), 3, net, ck)
    assert not ck.exists()
    ck.write_bytes(b"the checkpoint a resumed run started from")
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(Diverged, match=r"epoch 4: loss 0.1, non-finite weights in weight"):
        check_epoch(0.1, 4, net, ck, fresh=False)
    assert ck.exists()


def test_diverged_head_is_an_error_and_saves_nothing(base: dict[str, Path],
                                                     tmp_path: Path) -> None:
    r = cli("fit-head", "--store", base["store"], "--lr", "1e30", "--out", tmp_path / "m",
            "--json", tmp_path / "m.json", *HEAD)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "error: training diverged at epoch" in r.output and "loss nan" in r.output
    assert list(tmp_path.iterdir()) == []


def test_store_declaring_huge_embeddings_is_refused_before_reading(tmp_path: Path) -> None:
    from lymph.errors import LymphError
    from lymph.store import open_store

    p = tmp_path / "bomb.h5"
    with h5py.File(p, "w") as f:  # a few KB on disk, 32 GiB declared
        f.create_dataset("embeddings", shape=(2**31, 4), dtype="f4", chunks=(1024, 4),
                         compression="gzip")
        f.attrs["encoding-type"] = "lymph-embeddings"
        f.attrs["encoding-version"] = "1"
    assert p.stat().st_size < 1e6
    with pytest.raises(LymphError, match="more than lymph loads"):
        open_store(p)


def test_non_finite_encoder_refused_at_fit_time(base: dict[str, Path], tmp_path: Path) -> None:
    """A model never gets an encoder copy holding NaN (its store would be refused anyway)."""
    import torch

    from lymph.atomic import sha256_file
    from lymph.store import open_store, write_store

    enc = tmp_path / "enc.pt"
    ck = torch.load(base["encoder"], weights_only=True)
    k = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][k] = ck["model"][k].clone().contiguous()
    ck["model"][k].view(-1)[0] = float("inf")
    torch.save(ck, enc)
    s = open_store(base["store"])
    prov = dict(s.provenance, encoder_checkpoint=str(enc), encoder_sha256=sha256_file(enc))
    store = write_store(tmp_path / "s.h5", embeddings=s.embeddings, patient_ptr=s.patient_ptr,
                        ids=s.ids, labels=s.labels, clinical=s.clinical,
                        clinical_columns=s.clinical_columns, provenance=prov)
    r = cli("fit-head", "--store", store, "--out", tmp_path / "m", *HEAD)
    assert r.exit_code == 1 and f"tensor model.{k} holds NaN or infinite" in r.output, r.output
    assert not (tmp_path / "m").exists()
