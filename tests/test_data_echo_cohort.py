"""The echo phantom cohort on disk and the ultrasound training samples made from it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.data.phantoms import echo_samples, ensure_demo_data, write_echo_cohort
from pipeline.data.samples import training_sets


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("echo")
    split = write_echo_cohort(root, cases=(3, 2), shape=(48, 40), n_frames=4, seed=5)
    return root, split


def test_cohort_layout_is_split_by_patient(cohort):
    root, split = cohort
    assert json.loads((root / "split.json").read_text()) == split
    assert split == {"training": ["echo_005", "echo_006", "echo_007"],
                     "validation": ["echo_008", "echo_009"]}
    for case in split["training"] + split["validation"]:
        assert (root / case / "cine.dcm").is_file() and (root / case / "cine_mask.nii.gz").is_file()
    assert not list(root.rglob("*.tmp*"))
    masks = [nib.load(root / c / "cine_mask.nii.gz").get_fdata() for c in split["validation"]]
    assert not np.array_equal(masks[0], masks[1])  # the phantoms differ from case to case


def test_a_second_call_keeps_the_files(cohort):
    root, split = cohort
    stamp = (root / "echo_005" / "cine.dcm").stat().st_mtime_ns
    assert write_echo_cohort(root, cases=(3, 2), shape=(48, 40), n_frames=4, seed=5) == split
    assert (root / "echo_005" / "cine.dcm").stat().st_mtime_ns == stamp


def test_samples_match_the_files_read_independently(cohort):
    root, _ = cohort
    samples = echo_samples(root, "validation")
    assert len(samples) == 2 * 4
    first = [s for s in samples if s["source"] == "echo_008"]
    assert [s["slice"] for s in first] == [0, 1, 2, 3]
    assert all(s["view"] == "echo" for s in samples)
    # pydicom's pixels / 255 and nibabel's mask transposed to [row, col]: no project reader
    pixels = pydicom.dcmread(root / "echo_008" / "cine.dcm").pixel_array
    mask = np.asarray(nib.load(root / "echo_008" / "cine_mask.nii.gz").dataobj)
    for t, sample in enumerate(first):
        assert sample["image"].shape == (1, 48, 40)
        np.testing.assert_allclose(sample["image"][0].numpy(), pixels[t] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(sample["label"][0].numpy(), mask[..., t].squeeze().T)


def test_training_sets_of_the_generated_cohort(tmp_path):
    train, val = training_sets("echo_demo", root=tmp_path / "echo", size=32)
    assert len(train) == 6 * 12 and len(val) == 2 * 12
    assert train[0]["image"].shape == (1, 32, 32) and 0.0 <= float(train[0]["image"].min())
    assert {s["source"] for s in train}.isdisjoint({s["source"] for s in val})


def test_bad_cohorts_are_named(tmp_path, cohort):
    with pytest.raises(FileNotFoundError, match=r"no split file .*split\.json"):
        echo_samples(tmp_path, "training")
    (tmp_path / "split.json").write_text(json.dumps({"training": ["p1"], "validation": ["p1"]}))
    with pytest.raises(ValueError, match=r"split\.json: 'p1' is listed in 'validation' also in "
                                         r"'training'"):
        echo_samples(tmp_path, "training")  # a case in two splits would leak into validation
    (tmp_path / "split.json").write_text(json.dumps({"training": [".."]}))
    with pytest.raises(ValueError, match=r"split 'training' has an invalid name '\.\.'"):
        echo_samples(tmp_path, "training")  # a case folder outside the cohort
    (tmp_path / "split.json").write_text("[\"p1\"]")
    with pytest.raises(ValueError, match="must be a non-empty JSON object"):
        echo_samples(tmp_path, "training")
    root, _ = cohort
    with pytest.raises(ValueError, match=r"no split 'test'"):
        echo_samples(root, "test")
    (tmp_path / "split.json").write_text(json.dumps({"training": ["p1"]}))
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "cine.dcm").write_bytes(
        (root / "echo_005" / "cine.dcm").read_bytes())
    with pytest.raises(ValueError, match=r"p1: expected one cine_mask\.<ext> file"):
        echo_samples(tmp_path, "training")
    with pytest.raises(ValueError, match="no generated data for data kind 'echo'"):
        ensure_demo_data("echo", tmp_path)
    with pytest.raises(ValueError, match="at least one training and one validation"):
        write_echo_cohort(tmp_path / "x", cases=(3, 0))
