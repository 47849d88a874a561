"""Which model infer runs and how it says so: the model's own view, bundle folders, the
volume seen in training, and command-line help that shows every default."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import pytest

from pipeline.cli import _parser, main
from pipeline.data import write_cta_phantom
from pipeline.inference import VolumePredictor
from tests._tiny_models import with_config

SHAPE = (40, 36, 24)


@pytest.fixture(scope="module")
def model(cta_model_three_views):
    return cta_model_three_views


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("scans")
    case = write_cta_phantom(root / "src", "p", rng=3, shape=SHAPE, dicom=False)
    (root / "in").mkdir()
    shutil.copy(case["image"], root / "in" / "ct.nii.gz")
    return root / "in"


def _rows(out):
    return {r["case"]: r for r in csv.DictReader((out / "summary.csv").open())}


def test_a_model_runs_on_its_own_view_and_another_view_is_refused(model, scans, tmp_path):
    coronal = with_config(model, tmp_path / "coronal.pt", data={"view": "coronal"})
    assert VolumePredictor(coronal).views == ("coronal",)
    with pytest.raises(ValueError, match=r"coronal\.pt: trained on coronal slices, but asked "
                                         r"to segment axial slices"):
        VolumePredictor(coronal, ["axial"])
    assert main(["infer", "--input", str(scans), "--output", str(tmp_path / "o"), "--model",
                 str(coronal), "--no-progress"]) == 0
    assert _rows(tmp_path / "o")["ct"]["views"] == "coronal"
    assert main(["infer", "--input", str(scans), "--output", str(tmp_path / "a"), "--model",
                 str(coronal), "--view", "axial", "--no-progress"]) == 2
    assert main(["infer", "--input", str(scans), "--output", str(tmp_path / "a"), "--model",
                 str(coronal), "--view", "axial", "--any-view", "--no-progress"]) == 0


def test_a_bundle_folder_is_a_model_with_its_views(model, scans, tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "inference.json").write_text('{"view": "sagittal"}')
    for view in ("axial", "coronal", "sagittal"):
        with_config(model, bundle / "models" / f"model_{view}.pt", data={"view": view})
    assert main(["infer", "--input", str(scans), "--output", str(tmp_path / "b"), "--model",
                 str(bundle), "--no-progress"]) == 0
    assert _rows(tmp_path / "b")["ct"]["views"] == "sagittal"  # the bundle's default
    assert main(["infer", "--input", str(scans), "--output", str(tmp_path / "c"), "--model",
                 str(bundle), "--view", "all", "--no-progress"]) == 0
    row = _rows(tmp_path / "c")["ct"]
    assert row["views"] == "axial,coronal,sagittal"
    assert [p.split("=")[0] for p in row["model_sha256"].split(";")] == ["axial", "coronal",
                                                                          "sagittal"]


def test_a_volume_far_from_the_training_range_gets_a_warning(model, scans, tmp_path):
    small = with_config(model, tmp_path / "small.pt", data={"training_foreground_ml": [1000, 2000]})
    assert main(["infer", "--input", str(scans), "--output", str(tmp_path / "o"), "--model",
                 str(small), "--no-progress"]) == 0
    row = _rows(tmp_path / "o")["ct"]
    mask = nib.load(tmp_path / "o" / "ct_mask.nii.gz").get_fdata() > 0
    assert 0 < float(row["foreground_ml"]) < 500
    assert "outside the range the model saw in training (1000-2000 mL" in row["warning"]
    assert float(row["foreground_slices"]) == pytest.approx(mask.any(axis=(0, 1)).mean(),
                                                            abs=1e-4)
    sure = with_config(model, tmp_path / "sure.pt",
                       data={"training_foreground_ml": [float(row["foreground_ml"])] * 2})
    assert main(["infer", "--input", str(scans), "--output", str(tmp_path / "p"), "--model",
                 str(sure), "--no-progress"]) == 0
    assert _rows(tmp_path / "p")["ct"]["warning"] == ""


@pytest.mark.parametrize(("command", "option", "default"), [
    ("infer", "--workers", "(default: 0)"), ("infer", "--batch-size", "(default: 16)"),
    ("evaluate", "--size", "(default: 64)"), ("evaluate", "--empty",
                                              "(default: exclude_empty_truth)"),
    ("demo", "--output", "(default: demo_output)"), ("train", "--view", "(default: axial)"),
    ("train", "--C", "default: the preset's"), ("train", "--lr", "default: the preset's"),
    ("train", "--epochs", "default: the preset's")])
def test_help_shows_every_default(command, option, default, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    after = text[text.index(f" {option} "):]
    assert default in after[:200]


@pytest.mark.parametrize("command", ["train", "evaluate", "infer", "demo"])
def test_progress_bars_are_on_by_default_everywhere(command):
    required = {"train": ["--out", "x"], "evaluate": ["--out", "x"],
                "infer": ["--input", "i", "--output", "o", "--model", "m"], "demo": []}
    args = _parser().parse_args([command, *required[command]])
    assert args.progress is True
    assert _parser().parse_args([command, *required[command], "--no-progress"]).progress is False
