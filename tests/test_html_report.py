"""report.html in a real headless browser (Debian's ``chromium``; skipped without it): the
page renders to a non-blank screenshot with no console error, offline, and its patient table
has one row per store patient."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lymph.cli import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]


def chromium(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="lymph-chromium-") as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=90, check=False)


def console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln
            and re.search(r"Uncaught|Error|Failed to load", ln)]


@pytest.fixture(scope="module")
def report(synth_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from lymph.data.cache import open_cache
    from lymph.encoder.methods.morphometry import write_morphometry_store
    from lymph.store import open_store

    d = tmp_path_factory.mktemp("html")
    store = write_morphometry_store(open_cache(synth_cache), d / "m.h5", workers=1)
    r = CliRunner().invoke(app, ["compare-baselines", "--store", str(store), "--folds", "3",
                                 "--models", "logistic,late-fusion", "--out", str(d / "r"),
                                 "--images", str(synth_cache)])
    assert r.exit_code == 0, r.output
    return d / "r" / "report.html", open_store(store).n_patients


def test_console_error_detection_works(tmp_path: Path) -> None:
    """The check below can fail: a page with a script error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefined_function_xyz();</script></body></html>")
    out = chromium(bad.as_uri(), "--dump-dom")
    assert console_errors(out.stderr)


def test_html_renders_offline_without_errors(report: tuple[Path, int], tmp_path: Path) -> None:
    from PIL import Image

    html, _ = report
    text = html.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network
    shot = tmp_path / "shot.png"
    out = chromium(html.as_uri(), f"--screenshot={shot}", "--window-size=1200,1600")
    assert shot.is_file(), out.stderr[-2000:]
    assert not console_errors(out.stderr), console_errors(out.stderr)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.std() > 10  # not blank
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, tables, figures


def test_patient_table_has_every_store_patient(report: tuple[Path, int]) -> None:
    html, n_patients = report
    out = chromium(html.as_uri(), "--dump-dom")
    dom = out.stdout
    table = dom[dom.index('id="patients"'):]
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    assert body.count("<tr") == n_patients
    assert not console_errors(out.stderr), console_errors(out.stderr)
    # every patient has a gallery section, and its image file exists
    for src in re.findall(r'src="(assets/cells/[^"]+)"', dom):
        assert (html.parent / src).is_file()
    assert dom.count('<section id="p-') == n_patients
