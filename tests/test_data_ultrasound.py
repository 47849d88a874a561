"""Ultrasound frame loading from real files in every format, and the echo phantom."""

from __future__ import annotations

import re
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import list_data_collate
from monai.transforms import Compose, EnsureTyped
from PIL import Image
from pydicom.pixels import apply_modality_lut, get_decoder
from scipy import ndimage

from pipeline.data.phantoms.echo import (
    ECHO_FORMATS,
    echo_phantom,
    write_echo_cine,
    write_echo_phantom,
)
from pipeline.data.ultrasound import (
    LoadUltrasoundFrames,
    LoadUltrasoundFramesd,
    UltrasoundFrame,
    load_ultrasound,
    load_ultrasound_frame,
    resolve_frames,
)

SPACING = (0.3, 0.5)  # (row, col) mm: unequal, so a swap is caught


def _testdata(name: str) -> str:
    """A file shipped inside pydicom (never downloaded: no network in the tests)."""
    path = pydicom.data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


def _luma(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64)[..., :3] @ [0.299, 0.587, 0.114]


@pytest.fixture(scope="module")
def phantom():
    return echo_phantom((48, 64), n_frames=8, rng=7, spacing=SPACING)


@pytest.fixture(scope="module")
def written(phantom, tmp_path_factory):
    return write_echo_phantom(phantom, tmp_path_factory.mktemp("echo"))


@pytest.fixture
def asymmetric() -> np.ndarray:
    """A 3-frame 5×7 cine whose every pixel differs: any flip, transpose or shift shows."""
    return (np.arange(3 * 5 * 7).reshape(3, 5, 7) * 7 % 251).astype(np.uint8)


def _frames(frames: list[UltrasoundFrame]) -> tuple[np.ndarray, np.ndarray | None]:
    images = np.stack([f.image for f in frames])
    masks = None if frames[0].mask is None else np.stack([f.mask for f in frames])
    return images, masks


def _raises(exc: type[Exception], path, fragment: str):
    """pytest.raises whose message must name ``path`` and contain ``fragment``."""
    return pytest.raises(exc, match=rf"(?s){re.escape(str(path))}.*{re.escape(fragment)}")


# The phantom -----------------------------------------------------------------------------------

def test_echo_phantom_cycle_and_appearance(phantom):
    frames, masks = phantom.frames, phantom.masks
    assert frames.shape == masks.shape == (8, 48, 64)
    assert frames.dtype == np.float32 and masks.dtype == np.uint8
    assert frames.min() >= 0 and frames.max() <= 1 and set(np.unique(masks)) <= {0, 1}
    areas = masks.sum(axis=(1, 2)).astype(np.int64)
    assert phantom.frame_names == {"ED": 0, "ES": phantom.es} and 0 < phantom.es < 8
    assert areas[phantom.ed] == areas.max() > areas[phantom.es] == areas.min() > 0
    assert np.all(np.diff(areas[:phantom.es + 1]) < 0)  # contracts, then expands again
    assert np.all(np.diff(areas[phantom.es:]) > 0)
    assert np.all(frames[:, ~phantom.sector] == 0)  # nothing outside the fan
    assert phantom.sector[0, 31] and not phantom.sector[0, 0] and not phantom.sector[47, 0]
    # The cavity is dark, off-centre (left of the midline) and not mirror-symmetric.
    mean = frames.mean(axis=0)
    inner = ndimage.binary_erosion(masks[0] == 1, iterations=2)  # away from blurred edges
    assert mean[inner].mean() < 0.5 * mean[phantom.sector & (masks[0] == 0)].mean()
    cols = np.nonzero(masks[0])[1]
    assert cols.mean() < 0.45 * 64
    assert not np.array_equal(masks[0], masks[0][:, ::-1])
    # Depth attenuation: tissue away from the heart is darker deeper down.
    flat = echo_phantom((96, 96), n_frames=2, rng=3, contraction=0.1)
    tissue = flat.sector & (np.abs(np.arange(96) - 70)[None, :] < 6)  # a strip right of the LV
    by_depth = [flat.frames[:, r0:r0 + 16][:, tissue[r0:r0 + 16]].mean()
                for r0 in (30, 50, 70)]
    assert by_depth[0] > by_depth[1] > by_depth[2]
    # Speckle: reproducible by seed, different between frames.
    again = echo_phantom((48, 64), n_frames=8, rng=7, spacing=SPACING)
    assert np.array_equal(again.frames, frames)
    assert not np.array_equal(frames[1][masks[1] == 0], frames[-1][masks[1] == 0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shape": (16, 64)}, "at least 32"),
    ({"n_frames": 1}, "at least 2 frames"),
    ({"contraction": 0.9}, "contraction"),
    ({"attenuation": -1.0}, "attenuation"),
])
def test_echo_phantom_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        echo_phantom(**kwargs)


# Every format, same arrays ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(ECHO_FORMATS))
def test_phantom_files_read_back_identically(phantom, written, fmt):
    files = written[fmt]
    if fmt == "png":
        frames = [load_ultrasound_frame(i, m) for i, m in zip(files.images, files.masks,
                                                                strict=True)]
    else:
        assert len(files.images) == 1
        frames = load_ultrasound(files.images[0], files.masks[0], frame_names=phantom.frame_names)
        assert [f.frame for f in frames] == list(range(8))
        assert frames[0].frame_name == "ED" and frames[phantom.es].frame_name == "ES"
        assert frames[0].spacing == pytest.approx(SPACING)
        assert frames[0].source == files.images[0] and frames[0].mask_source == files.masks[0]
    images, masks = _frames(frames)
    assert images.dtype == np.float32 and masks.dtype == np.uint8
    np.testing.assert_array_equal(images, phantom.as_uint8())
    np.testing.assert_array_equal(masks, phantom.masks)


def test_written_dicom_is_valid_enough(written):
    ds = pydicom.dcmread(written["dicom"].images[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "US" and int(ds.NumberOfFrames) == 8
    assert ds.pixel_array.shape == (8, 48, 64)


def test_same_frames_from_independent_writers_agree(tmp_path, asymmetric):
    """Files written by Pillow, SimpleITK and nibabel directly, not by our writer."""
    cine = asymmetric
    frame = cine[1]
    expected = cine.astype(np.float32)
    paths = {}
    Image.fromarray(frame).save(paths.setdefault("png", tmp_path / "f.png"))
    sitk.WriteImage(sitk.GetImageFromArray(frame),
                    str(paths.setdefault("mhd2", tmp_path / "f.mhd")))
    sitk.WriteImage(sitk.GetImageFromArray(frame),
                    str(paths.setdefault("nii_sitk", tmp_path / "f_sitk.nii.gz")))
    # nibabel: i = x = column, j = y = row, so the stored array is the frame's transpose.
    nib.save(nib.Nifti1Image(frame.T.copy(), np.eye(4)),
             paths.setdefault("nii2", tmp_path / "f.nii"))
    write_echo_cine(frame, paths.setdefault("dcm2", tmp_path / "f.dcm"))
    for key, path in paths.items():
        got = load_ultrasound_frame(path).image
        np.testing.assert_array_equal(got, expected[1], err_msg=key)
    Image.fromarray(frame).save(tmp_path / "f.jpg", quality=100)  # lossy, but only slightly
    jpeg = load_ultrasound_frame(tmp_path / "f.jpg").image
    assert np.abs(jpeg - expected[1]).max() < 8 < np.abs(jpeg - expected[1][:, ::-1]).max()

    cines = {}
    # CAMUS-style MetaImage: a 3-D image whose z is time.
    sitk.WriteImage(sitk.GetImageFromArray(cine), str(cines.setdefault("mhd", tmp_path / "c.mhd")))
    sitk.WriteImage(sitk.GetImageFromArray(cine), str(cines.setdefault("mha", tmp_path / "c.mha")))
    nib.save(nib.Nifti1Image(cine.transpose(2, 1, 0).copy(), np.eye(4)),
             cines.setdefault("nii_xyt", tmp_path / "c_xyt.nii.gz"))
    nib.save(nib.Nifti1Image(cine.transpose(2, 1, 0)[:, :, None].copy(), np.eye(4)),
             cines.setdefault("nii_xy1t", tmp_path / "c_xy1t.nii.gz"))
    for name in ("dcm", "nii.gz", "mhd"):
        cines[f"ours_{name}"] = write_echo_cine(cine, tmp_path / f"ours.{name}")
    for key, path in cines.items():
        images, _ = _frames(load_ultrasound(path))
        np.testing.assert_array_equal(images, expected, err_msg=key)


# Colour -----------------------------------------------------------------------------------------

def test_rgb_dicom_to_grey_known_colours():
    path = _testdata("SC_rgb_rle_2frame.dcm")  # frame 0 starts with red rows, frame 1 cyan
    frames = load_ultrasound(path)
    assert len(frames) == 2 and frames[0].image.shape == (100, 100)
    assert frames[0].image[0, 0] == pytest.approx(0.299 * 255, abs=1e-3)
    assert frames[1].image[0, 0] == pytest.approx((0.587 + 0.114) * 255, abs=1e-3)
    np.testing.assert_allclose(frames[0].image, _luma(pydicom.dcmread(path).pixel_array[0]),
                               atol=1e-3)


@pytest.mark.parametrize(("name", "atol"), [
    ("SC_ybr_full_422_uncompressed.dcm", 1.0),  # YBR_FULL_422, native
    ("SC_rgb_jpeg_dcmtk.dcm", 2.5),  # YBR_FULL in JPEG baseline (lossy)
])
def test_ybr_dicom_gives_the_same_grey_as_rgb(name, atol):
    """A YBR file of the RGB test pattern: no missed or doubled colour conversion."""
    rgb = load_ultrasound_frame(_testdata("SC_rgb_rle_2frame.dcm")).image
    ybr = load_ultrasound_frame(_testdata(name)).image
    band = np.s_[2:8, 2:98]  # the red band, away from JPEG's ringing at the edges
    assert ybr[band].mean() == pytest.approx(rgb[band].mean(), abs=atol)
    np.testing.assert_allclose(ybr[::10, ::10], rgb[::10, ::10], atol=3 * atol)


def test_rgb_png_jpeg_metaimage_to_grey(tmp_path):
    colour = np.array([200, 30, 90], dtype=np.uint8)
    rgb = np.broadcast_to(colour, (6, 9, 3)).copy()
    rgb[0, 0] = (0, 0, 255)
    expected = _luma(rgb)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "ca.png")
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.mhd"))
    for name in ("c.png", "ca.png", "c.mhd"):
        np.testing.assert_allclose(load_ultrasound_frame(tmp_path / name).image, expected,
                                   atol=1e-4, err_msg=name)
    jpeg = load_ultrasound_frame(tmp_path / "c.jpg").image
    assert jpeg[3:, 3:].mean() == pytest.approx(_luma(colour), abs=2.0)


def test_ultrasound_dicom_ybr_cine():
    path = _testdata("examples_ybr_color.dcm")  # US, 30 frames, JPEG YBR_FULL_422
    first, last = load_ultrasound(path, frames=[0, 29])
    assert first.image.shape == (240, 320) and (first.frame, last.frame) == (0, 29)
    assert first.spacing == pytest.approx((0.5105, 0.5105), abs=1e-4)  # ultrasound region, cm
    ds = pydicom.dcmread(path)
    rgb, meta = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=29, as_rgb=True)
    assert meta["photometric_interpretation"] == "RGB"
    # Y is the luma itself; going through RGB clips a few dark, chroma-noisy pixels at 0.
    diff = np.abs(last.image - _luma(rgb))
    assert diff.mean() < 0.3 and np.mean(diff < 1.5) > 0.99
    with _raises(ValueError, path, "frame 30 is out of range"):
        load_ultrasound(path, frames=30)


def test_single_frame_grey_dicom():
    path = _testdata("CT_small.dcm")
    frame = load_ultrasound_frame(path)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(frame.image, apply_modality_lut(ds.pixel_array, ds))
    assert frame.image.dtype == np.float32 and frame.mask is None and frame.frame == 0
    assert frame.spacing == pytest.approx((0.661468, 0.661468))


def test_dicom_without_suffix(tmp_path):
    path = tmp_path / "IM0001"
    shutil.copy(_testdata("CT_small.dcm"), path)
    assert load_ultrasound_frame(path).image.shape == (128, 128)


# Frame selection --------------------------------------------------------------------------------

def test_frame_selection_by_index_and_name(phantom, written):
    path, mask = written["dicom"].images[0], written["dicom"].masks[0]
    names = phantom.frame_names
    ed, es = load_ultrasound(path, mask, frames=("ED", "ES"), frame_names=names)
    assert (ed.frame, ed.frame_name, es.frame, es.frame_name) == (0, "ED", phantom.es, "ES")
    assert ed.mask.sum() > es.mask.sum()
    np.testing.assert_array_equal(es.image, phantom.as_uint8()[phantom.es])
    picked = load_ultrasound(path, frames=[5, 0, 5])
    assert [f.frame for f in picked] == [5, 0, 5]
    assert load_ultrasound_frame(path, frame="es", frame_names=names).frame == phantom.es
    assert load_ultrasound_frame(path, frame=phantom.es, frame_names=names).frame_name == "ES"
    assert resolve_frames("all", 3, {"ED": 2}) == [(0, None), (1, None), (2, "ED")]
    with _raises(ValueError, path, "frame 8 is out of range: the file has 8 frame(s)"):
        load_ultrasound(path, frames=[0, 8])
    with _raises(ValueError, path, "out of range"):
        load_ultrasound(path, frames=-1)
    with _raises(ValueError, path, "unknown frame name 'MID'; known names: ED, ES"):
        load_ultrasound(path, frames="MID", frame_names=names)
    with _raises(ValueError, path, "no frame names were given"):
        load_ultrasound(path, frames="ED")
    with _raises(ValueError, path, "frame 'ES' = 40 is out of range"):
        load_ultrasound(path, frames="ES", frame_names={"ES": 40})
    with _raises(ValueError, path, "no frames selected"):
        load_ultrasound(path, frames=[])


# Masks ------------------------------------------------------------------------------------------

def test_single_frame_mask_pairs_with_one_selected_frame(phantom, written, tmp_path):
    cine = written["nifti"].images[0]
    ed_mask = write_echo_cine(phantom.masks[0] * 255, tmp_path / "ed_mask.png")  # 0/255
    frame = load_ultrasound_frame(cine, ed_mask, frame="ED", frame_names=phantom.frame_names)
    np.testing.assert_array_equal(frame.mask, phantom.masks[0])
    with _raises(ValueError, ed_mask, "mask has 1 frame(s)"):
        load_ultrasound(cine, ed_mask)


def test_multilabel_mask_needs_a_label_value(tmp_path, phantom, written):
    labels = phantom.masks[:, :, :].astype(np.uint8)  # 1 = cavity, 2 = myocardium, 3 = elsewhere
    labels[(labels == 0) & phantom.sector] = 3
    labels[:, 20:24, 10:14] = 2
    path = tmp_path / "gt.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    image = written["mhd"].images[0]
    with _raises(ValueError, path, "mask is not binary: values 0, 1, 2, 3; pass label_value"):
        load_ultrasound(image, path)
    _, masks = _frames(load_ultrasound(image, path, label_value=2))
    np.testing.assert_array_equal(masks, (labels == 2).astype(np.uint8))
    with _raises(ValueError, path, "label value 7 does not occur"):
        load_ultrasound(image, path, label_value=7)
    fuzzy = tmp_path / "fuzzy.nii.gz"
    nib.save(nib.Nifti1Image(np.full((64, 48, 1, 8), 0.5, np.float32), np.eye(4)), fuzzy)
    with _raises(ValueError, fuzzy, "non-integer values"):
        load_ultrasound(written["nifti"].images[0], fuzzy)


def test_jpeg_mask_is_binarised_at_128(phantom, written, tmp_path):
    path = write_echo_cine(phantom.masks[0] * 255, tmp_path / "mask.jpg")
    mask = load_ultrasound_frame(written["png"].images[0], path).mask
    assert set(np.unique(mask)) == {0, 1}
    assert np.count_nonzero(mask != phantom.masks[0]) <= 0.01 * mask.size
    with _raises(ValueError, path, "binarised at 128"):
        load_ultrasound_frame(written["png"].images[0], path, label_value=1)


# Bad input --------------------------------------------------------------------------------------

def test_missing_unsupported_and_corrupt_files(tmp_path, written):
    missing = tmp_path / "nope.dcm"
    with _raises(FileNotFoundError, missing, "not found"):
        load_ultrasound(missing)
    with _raises(FileNotFoundError, missing, "not found"):
        load_ultrasound(written["png"].images[0], missing)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with _raises(ValueError, text, "unsupported file type '.txt'"):
        load_ultrasound(text)
    raw = tmp_path / "echo.raw"
    raw.write_bytes(b"\0" * 16)
    with _raises(ValueError, raw, "open the .mhd header"):
        load_ultrasound(raw)
    for name, kind in [("bad.dcm", "DICOM"), ("bad.nii.gz", "NIfTI"), ("bad.mhd", "MetaImage"),
                       ("bad.png", "PNG"), ("bad.jpg", "JPEG")]:
        bad = tmp_path / name
        bad.write_bytes(b"garbage " * 40)
        with _raises(ValueError, bad, f"not a readable {kind}"):
            load_ultrasound(bad)
    good = written["nifti"].images[0].read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with _raises(ValueError, truncated, "not a readable NIfTI"):
        load_ultrasound(truncated)
    with _raises(ValueError, "MR_truncated.dcm", "cannot decode frame 0"):
        load_ultrasound(_testdata("MR_truncated.dcm"))
    with _raises(ValueError, "rtplan.dcm", "no pixel data"):
        load_ultrasound(_testdata("rtplan.dcm"))


def test_volumes_are_rejected(tmp_path, asymmetric):
    volume = tmp_path / "ct.nii.gz"  # real z: voxel size 2.5 along the third axis
    nib.save(nib.Nifti1Image(np.zeros((7, 5, 4), np.int16), np.diag([0.8, 0.8, 2.5, 1])), volume)
    with _raises(ValueError, volume, "3D volume"):
        load_ultrasound(volume)
    assert len(load_ultrasound(volume, third_axis="time")) == 4
    sliced = tmp_path / "sliced.nii"
    img = nib.Nifti1Image(np.zeros((7, 5, 4), np.int16), np.eye(4))
    img.header.set_dim_info(slice=2)
    nib.save(img, sliced)
    with _raises(ValueError, sliced, "slice axis"):
        load_ultrasound(sliced)
    both = tmp_path / "volume_t.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((7, 5, 3, 2), np.int16), np.eye(4)), both)
    with _raises(ValueError, both, "z = 3 and 2 time points"):
        load_ultrasound(both)
    with _raises(ValueError, "rtdose.dcm", "Grid Frame Offset Vector: this is a 3D volume"):
        load_ultrasound(_testdata("rtdose.dcm"))
    camus = write_echo_cine(asymmetric, tmp_path / "cine.mhd")
    assert len(load_ultrasound(camus)) == 3
    with _raises(ValueError, camus, "3D volume"):
        load_ultrasound(camus, third_axis="space")


def test_mask_shape_mismatch(written, phantom, tmp_path):
    small = write_echo_cine(phantom.masks[:, :40], tmp_path / "small.nii.gz")
    image = written["nifti"].images[0]
    with _raises(ValueError, small, f"mask frames are 40×64 but the frames of {image} are 48×64"):
        load_ultrasound(image, small)
    short = write_echo_cine(phantom.masks[:3], tmp_path / "short.dcm")
    with _raises(ValueError, short, "mask has 3 frame(s) but"):
        load_ultrasound(written["dicom"].images[0], short)


# MONAI transforms -------------------------------------------------------------------------------

def test_dictionary_transform_one_and_several_frames(phantom, written):
    files = written["dicom"]
    data = {"image": files.images[0], "label": files.masks[0], "frame_names": phantom.frame_names,
            "case": "p1"}
    one = LoadUltrasoundFramesd(keys=("image", "label"), frames="ES")(data)
    assert one["image"].shape == one["label"].shape == (1, 48, 64)
    assert one["image"].dtype == np.float32 and one["label"].dtype == np.uint8
    np.testing.assert_array_equal(one["label"][0], phantom.masks[phantom.es])
    meta = one["image_meta_dict"]
    assert meta["source"] == str(files.images[0]) and meta["frame"] == phantom.es
    assert meta["frame_name"] == "ES" and one["case"] == "p1"
    np.testing.assert_allclose(meta["spacing"], SPACING)
    assert one["label_meta_dict"]["source"] == str(files.masks[0])

    pipeline = Compose([LoadUltrasoundFramesd(frames=("ED", "ES")),
                        EnsureTyped(("image", "label"))])
    pair = pipeline(data)
    assert isinstance(pair, list) and len(pair) == 2
    batch = list_data_collate(pair)
    assert tuple(batch["image"].shape) == (2, 1, 48, 64)
    assert batch["image_meta_dict"]["frame_name"] == ["ED", "ES"]
    assert batch["label"].sum() > 0
    every = LoadUltrasoundFramesd(keys="image")({"image": written["png"].images[2]})
    assert len(every) == 1 and every[0]["image_meta_dict"]["frame_name"] == ""
    assert np.isnan(every[0]["image_meta_dict"]["spacing"]).all()
    assert list_data_collate(every)["image"].shape[0] == 1
    with pytest.raises(KeyError, match="mask key 'label'"):
        LoadUltrasoundFramesd(frames=0)({"image": files.images[0]})
    alone = LoadUltrasoundFramesd(frames=0, allow_missing_keys=True)({"image": files.images[0]})
    assert "label" not in alone
    with pytest.raises(ValueError, match="exactly one image key"):
        LoadUltrasoundFramesd(keys=("image", "label"), mask_keys=())


def test_array_transform(phantom, written):
    path = written["mhd"].images[0]
    frames = LoadUltrasoundFrames(frames=["ES", 0])(path, frame_names=phantom.frame_names)
    assert frames.shape == (2, 48, 64) and frames.dtype == np.float32
    np.testing.assert_array_equal(frames, phantom.as_uint8()[[phantom.es, 0]])
    masks = LoadUltrasoundFrames(mask=True)(written["mhd"].masks[0])
    assert masks.shape == (8, 48, 64) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, phantom.masks)
