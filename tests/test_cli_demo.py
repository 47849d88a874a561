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


def test_demo_learns_weights_and_improves_jaccard(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([_mmcrf(), "demo", "--size", "48", "--n-train", "4", "--n-test", "4",
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


def test_demo_reports_bad_settings_clearly():
    proc = subprocess.run([_mmcrf(), "demo", "--size", "4"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "mmcrf demo: error: noisy_blocks needs a shape of at least 8×8" in proc.stderr
