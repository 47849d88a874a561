"""The `mmcrf demo` console script: the embedded default job, end to end."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections import Counter
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


@pytest.mark.slow
def test_demo_runs_the_three_methods_on_three_views_and_echo(tmp_path):
    out = tmp_path / "demo_output"
    proc = subprocess.run([_mmcrf(), "demo", "--output", str(out), "--size", "32",
                           "--cnn-epochs", "2", "--joint-epochs", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    views = ("axial", "coronal", "sagittal", "echo")
    for view in views:
        for method in ("cnn", "piecewise", "joint"):  # one model per view, as in the paper
            assert (out / "runs" / view / method / "best.pt").is_file()
        assert f"  {view:9s} " in proc.stdout
    assert (out / "demo_data" / "echo" / "split.json").is_file()
    with (out / "evaluation.csv").open() as f:
        rows = list(csv.DictReader(f))
    per_view = Counter((r["view"], r["method"]) for r in rows)
    assert {v for v, _ in per_view} == set(views)
    for view in views:  # every method scored on the same images of each view
        counts = {per_view[(view, m)] for m in ("cnn", "piecewise", "joint")}
        assert len(counts) == 1 and counts.pop() > 0
    assert per_view[("axial", "joint")] == 40  # the validation phantom's 40 axial slices
    assert per_view[("echo", "joint")] == 2 * 12  # 2 validation cine loops of 12 frames
    report = json.loads((out / "report" / "report.json").read_text())
    assert {(s["view"], s["method"]) for s in report["summaries"]} >= set(per_view)
    html = (out / "report" / "report.html").read_text()
    assert "data:image/png;base64," in html and "sagittal" in html and "echo" in html
    log = (out / "runs" / "echo" / "cnn" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header + 2 epochs
    # a second run into the same folder starts fresh logs instead of appending
    proc = subprocess.run([_mmcrf(), "demo", "--output", str(out), "--size", "32",
                           "--cnn-epochs", "2", "--joint-epochs", "1", "--sets", "echo"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((out / "runs" / "echo" / "cnn" / "log.csv").read_text().splitlines()) == 3


def test_cli_lists_match_the_library():
    from pipeline import cli
    from pipeline.data.phantoms import GENERATED_KINDS
    from pipeline.data.samples import DATA_KINDS
    from pipeline.demo import DEMO_SETS

    assert cli._DATA_KINDS == DATA_KINDS and cli._DEMO_SETS == DEMO_SETS
    assert set(cli._DEMO_FOLDERS) == set(GENERATED_KINDS)
