"""Weizmann Horse loader on a fake JPEG folder, and on the real set (realdata tier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped
from PIL import Image

from pipeline.data.datasets.horse import (
    MASK_THRESHOLD,
    BrokenImageError,
    LoadHorsed,
    find_defect,
    horse_datalist,
    horse_split,
    load_horse,
    load_horse_manifest,
    scan_horse_folder,
    write_horse_manifest,
)

MANIFEST = Path(__file__).resolve().parents[1] / "data_manifests" / "weizmann_horse.json"
MASK_W, MASK_H = 40, 30  # mask and grey size; rgb is stored at twice that
SPLIT = {"training": ["horse001", "horse002"], "validation": ["horse003", "horse004"]}
BROKEN = "horse003"  # its rgb file is all black, its grey twin is fine
NO_MASK = "horse009"  # images but no mask, not in split.json


def _truth(seed: int) -> np.ndarray:
    """A filled ellipse, a different one per seed, as a 0/1 H×W mask."""
    rows, cols = np.mgrid[0:MASK_H, 0:MASK_W]
    cy, cx = MASK_H / 2 + seed % 3, MASK_W / 2 - seed % 4
    return ((((rows - cy) / 9.0) ** 2 + ((cols - cx) / 13.0) ** 2) <= 1.0).astype(np.uint8)


def _save(arr: np.ndarray, path: Path, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=quality)


def _make_horse(root: Path, name: str, seed: int, *, mask: bool = True,
                broken: bool = False) -> None:
    truth = _truth(seed)
    rng = np.random.default_rng(seed)
    gray = (60 + 140 * truth + rng.integers(0, 30, truth.shape)).astype(np.uint8)
    big = np.kron(gray, np.ones((2, 2), dtype=np.uint8))  # rgb stored at 2× the mask's size
    rgb = np.stack([big, big // 2, 255 - big], axis=-1)
    if broken:
        rgb = np.zeros_like(rgb)
    _save(rgb, root / "rgb" / f"{name}.jpg")
    _save(gray, root / "gray" / f"{name}.jpg")
    if mask:
        _save(255 * truth, root / "figure_ground" / f"{name}.jpg", quality=40)  # noisy mask


@pytest.fixture
def horse_root(tmp_path: Path) -> Path:
    """A tiny folder laid out like the Weizmann set, real JPEG files, with split.json."""
    root = tmp_path / "horse"
    for seed, name in enumerate([*SPLIT["training"], *SPLIT["validation"]], start=1):
        _make_horse(root, name, seed, broken=name == BROKEN)
    (root / "split.json").write_text(json.dumps(SPLIT))
    return root


def test_load_resamples_rgb_to_mask_size(horse_root):
    with Image.open(horse_root / "rgb" / "horse001.jpg") as img:
        assert img.size == (2 * MASK_W, 2 * MASK_H)
    sample = load_horse(horse_root, "horse001")
    assert sample.name == "horse001"
    assert sample.image.shape == (3, MASK_H, MASK_W)
    assert sample.image.dtype == np.float32
    assert 0.0 <= sample.image.min() and sample.image.max() <= 1.0
    assert sample.mask.shape == (MASK_H, MASK_W)
    assert sample.rgb_size == (2 * MASK_H, 2 * MASK_W)
    assert sample.defect is None and not sample.fallback
    # the resampled image still lines up with the mask: the horse is the bright part of red
    red = sample.image[0]
    assert red[sample.mask == 1].mean() > red[sample.mask == 0].mean() + 0.3


def test_mask_is_binarised_at_128(horse_root):
    with Image.open(horse_root / "figure_ground" / "horse001.jpg") as img:
        raw = np.asarray(img.convert("L"))
    assert len(np.unique(raw)) > 2  # the JPEG mask does carry compression noise
    sample = load_horse(horse_root, "horse001")
    assert sample.mask.dtype == np.uint8
    assert set(np.unique(sample.mask)) <= {0, 1}
    np.testing.assert_array_equal(sample.mask, (raw >= MASK_THRESHOLD).astype(np.uint8))
    assert np.mean(sample.mask == _truth(1)) > 0.97


def test_gray_colour_has_one_channel(horse_root):
    sample = load_horse(horse_root, "horse002", colour="gray")
    assert sample.image.shape == (1, MASK_H, MASK_W)
    assert sample.rgb_size is None
    assert sample.source == horse_root / "gray" / "horse002.jpg"


def test_find_defect_criterion():
    rng = np.random.default_rng(0)
    assert "dark" in find_defect(np.zeros((10, 10)))
    assert "near-constant" in find_defect(np.full((10, 10), 128.0))
    assert find_defect(rng.integers(0, 256, (10, 10))) is None
    dim = np.full((10, 10), 5.0)
    dim[0, :6] = 200.0  # 94% dark, under the 95% limit
    assert find_defect(dim) is None
    dim[0, 5] = 5.0  # 95% dark
    assert find_defect(dim) is not None
    assert find_defect(Image.new("RGB", (8, 8))) is not None
    with pytest.raises(ValueError, match="2-D"):
        find_defect(np.zeros((3, 4, 4)))


def test_broken_image_raises_naming_the_file(horse_root):
    with pytest.raises(BrokenImageError, match=r"rgb.horse003\.jpg.*dark") as info:
        load_horse(horse_root, BROKEN)
    assert info.value.path == horse_root / "rgb" / f"{BROKEN}.jpg"
    assert isinstance(info.value, ValueError)


def test_broken_image_gray_fallback_and_keep(horse_root):
    sample = load_horse(horse_root, BROKEN, on_broken="gray")
    assert sample.fallback and "dark" in sample.defect
    assert sample.source == horse_root / "gray" / f"{BROKEN}.jpg"
    assert sample.image.shape == (3, MASK_H, MASK_W)
    np.testing.assert_array_equal(sample.image[0], sample.image[2])
    assert sample.image.max() > 0.5
    kept = load_horse(horse_root, BROKEN, on_broken="keep")
    assert kept.defect is not None and not kept.fallback and kept.image.max() < 0.1
    with pytest.raises(ValueError, match="colour='rgb' only"):
        load_horse(horse_root, BROKEN, colour="gray", on_broken="gray")


def test_split_json_read_and_validated(horse_root):
    assert horse_split(horse_root) == SPLIT
    path = horse_root / "split.json"
    for bad in ("{not json", "[]", '{"training": "horse001"}', '{"training": []}',
                '{"training": [1]}', '{"training": ["a/b"]}',
                '{"training": ["horse001"], "validation": ["horse001"]}'):
        path.write_text(bad)
        with pytest.raises(ValueError, match=r"split\.json"):
            horse_split(horse_root)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"split\.json"):
        horse_split(horse_root)


def test_datalist_from_split_reports_broken(horse_root):
    data, report = horse_datalist(horse_root, "training")
    assert [d["name"] for d in data] == ["horse001", "horse002"]
    assert report == []
    assert data[0] == {"image": str(horse_root / "rgb" / "horse001.jpg"),
                       "label": str(horse_root / "figure_ground" / "horse001.jpg"),
                       "name": "horse001"}
    data, report = horse_datalist(horse_root, "validation")
    assert [d["name"] for d in data] == ["horse004"]
    assert [(r.name, r.action) for r in report] == [(BROKEN, "excluded")]
    assert "dark" in report[0].reason and report[0].path.endswith(f"rgb/{BROKEN}.jpg")
    data, report = horse_datalist(horse_root, "validation", on_broken="gray")
    assert data[0]["image"] == str(horse_root / "gray" / f"{BROKEN}.jpg")
    assert report[0].action == "gray_fallback"
    with pytest.raises(BrokenImageError, match=BROKEN):
        horse_datalist(horse_root, "validation", on_broken="raise")
    data, report = horse_datalist(horse_root, "validation", colour="gray")
    assert len(data) == 2 and report == []  # the grey twin is fine
    data, report = horse_datalist(horse_root, "validation", check=False)
    assert len(data) == 2 and report == []
    with pytest.raises(KeyError, match="test"):
        horse_datalist(horse_root, "test")


def test_folder_without_split_json(horse_root):
    (horse_root / "split.json").unlink()
    _make_horse(horse_root, NO_MASK, 9, mask=False)
    (horse_root / "gray" / "horse002.jpg").unlink()
    scan = scan_horse_folder(horse_root)
    assert scan.names == ["horse001", "horse002", "horse003", "horse004", NO_MASK]
    assert scan.missing_mask == [NO_MASK]
    assert scan.usable("gray") == ["horse001", "horse003", "horse004"]
    data, report = horse_datalist(horse_root, None)
    assert [d["name"] for d in data] == ["horse001", "horse002", "horse004"]
    assert {(r.name, r.action) for r in report} == {(NO_MASK, "excluded"), (BROKEN, "excluded")}
    assert next(r.reason for r in report if r.name == NO_MASK) == "no mask"
    data, report = horse_datalist(horse_root, None, colour="gray")
    assert [d["name"] for d in data] == ["horse001", "horse003", "horse004"]
    assert {r.name: r.reason for r in report} == {"horse002": "no gray image", NO_MASK: "no mask"}
    with pytest.raises(FileNotFoundError, match=r"split\.json"):
        horse_datalist(horse_root, "training")


def test_missing_files_are_named(horse_root):
    (horse_root / "figure_ground" / "horse002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"figure_ground.horse002\.jpg"):
        load_horse(horse_root, "horse002")
    with pytest.raises(FileNotFoundError, match=r"figure_ground.horse002\.jpg"):
        horse_datalist(horse_root, "training", check=False)
    with pytest.raises(FileNotFoundError, match=r"rgb.horse404\.jpg"):
        load_horse(horse_root, "horse404")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_is_named(horse_root, damage):
    path = horse_root / "rgb" / "horse001.jpg"
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot decode image .*rgb.horse001\.jpg"):
        load_horse(horse_root, "horse001")


def test_size_mismatches_raise(horse_root):
    rng = np.random.default_rng(1)
    _save(rng.integers(0, 256, (MASK_H + 2, MASK_W), dtype=np.uint8),
          horse_root / "gray" / "horse001.jpg")
    with pytest.raises(ValueError, match=r"grey image .*gray.horse001\.jpg.*mask"):
        load_horse(horse_root, "horse001", colour="gray")
    _save(rng.integers(0, 256, (MASK_H, 3 * MASK_W, 3), dtype=np.uint8),
          horse_root / "rgb" / "horse002.jpg")
    with pytest.raises(ValueError, match="aspect ratio"):
        load_horse(horse_root, "horse002")


def test_load_horsed_in_monai_dataset(horse_root):
    data, _ = horse_datalist(horse_root, "training")
    transform = Compose([LoadHorsed(), EnsureTyped(keys=("image", "label"))])
    batch = next(iter(DataLoader(Dataset(data=data, transform=transform), batch_size=2)))
    assert tuple(batch["image"].shape) == (2, 3, MASK_H, MASK_W)
    assert tuple(batch["label"].shape) == (2, 1, MASK_H, MASK_W)
    assert set(np.unique(batch["label"].numpy())) <= {0, 1}
    assert batch["name"] == ["horse001", "horse002"]
    item = LoadHorsed(colour="gray")(data[0])
    assert item["image"].shape == (1, MASK_H, MASK_W) and item["label"].dtype == np.uint8
    # a broken image cannot slip through the transform; the datalist's grey fallback can
    broken = {"image": str(horse_root / "rgb" / f"{BROKEN}.jpg"),
              "label": str(horse_root / "figure_ground" / f"{BROKEN}.jpg")}
    with pytest.raises(BrokenImageError):
        LoadHorsed()(broken)
    assert LoadHorsed(on_broken="gray")(broken)["image"].shape == (3, MASK_H, MASK_W)
    data, _ = horse_datalist(horse_root, "validation", on_broken="gray")
    assert all(LoadHorsed()(d)["image"].shape == (3, MASK_H, MASK_W) for d in data)
    with pytest.raises(ValueError, match="two keys"):
        LoadHorsed(keys="image")


def test_manifest_relative_paths_and_exclusions(horse_root, tmp_path):
    out = tmp_path / "manifest.json"
    manifest = write_horse_manifest(horse_root, out)
    text = out.read_text()
    assert json.loads(text) == manifest
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert manifest["training"] == [
        {"image": f"rgb/{n}.jpg", "label": f"figure_ground/{n}.jpg", "name": n}
        for n in SPLIT["training"]]
    assert [e["name"] for e in manifest["validation"]] == ["horse004"]
    (excluded,) = manifest["excluded"]
    assert excluded["name"] == BROKEN and excluded["split"] == "validation"
    assert excluded["fallback_image"] == f"gray/{BROKEN}.jpg"
    assert (manifest["numTraining"], manifest["numValidation"]) == (2, 1)
    data, report = load_horse_manifest(out, horse_root, "validation")
    assert [d["name"] for d in data] == ["horse004"]
    assert data[0]["image"] == str(horse_root / "rgb" / "horse004.jpg")
    assert [r.name for r in report] == [BROKEN]
    data, report = load_horse_manifest(out, horse_root, "validation", on_broken="gray")
    assert [d["image"] for d in data] == [str(horse_root / "gray" / f"{BROKEN}.jpg"),
                                          str(horse_root / "rgb" / "horse004.jpg")]
    assert report[0].action == "gray_fallback"


@pytest.mark.realdata
def test_real_weizmann_horse(shared_data, tmp_path):
    root = shared_data / "weizmann_horse"
    if not root.is_dir():
        pytest.skip(f"Weizmann Horse data not found at {root}")
    split = horse_split(root)
    assert {k: len(v) for k, v in split.items()} == {"training": 150, "validation": 50}
    broken, fractions, resampled = [], [], 0
    for name in sorted(split["training"] + split["validation"]):
        gray = load_horse(root, name, colour="gray")
        sample = load_horse(root, name, on_broken="keep")
        assert set(np.unique(sample.mask)) <= {0, 1}
        assert gray.image.shape[1:] == sample.mask.shape  # mask has the grey image's size
        assert sample.image.shape == (3, *sample.mask.shape)  # rgb resampled to the mask
        np.testing.assert_array_equal(gray.mask, sample.mask)
        resampled += sample.rgb_size != sample.mask.shape
        if sample.defect is not None:
            broken.append(name)
        fractions.append(float(sample.mask.mean()))
    assert broken == ["horse318"]
    assert resampled == 199  # all but horse174 are stored at another resolution
    assert 0.05 <= min(fractions) and max(fractions) <= 0.45
    assert 0.2 <= float(np.mean(fractions)) <= 0.3
    data, report = horse_datalist(root, "training")
    assert len(data) == 149 and [r.name for r in report] == ["horse318"]
    write_horse_manifest(root, tmp_path / "weizmann_horse.json")
    assert (tmp_path / "weizmann_horse.json").read_text() == MANIFEST.read_text()
