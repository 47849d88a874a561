"""The `mmcrf demo` console script: the embedded default job, end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _mmcrf() -> str:
    exe = shutil.which("mmcrf", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("the mmcrf console script is not installed next to this Python; "
                    "install the project (make install)")
    return exe


def test_crf_demo_learns_weights_and_improves_jaccard(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([_mmcrf(), "crf-demo", "--size", "48", "--n-train", "4", "--n-test", "4",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "learned CRF weights: w1 (unary)" in proc.stdout
    result = json.loads((out / "crf_demo.json").read_text())
    assert result["converged"]
    assert set(result["weights"]) == {"w1", "w2", "w3"}
    assert result["weights"]["w2"] + result["weights"]["w3"] > 0
    assert result["jaccard_crf"] > result["jaccard_threshold"] + 0.1
    assert f"CRF (graph cut) = {result['jaccard_crf']:.4f}" in proc.stdout
    assert not list(out.glob("*.tmp"))


def test_crf_demo_reports_bad_settings_clearly():
    proc = subprocess.run([_mmcrf(), "crf-demo", "--size", "4"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "mmcrf crf-demo: error: noisy_blocks needs a shape of at least 8×8" in proc.stderr


def test_demo_runs_the_three_methods_end_to_end(tmp_path):
    out = tmp_path / "demo_output"
    proc = subprocess.run([_mmcrf(), "demo", "--output", str(out), "--size", "32",
                           "--cnn-epochs", "2", "--joint-epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("cnn", "piecewise", "joint"):
        assert (out / "runs" / method / "best.pt").is_file()
        assert f"  {method:10s}" in proc.stdout
    table = (out / "evaluation.csv").read_text().splitlines()
    assert table[0].startswith("case,view,slice,method,jaccard,dice,truth_empty,pred_empty")
    assert len(table) == 1 + 3 * 40  # 40 validation slices x 3 methods
    summary = json.loads((out / "report" / "report.json").read_text())
    text = json.dumps(summary)
    assert all(m in text for m in ("cnn", "piecewise", "joint")) and "axial" in text
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html
    log = (out / "runs" / "cnn" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header + 2 epochs
    # a second run into the same folder starts fresh logs instead of appending
    proc = subprocess.run([_mmcrf(), "demo", "--output", str(out), "--size", "32",
                           "--cnn-epochs", "2", "--joint-epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0
    assert len((out / "runs" / "cnn" / "log.csv").read_text().splitlines()) == 3
