"""Reports show every metric computed, 3-D Dice per volume, any two methods compared, and the
checkpoints (with their hashes) that made the table."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.evaluation.tables import evaluation_rows, write_eval_table, write_table_provenance
from pipeline.reports import build_report, write_report
from pipeline.reports.stats import comparison_pairs, volume_scores


def _volumes(rng: np.random.Generator, methods=("unet", "ours")) -> tuple[list[dict], dict]:
    """Rows of two 3-D cases × 6 slices per method (with surface metrics), and the masks."""
    rows, masks = [], {}
    truth = np.zeros((2, 6, 16, 16), np.uint8)
    truth[:, 1:5, 4:12, 4:12] = 1
    for k, method in enumerate(methods):
        pred = truth.copy()
        flips = rng.random(pred.shape) < 0.05 * (k + 1)
        pred[flips] = 1 - pred[flips]
        masks[method] = pred
        for case in range(2):
            rows += evaluation_rows(pred[case][:, None], truth[case][:, None], case=f"c{case}",
                                    view="axial", method=method, spacing=(1.0, 1.0))
    return rows, {"truth": truth, **masks}


def test_every_metric_and_the_3d_dice_of_each_volume_are_reported(tmp_path):
    rows, masks = _volumes(np.random.default_rng(0))
    report = build_report([rows], n_boot=200)
    scores = {(v.case, v.method): v.dice for v in volume_scores(_table(rows))}
    for method in ("unet", "ours"):
        for case in range(2):
            a, b = masks[method][case].astype(bool), masks["truth"][case].astype(bool)
            oracle = 2 * (a & b).sum() / (a.sum() + b.sum())  # the volume's own 3-D Dice
            assert scores[(f"c{case}", method)] == pytest.approx(oracle)
    summary = report.summary("axial", "ours")
    assert summary.n_volumes == 2
    assert summary.mean_volume_dice == pytest.approx(np.mean([scores[("c0", "ours")],
                                                              scores[("c1", "ours")]]))
    assert np.isfinite([summary.mean_precision, summary.mean_recall, summary.mean_hd95_mm]).all()
    paths = write_report(report, tmp_path)
    html = paths["html"].read_text()
    md = paths["md"].read_text()
    for text in (html, md):
        for header in ("Mean Dice (%)", "Precision (%)", "Recall (%)", "HD95 (mm)",
                       "3-D Dice per volume"):
            assert header in text
        assert f"{100 * summary.mean_volume_dice:.2f}" in text
        assert f"{summary.mean_hd95_mm:.2f}" in text
    assert "c1" in paths["volumes_csv"].read_text()


def _table(rows):
    from pipeline.evaluation.tables import EvalTable

    return EvalTable.from_rows(rows)


def test_any_two_methods_are_compared_and_a_baseline_against_all(tmp_path):
    rows, _ = _volumes(np.random.default_rng(1), methods=("unet", "ours", "nnunet"))
    table = _table(rows)
    assert comparison_pairs(table) == [("ours", "nnunet"), ("unet", "nnunet"), ("unet", "ours")]
    assert comparison_pairs(table, "unet") == [("nnunet", "unet"), ("ours", "unet")]
    with pytest.raises(ValueError, match="--baseline 'cnn' is not a method"):
        comparison_pairs(table, "cnn")
    report = build_report([rows], n_boot=200, baseline="unet")
    assert {(c.method_a, c.method_b) for c in report.comparisons} == {("nnunet", "unet"),
                                                                      ("ours", "unet")}
    assert "No pair" not in write_report(report, tmp_path)["md"].read_text()


def test_the_report_names_each_checkpoint_with_its_hash(tmp_path):
    rows, _ = _volumes(np.random.default_rng(2))
    table = write_eval_table(rows, tmp_path / "eval.csv")
    ckpt = tmp_path / "ours.pt"
    ckpt.write_bytes(b"weights")
    write_table_provenance(table, {"ours": ckpt, "unet": ckpt})
    assert main(["report", str(table), "--out", str(tmp_path / "report"), "--baseline",
                 "unet"]) == 0
    record = json.loads((tmp_path / "report" / "report.json").read_text())
    digest = hashlib.sha256(b"weights").hexdigest()
    assert record["provenance"]["checkpoints"]["ours"] == {"path": str(ckpt), "sha256": digest}
    assert digest in (tmp_path / "report" / "report.html").read_text()
    assert record["volumes"] and record["volumes"][0]["n_slices"] == 6
