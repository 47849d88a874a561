"""Real-data tier: the committed horse models scored on the shared Weizmann Horse set."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.evaluation.folders import evaluate_image_folder
from pipeline.models import model_files
from tests.test_bundles import REPO

pytestmark = pytest.mark.realdata


def test_committed_horse_models_score_the_validation_images(shared_data, tmp_path):
    root = shared_data / "weizmann_horse"
    runs = model_files(REPO / "bundles" / "weizmann_horse_crf")
    # joint_lp: joint training with the learned pairwise term (its own network, with a head)
    assert list(runs) == ["cnn", "piecewise", "joint", "joint_lp"]
    rows = evaluate_image_folder(runs, root, tmp_path, progress=False)
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 4 * 200
    validation = set(json.loads((root / "split.json").read_text())["validation"])
    table = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    means = {m: np.mean([float(r["jaccard"]) for r in table
                         if r["method"] == m and r["image"] in validation])
             for m in runs}
    # at the masks' full resolution: exactly the figures the bundle's metadata and
    # docs/RESULTS.md report for the committed models
    meta = json.loads((REPO / "bundles" / "weizmann_horse_crf" / "configs" /
                       "metadata.json").read_text())["eval_metrics"]
    for method, value in means.items():
        assert value == pytest.approx(meta[f"mean_jaccard_validation_fullres_{method}"],
                                      abs=5e-5), method
    assert "scored on the gray image" in next(r["error"] for r in table
                                              if r["image"] == "horse318")
