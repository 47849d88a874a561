"""Real-data tier: the shared CAMUS copy checked, and the committed echo models scored on it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from pipeline.data.datasets.camus import check_camus, find_camus_images
from pipeline.evaluation.folders import evaluate_camus_folder
from pipeline.models import model_files
from tests.test_bundles import REPO

pytestmark = pytest.mark.realdata

BUNDLE = REPO / "bundles" / "echo_lv_crf"


@pytest.fixture
def camus(shared_data):
    root = shared_data / "camus"
    if not root.is_dir():
        pytest.skip(f"CAMUS not found at {root}")
    return root


def test_the_shared_copy_has_one_known_defect(camus):
    report = check_camus(camus)
    assert report["images"] == 1800 and report["patients"] == 450
    assert len(report["problems"]) == 1
    assert "byte-identical" in report["problems"][0]
    assert "patient0033_4CH_ED" in report["problems"][0]
    assert "patient0068_4CH_ED" in report["problems"][0]
    # and the resizing's strays in every label map (noted, not a problem)
    strays = report["strays"]
    assert strays["with"] == strays["maps"] == 1800
    assert 0.005 < strays["pixels"] / strays["labelled"] < 0.02


def test_committed_echo_models_reproduce_their_validation_figures(camus, tmp_path):
    runs = model_files(BUNDLE)
    assert list(runs) == ["cnn", "piecewise", "joint"]
    rows = evaluate_camus_folder(runs, camus, tmp_path, split="validation", progress=False)
    validation = json.loads((camus / "split.json").read_text())["validation"]
    assert len(validation) == 50
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 3 * 100
    table = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["eval_metrics"]
    for method in runs:
        scores = [float(r["jaccard"]) for r in table if r["method"] == method]
        assert len(scores) == 100
        assert np.mean(scores) == pytest.approx(
            meta[f"mean_jaccard_camus_validation_2ch_{method}"], abs=5e-5), method
    # the same masks against the label maps without the resizing's stray pixels
    dropped = evaluate_camus_folder(runs, camus, tmp_path / "dropped", split="validation",
                                    drop_strays=True, progress=False)
    for method in runs:
        scores = [r["jaccard"] for r in dropped if r["method"] == method]
        given = [float(r["jaccard"]) for r in table if r["method"] == method]
        assert np.mean(scores) == pytest.approx(
            meta[f"mean_jaccard_camus_validation_2ch_{method}_strays_dropped"], abs=5e-5)
        assert np.mean(scores) > np.mean(given) + 0.01  # about 2 % of the truth was strays
    # every mask is on its image's grid (224×224, identity affine in this copy)
    import nibabel as nib

    first = find_camus_images(camus, patients=[validation[0]])[0]
    mask = nib.load(tmp_path / "joint" / f"{first.name}.nii.gz")
    image = nib.load(first.image)
    assert mask.shape == image.shape
    np.testing.assert_array_equal(mask.affine, image.affine)
