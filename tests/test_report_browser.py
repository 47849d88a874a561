"""The HTML report renders in a real browser (Debian's headless Chromium): tables, figures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.reports import ReportFigure, build_report, plot_qualitative, write_report

pytestmark = pytest.mark.browser
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Chromium is not installed: run `make test-browser` (installs Debian's "
                    "chromium package) or `apt-get install chromium`")
    return exe


def _rows(rng):
    rows = []
    for view in ("axial", "coronal", "sagittal"):
        for s in range(12):
            empty = s < 2
            for method, shift in (("cnn", 0.0), ("piecewise", 0.02), ("joint", 0.04)):
                j = float("nan") if empty else float(np.clip(rng.normal(0.7 + shift, 0.1), 0, 1))
                rows.append({"case": "phantom", "view": view, "slice": s, "method": method,
                             "jaccard": j, "dice": j if empty else 2 * j / (1 + j),
                             "truth_empty": int(empty), "pred_empty": int(empty)})
    return rows


def test_html_report_renders_tables_and_figures_in_chromium(tmp_path, rng):
    image = rng.random((48, 48))
    truth = np.zeros((48, 48), np.uint8)
    truth[12:36, 10:30] = 1
    figure = ReportFigure("Qualitative", plot_qualitative(image, truth, {"joint": truth}))
    report = build_report([_rows(rng)], figures=[figure], title="browser check")
    html = write_report(report, tmp_path / "report", formats=("html",))["html"]
    browser = _chromium()
    url = Path(html).resolve().as_uri()
    dom = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") >= 2
    for word in ("axial", "coronal", "sagittal", "cnn", "piecewise", "joint"):
        assert word in dom.stdout
    assert "data:image/png;base64," in dom.stdout
    shot = tmp_path / "shot.png"
    run = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                          f"--screenshot={shot}", "--window-size=1280,4000", url],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    ink = np.any(pixels < 200, axis=-1)
    assert ink.mean() > 0.005  # text and tables were drawn
    # the embedded figure decoded: the qualitative outline colours appear on the page
    colourful = (np.abs(pixels[..., 0] - pixels[..., 1]) > 60) | (
        np.abs(pixels[..., 1] - pixels[..., 2]) > 60)
    assert colourful.sum() > 50
