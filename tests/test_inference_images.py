"""Scoring models on a folder of images laid out like the Weizmann set (no split file)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.folders import evaluate_image_folder
from pipeline.models import model_files
from tests._tiny_models import tiny_horse_bundle
from tests.test_data_horse import MASK_H, MASK_W, _make_horse


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A folder with models/cnn.pt and models/joint.pt trained on a tiny horse-like set."""
    return tiny_horse_bundle(tmp_path_factory)


def test_model_files_reads_a_bundle_or_a_checkpoint(bundle, tmp_path):
    runs = model_files(bundle)
    assert list(runs) == ["cnn", "joint"]
    assert model_files(bundle / "models" / "joint.pt") == {"joint": bundle / "models" /
                                                           "joint.pt"}
    with pytest.raises(FileNotFoundError, match=r"no cnn\.pt"):
        model_files(tmp_path)


def test_a_bundle_lists_its_learned_pairwise_model_after_joint_but_infers_with_joint(
        bundle, tmp_path):
    """joint_lp.pt (joint + learned pairwise term, off by default) is a method of its own,
    listed after joint, and never the bundle's default model."""
    import shutil

    from pipeline.models import inference_models

    models = tmp_path / "lp_bundle" / "models"
    models.mkdir(parents=True)
    for name in ("joint_lp", "cnn", "joint", "notes"):  # written out of order on purpose
        shutil.copy(bundle / "models" / "joint.pt", models / f"{name}.pt")
    assert list(model_files(models.parent)) == ["cnn", "joint", "joint_lp"]
    assert model_files(models / "joint_lp.pt") == {"joint_lp": models / "joint_lp.pt"}
    assert inference_models(models.parent) == (models / "joint.pt", None)


def test_evaluate_scores_any_horse_like_folder(bundle, tmp_path):
    images = tmp_path / "unseen"
    for seed, name in enumerate(["a1", "b2", "c3"], start=40):  # names never seen, no split
        _make_horse(images, name, seed, broken=name == "c3")
    out = tmp_path / "out"
    exe = Path(sys.executable).parent / "mmcrf"
    proc = subprocess.run([str(exe), "evaluate", "--model", str(bundle), "--images",
                           str(images), "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert {"image", "method", "jaccard"} <= set(rows[0])
    assert sorted((r["image"], r["method"]) for r in rows) == [
        (n, m) for n in ("a1", "b2", "c3") for m in ("cnn", "joint")]
    for row in rows:
        mask = np.asarray(Image.open(out / row["method"] / f"{row['image']}.png"))
        assert mask.shape == (MASK_H, MASK_W) and set(np.unique(mask)) <= {0, 255}
        truth = np.asarray(Image.open(images / "figure_ground" / f"{row['image']}.jpg")
                           .convert("L")) >= 128
        pred = mask > 0
        jaccard = (pred & truth).sum() / (pred | truth).sum()
        assert float(row["jaccard"]) == pytest.approx(jaccard)
    broken = [r for r in rows if r["image"] == "c3"]
    assert all("scored on the gray image" in r["error"] for r in broken)
    assert "mean Jaccard" in proc.stdout


def test_evaluate_one_split_of_a_folder_and_report_it(bundle, tmp_path):

    from pipeline.evaluation.tables import read_eval_table
    from pipeline.reports import build_report

    images = tmp_path / "set"
    for seed, name in enumerate(["t1", "t2", "v1", "v2"], start=50):
        _make_horse(images, name, seed)
    (images / "split.json").write_text(json.dumps({"training": ["t1", "t2"],
                                                   "validation": ["v1", "v2"]}))
    out = tmp_path / "out"
    rows = evaluate_image_folder(model_files(bundle), images, out, split="validation",
                                 progress=False)
    assert sorted({r["image"] for r in rows}) == ["v1", "v2"]
    table = read_eval_table(out / "evaluation.csv")  # the report's schema, same scores
    scores = {(r["image"], r["method"]): float(r["jaccard"]) for r in rows}
    assert len(table) == len(scores)
    for case, method, jaccard in zip(table["case"], table["method"], table["jaccard"],
                                     strict=True):
        assert jaccard == pytest.approx(scores[(case, method)])
    report = build_report(out / "evaluation.csv")
    assert report.comparison("joint", "cnn", "2d") is not None
    with pytest.raises(ValueError, match="no split 'test'"):
        evaluate_image_folder(model_files(bundle), images, out, split="test", progress=False)
    (images / "split.json").unlink()
    with pytest.raises(FileNotFoundError, match="no split file"):
        evaluate_image_folder(model_files(bundle), images, out, split="validation",
                              progress=False)
