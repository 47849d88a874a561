"""Leave-slices-out within one volume: a manifest entry's ``slice_split`` holds out a block of
slice positions per view (with a gap on both sides) and trains on the rest."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from pipeline.data import SliceSplit, select_slices, slice_datalist, write_nifti
from pipeline.data.export import export_slices
from pipeline.data.manifests import (
    check_manifest,
    load_manifest,
    manifest_entries,
    write_manifest,
)
from pipeline.data.samples import training_sets

SHAPE = (20, 30, 40)  # X (sagittal slices), Y (coronal), Z (axial): every view has its own N
SPACING = (1.5, 2.0, 2.5)
ORIGIN = (-10.0, 20.0, 300.0)
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # view → RAS world axis it is cut along


def _ras_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image, a label (a box touching every slice of every view's middle) and the RAS
    affine."""
    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 30.0, SHAPE).astype(np.int16)
    label = np.zeros(SHAPE, np.uint8)
    label[2:18, 3:27, 4:36] = 1
    image[label > 0] += 300
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = ORIGIN
    return image, label, affine


def _write_case(root, name: str = "vol", *, storage: str = "ras") -> dict:
    """Writes the volume as RAS, or as LPS with the axes stored in Z, X, Y order (same world
    content), and returns a manifest entry (paths relative to root)."""
    image, label, affine = _ras_volume()
    if storage == "lps_zxy":
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, SHAPE[0] - 1
        flip[1, 1], flip[1, 3] = -1.0, SHAPE[1] - 1
        image, label = image[::-1, ::-1, :], label[::-1, ::-1, :]
        affine = affine @ flip
        image, label = image.transpose(2, 0, 1), label.transpose(2, 0, 1)
        affine = affine[:, [2, 0, 1, 3]]
    write_nifti(np.ascontiguousarray(image), affine, root / name / "image.nii.gz")
    write_nifti(np.ascontiguousarray(label), affine, root / name / "label.nii.gz")
    return {"id": name, "image": f"{name}/image.nii.gz", "label": f"{name}/label.nii.gz"}


def _manifest(entry: dict, **split) -> dict:
    spec = {"held_out": [0.4, 0.6], "gap": 2, **split}
    return {"name": "one volume", "training": [{**entry, "slice_split": spec}],
            "validation": [], "test": []}


def _slices(samples) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for s in samples:
        out.setdefault(s["view"], []).append(int(s["slice"]))
    return out


def _parts(manifest: dict, root) -> tuple[dict, dict]:
    train = slice_datalist(manifest_entries(manifest, root, ["training"]))
    val = slice_datalist(manifest_entries(manifest, root, ["validation"]))
    return _slices(train), _slices(val)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("holdout")
    _write_case(base, "vol")
    _write_case(base, "vol_lps", storage="lps_zxy")
    return base


def test_training_and_validation_slices_are_disjoint_with_the_gap_respected(root):
    manifest = _manifest({"id": "vol", "image": "vol/image.nii.gz",
                          "label": "vol/label.nii.gz"}, gap=3)
    train, val = _parts(manifest, root)
    assert sorted(train) == sorted(val) == ["axial", "coronal", "sagittal"]
    for view, axis in AXIS.items():
        n = SHAPE[axis]
        t, v = set(train[view]), set(val[view])
        assert not t & v
        assert v == set(range(round(0.4 * n), round(0.6 * n)))  # a contiguous block
        # every training slice is more than `gap` slices away from every held-out one
        assert min(abs(i - j) for i in t for j in v) == 3 + 1
        dropped = set(range(n)) - t - v
        assert dropped == (set(range(min(v) - 3, min(v))) | set(range(max(v) + 1, max(v) + 4)))


def test_every_view_is_split_along_its_own_axis_in_patient_coordinates(root):
    """The held-out block sits at 40–60 % of the view's own RAS axis (checked through each 2-D
    sample's world affine), and the same world positions are held out whatever order and
    direction the file stores its axes in."""
    held = {}
    for name in ("vol", "vol_lps"):
        entry = {"id": name, "image": f"{name}/image.nii.gz", "label": f"{name}/label.nii.gz"}
        samples = slice_datalist(manifest_entries(_manifest(entry), root, ["validation"]))
        world = {}
        for s in samples:
            position = float((np.asarray(s["affine"]) @ [0.0, 0.0, 0.0, 1.0])[AXIS[s["view"]]])
            world.setdefault(s["view"], []).append(position)
        held[name] = {v: sorted(p) for v, p in world.items()}
    for view, axis in AXIS.items():
        n, step, first = SHAPE[axis], SPACING[axis], ORIGIN[axis]
        expected = [first + step * i for i in range(round(0.4 * n), round(0.6 * n))]
        np.testing.assert_allclose(held["vol"][view], expected)
        np.testing.assert_allclose(held["vol_lps"][view], expected)
        # the sample's own slice axis is the one the block was cut along: all positions differ
        assert len(set(np.round(held["vol"][view], 6))) == len(expected)


def test_per_view_blocks_and_the_test_split(root):
    entry = {"id": "vol", "image": "vol/image.nii.gz", "label": "vol/label.nii.gz"}
    blocks = {"axial": [0.0, 0.25], "coronal": [0.5, 1.0], "sagittal": [0.3, 0.7]}
    manifest = _manifest(entry, held_out=blocks, gap=1, split="test")
    assert manifest_entries(manifest, root, ["validation"]) == []
    test = _slices(slice_datalist(manifest_entries(manifest, root, ["test"])))
    train = _slices(slice_datalist(manifest_entries(manifest, root, ["training"])))
    for view, (start, stop) in blocks.items():
        n = SHAPE[AXIS[view]]
        block = list(range(math.floor(start * n + 0.5), math.floor(stop * n + 0.5)))
        assert test[view] == block
        assert train[view] == [i for i in range(n) if i < block[0] - 1 or i > block[-1] + 1]


def test_manifest_entries_mark_the_parts_and_the_entry_is_listed_once(root, tmp_path):
    entry = {"id": "vol", "image": "vol/image.nii.gz", "label": "vol/label.nii.gz"}
    path = write_manifest(_manifest(entry), tmp_path / "m.json")
    manifest = load_manifest(path)
    assert check_manifest(manifest, root) == []  # one entry: no image in two splits
    (train,), (val,) = (manifest_entries(manifest, root, [s]) for s in ("training", "validation"))
    assert (train["split"], train["slice_part"]) == ("training", "rest")
    assert (val["split"], val["slice_part"]) == ("validation", "held_out")
    assert train["source"] == val["source"] == "vol/image.nii.gz"
    assert val["slice_split"] == {"held_out": [0.4, 0.6], "gap": 2, "split": "validation"}
    # without a part (e.g. to segment the whole volume) every slice comes back
    whole = slice_datalist([{k: v for k, v in val.items() if k != "slice_part"}])
    assert len(whole) == sum(SHAPE)


def test_training_sets_take_the_split_and_sample_ids_never_repeat(root, tmp_path):
    entry = {"id": "vol", "image": "vol/image.nii.gz", "label": "vol/label.nii.gz"}
    path = write_manifest(_manifest(entry, gap=2), tmp_path / "m.json")
    for view, axis in AXIS.items():
        train, val = training_sets("cta", root=root, manifest=path, view=view, size=16)
        n = SHAPE[axis]
        held = round(0.6 * n) - round(0.4 * n)
        assert len(val) == held and len(train) == n - held - 4
        assert not {s["id"] for s in train} & {s["id"] for s in val}
        assert {s["view"] for s in train + val} == {view}


def test_export_writes_each_part_once_with_its_split(root, tmp_path):
    entry = {"id": "vol", "image": "vol/image.nii.gz", "label": "vol/label.nii.gz"}
    cases = manifest_entries(_manifest(entry), root)
    index = export_slices(cases, tmp_path / "out", views=("axial",))
    rows = list(csv.DictReader(index.open()))
    by_split = {s: sorted(int(r["slice"]) for r in rows if r["split"] == s)
                for s in ("training", "validation")}
    assert by_split["validation"] == list(range(16, 24))
    assert not set(by_split["training"]) & set(range(14, 26))
    assert len(rows) == len({r["image_file"] for r in rows}) == 40 - 4
    # a part without its split is the same named error as in slice_datalist, not a KeyError
    broken = [{k: v for k, v in cases[0].items() if k != "slice_split"}]
    for run in (lambda: export_slices(broken, tmp_path / "bad", views=("axial",)),
                lambda: slice_datalist(broken, views=("axial",))):
        with pytest.raises(ValueError, match=r"vol.*slice_part '(rest|held_out)' needs a"):
            run()


BAD_SPECS = [
    ({"held_out": [0.6, 0.4]}, r"0 <= start < stop <= 1"),
    ({"held_out": [-0.1, 0.5]}, r"0 <= start < stop <= 1"),
    ({"held_out": [0.5, 1.5]}, r"0 <= start < stop <= 1"),
    ({"held_out": [0.5, 0.5]}, r"0 <= start < stop <= 1"),
    ({"held_out": [float("nan"), 0.5]}, r"0 <= start < stop <= 1"),
    ({"held_out": [0.0, 1.0]}, r"nothing is left to train on"),
    ({"held_out": [0.5]}, r"two fractions \[start, stop\]"),
    ({"held_out": "0.4-0.6"}, r"two fractions \[start, stop\]"),
    ({"held_out": [True, 0.5]}, r"two fractions \[start, stop\]"),
    ({"held_out": 40}, r"two fractions \[start, stop\]"),
    ({}, r"needs held_out"),
    ({"held_out": [0.4, 0.6], "gap": -1}, r"gap must be a whole number"),
    ({"held_out": [0.4, 0.6], "gap": 1.5}, r"gap must be a whole number"),
    ({"held_out": [0.4, 0.6], "split": "testing"}, r"'validation' or 'test'"),
    ({"held_out": [0.4, 0.6], "fraction": 0.2}, r"unknown key\(s\) fraction"),
    ({"held_out": {"axial": [0.4, 0.6], "coronal": [0.4, 0.6]}}, r"missing: sagittal"),
    ({"held_out": {"axial": [0.4, 0.6], "coronal": [0.4, 0.6], "sagittal": [0.4, 0.6],
                   "oblique": [0, 1]}}, r"unknown: oblique"),
    ({"held_out": {"axial": [0.4, 0.6], "coronal": [0.7, 0.6], "sagittal": [0.4, 0.6]}},
     r"\(coronal\).*0 <= start < stop"),
    ([0.4, 0.6], r"must be an object"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_fractions_give_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        SliceSplit.from_spec(spec, where="training[0] vol")


@pytest.mark.parametrize(("spec", "message"), [
    ({"held_out": [0.50, 0.51]}, r"holds no slice of 20; widen it"),  # sagittal: 20 slices
    ({"held_out": [0.05, 0.95], "gap": 2}, r"leaves no sagittal slice of 20 to train on"),
])
def test_blocks_too_small_or_too_large_for_the_volume_name_it(root, spec, message):
    entry = {"id": "vol", "image": "vol/image.nii.gz", "label": "vol/label.nii.gz"}
    manifest = {"training": [{**entry, "slice_split": spec}]}
    with pytest.raises(ValueError, match=r"vol/image.nii.gz: held_out .*" + message):
        slice_datalist(manifest_entries(manifest, root, ["validation"]), views=("sagittal",))


def test_manifest_level_mistakes_are_errors_and_check_reports_them_all(root, tmp_path):
    entry = {"id": "vol", "image": "vol/image.nii.gz", "label": "vol/label.nii.gz"}
    own = {"training": [], "validation": [{**entry, "slice_split": {"held_out": [0.4, 0.6]}}]}
    with pytest.raises(ValueError, match=r"validation\[0\] vol: .*listed in"):
        manifest_entries(own, root, ["validation"])
    unlabelled = {"training": [{"id": "u", "image": "vol/image.nii.gz",
                                "slice_split": {"held_out": [0.4, 0.6]}}]}
    with pytest.raises(ValueError, match=r"needs a labelled entry"):
        manifest_entries(unlabelled, root, ["training"])
    bad = {"training": [{**entry, "slice_split": {"held_out": [0.7, 0.2]}},
                        {**entry, "id": "v2", "image": "vol_lps/image.nii.gz",
                         "label": "vol_lps/label.nii.gz",
                         "slice_split": {"held_out": [0.4, 0.6], "gap": -2}}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    problems = check_manifest(load_manifest(path), root)  # loads; check lists both problems
    assert [(p.index, p.key) for p in problems] == [(0, "slice_split"), (1, "slice_split")]
    assert "0 <= start < stop <= 1" in problems[0].message
    assert "gap must be a whole number" in problems[1].message


def test_select_slices_refuses_an_incomplete_view():
    samples = [{"view": "axial", "slice": i, "source": "v"} for i in (0, 1, 3)]
    with pytest.raises(ValueError, match="every slice of the axial view"):
        select_slices(samples, {"held_out": [0.4, 0.6]}, "rest")
    with pytest.raises(ValueError, match="slice part must be one of"):
        select_slices(samples, {"held_out": [0.4, 0.6]}, "training")


@pytest.mark.parametrize("storage", ["ras", "lps_zxy"])
def test_saved_predictions_are_scored_on_their_part_only(tmp_path, storage):
    from pipeline.evaluation.predictions import evaluate_predictions

    entry = _write_case(tmp_path, storage=storage)
    spec = _manifest(entry)
    predictions = tmp_path / "pred"
    predictions.mkdir()
    # the label itself as the prediction, named as `mmcrf infer` names it from the data root
    (predictions / "vol").mkdir()
    (predictions / "vol" / "image_mask.nii.gz").write_bytes(
        (tmp_path / "vol" / "label.nii.gz").read_bytes())
    split = SliceSplit.from_spec(spec["training"][0]["slice_split"])
    for part_split, part in (("validation", "held_out"), ("training", "rest")):
        entries = manifest_entries(spec, tmp_path, [part_split])
        rows = evaluate_predictions(predictions, entries, method="label", views=list(AXIS))
        for view, axis in AXIS.items():
            slices = [r["slice"] for r in rows if r["view"] == view]
            assert slices == split.indices(view, SHAPE[axis], part)
        scored = [r["jaccard"] for r in rows if not math.isnan(r["jaccard"])]
        assert scored and all(j == 1.0 for j in scored)
