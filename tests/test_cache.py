"""`lymph ingest`: the Zarr image cache round trip, no-op reruns, bad images, interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lymph.cli import app
from lymph.data.cache import ingest, open_cache
from lymph.data.challenge import read_challenge
from lymph.errors import LymphError


def copy_data(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_round_trip_equals_direct_decode(synth_data: Path, synth_cache: Path) -> None:
    c = open_cache(synth_cache)
    d = read_challenge(synth_data)
    assert c.n_images == d.n_images and c.ids == d.ids
    assert np.array_equal(c.patient_ptr, d.patient_ptr())
    pixels = c.read_all()
    assert pixels.shape == (d.n_images, 3, 32, 32) and pixels.dtype == np.uint8
    for k in (0, 7, d.n_images - 1):
        with Image.open(d.image_paths()[k]) as im:
            direct = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
        assert np.array_equal(pixels[k], direct.transpose(2, 0, 1))
    assert c.paths == [str(p) for p in d.image_paths()]
    assert np.all((c.channel_mean > 0.3) & (c.channel_mean < 1)) and np.all(c.channel_std > 0)


def test_parallel_equals_single_process(synth_data: Path, synth_cache: Path, tmp_path: Path) -> None:
    out = ingest(synth_data, tmp_path / "p.zarr", size=32, workers=2)
    assert not out.cached
    assert np.array_equal(open_cache(out.path).read_all(), open_cache(synth_cache).read_all())


def test_rerun_is_noop_until_input_or_setting_changes(synth_data: Path, tmp_path: Path) -> None:
    data = copy_data(synth_data, tmp_path / "d")
    out = tmp_path / "c.zarr"
    assert not ingest(data, out, size=24, workers=1).cached
    assert ingest(data, out, size=24, workers=1).cached
    assert not ingest(data, out, size=24, workers=1, force=True).cached
    assert not ingest(data, out, size=16, workers=1).cached  # setting changed
    assert ingest(data, out, size=16, workers=1).cached
    img = next((data / "trainset").glob("P*/000000.jpg"))
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not ingest(data, out, size=16, workers=1).cached  # input changed


def test_bad_images_skipped_with_warning_or_strict_error(synth_data: Path, tmp_path: Path, caplog) -> None:
    data = copy_data(synth_data, tmp_path / "d")
    pdir = sorted((data / "trainset").glob("P*"))[0]
    good = sorted(pdir.glob("*.jpg"))
    (pdir / "900000.jpg").write_bytes(good[0].read_bytes()[:200])  # truncated
    (pdir / "900001.jpg").write_bytes(b"")  # zero bytes
    (pdir / "900002.jpg").write_text("not an image")
    Image.new("L", (40, 40), 128).save(pdir / "900003.jpg")  # grayscale, other size
    Image.new("RGBA", (48, 48), (10, 20, 30, 255)).save(pdir / "900004.png")
    n_before = read_challenge(data).n_images
    res = ingest(data, tmp_path / "c.zarr", size=32, workers=1)
    assert len(res.skipped) == 3 and res.n_images == n_before - 3
    assert "900000.jpg" in caplog.text and "900002.jpg" in caplog.text
    c = open_cache(res.path)
    assert c.n_images == n_before - 3 and not any("90000" + k in p for p in c.paths for k in "012")
    gray = c.read(c.paths.index(str(pdir / "900003.jpg")), c.paths.index(str(pdir / "900003.jpg")) + 1)[0]
    assert gray.shape == (3, 32, 32) and (gray == 128).all()
    with pytest.raises(LymphError, match="unreadable.*`strict`"):
        ingest(data, tmp_path / "s.zarr", size=32, workers=1, strict=True)
    assert not (tmp_path / "s.zarr").exists()


def test_patient_with_only_unreadable_images(synth_data: Path, tmp_path: Path) -> None:
    data = copy_data(synth_data, tmp_path / "d")
    pdir = sorted((data / "trainset").glob("P*"))[0]
    for p in pdir.glob("*.jpg"):
        p.write_bytes(b"")
    with pytest.raises(LymphError, match=f"{pdir.name} has no readable image"):
        ingest(data, tmp_path / "c.zarr", size=32, workers=1)
    assert not (tmp_path / "c.zarr").exists()


def test_open_rejects_non_cache(tmp_path: Path) -> None:
    with pytest.raises(LymphError, match="not found"):
        open_cache(tmp_path / "nope.zarr")
    import zarr

    zarr.open_group(tmp_path / "g.zarr", mode="w").attrs["encoding-type"] = "other"
    with pytest.raises(LymphError, match="encoding-type"):
        open_cache(tmp_path / "g.zarr")


def test_interrupted_ingest_leaves_nothing_valid(tmp_path: Path) -> None:
    """kill -9 an ingest mid-way: no cache at the target, nothing that opens as valid."""
    from lymph.data.synth import SynthConfig, make_synthetic

    data = make_synthetic(tmp_path / "d", SynthConfig(patients=30, test_patients=0, images_min=60,
                                                      images_max=60, size=96, seed=0))
    out = tmp_path / "c.zarr"
    code = ("import time, lymph.data.cache as c\n"
            "orig = c._decode_chunk\n"
            "def slow(a):\n    r = orig(a); print('chunk', flush=True); time.sleep(0.2); return r\n"
            "c._decode_chunk = slow\n"
            f"c.ingest({str(data)!r}, {str(out)!r}, size=96, workers=1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "chunk"  # decoding has started, cache half-written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".c.zarr.tmp")]
    assert leftovers, "the test should have interrupted a half-written cache"
    for p in leftovers:
        with pytest.raises(LymphError):
            open_cache(p)
    assert not ingest(data, out, size=96, workers=1).cached  # a rerun completes
    assert open_cache(out).n_images == 1800


def test_cli_noop_message(synth_data: Path, tmp_path: Path) -> None:
    r = CliRunner()
    args = ["ingest", str(synth_data), "--out", str(tmp_path / "c.zarr"), "--size", "16", "--workers", "1"]
    first = r.invoke(app, args)
    assert first.exit_code == 0 and "cached" in first.output
    second = r.invoke(app, args)
    assert second.exit_code == 0 and "up to date" in second.output


def test_real_data_ingest(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    out = tmp_path_factory.mktemp("real") / "real.zarr"
    res = ingest(real_data, out, size=32)
    assert res.n_images == 10850 and res.n_patients == 135
    assert ingest(real_data, out, size=32).cached
