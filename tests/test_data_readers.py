"""Volume readers on real files written to disk: NIfTI, DICOM series (plain and JPEG 2000)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless

from pipeline.data import find_dicom_series, read_volume, write_cta_phantom, write_nifti


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    return write_cta_phantom(tmp_path_factory.mktemp("cta"), rng=3, shape=(40, 36, 24))


def _sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.diag([-1, -1, 1, 1]) @ affine_lps


def test_dicom_series_equals_same_data_as_nifti(phantom_files):
    nifti = read_volume(phantom_files["image"])
    dicom = read_volume(phantom_files["dicom"])
    assert nifti.shape == dicom.shape == (40, 36, 24)
    np.testing.assert_array_equal(nifti.numpy(), dicom.numpy())
    np.testing.assert_allclose(nifti.affine.numpy(), dicom.affine.numpy(), atol=1e-5)


def test_dicom_series_matches_simpleitk(phantom_files):
    ours = read_volume(phantom_files["dicom"])
    data, affine = _sitk_series(phantom_files["dicom"])
    np.testing.assert_array_equal(ours.numpy(), data)
    np.testing.assert_allclose(ours.affine.numpy(), affine, atol=1e-5)


def test_slice_order_does_not_depend_on_file_names(phantom_files, tmp_path):
    folder = tmp_path / "shuffled"
    folder.mkdir()
    files = sorted(phantom_files["dicom"].iterdir())
    for i, f in enumerate(reversed(files)):  # names now run against the slice positions
        shutil.copy(f, folder / f"img{i:03d}")
    (folder / "notes.txt").write_text("not DICOM, ignored")
    np.testing.assert_array_equal(read_volume(folder).numpy(),
                                  read_volume(phantom_files["dicom"]).numpy())


def test_jpeg2000_series_decodes_losslessly(phantom_files, tmp_path):
    folder = tmp_path / "j2k"
    folder.mkdir()
    for f in sorted(phantom_files["dicom"].iterdir()):
        ds = pydicom.dcmread(f)
        ds.compress(JPEG2000Lossless, ds.pixel_array)
        ds.save_as(folder / f.name)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(read_volume(folder).numpy(),
                                  read_volume(phantom_files["dicom"]).numpy())


def test_folder_with_two_series_is_refused_with_their_uids(phantom_files, tmp_path):
    folder = tmp_path / "two"
    shutil.copytree(phantom_files["dicom"], folder)
    uids = set()
    for f in sorted(folder.iterdir())[:5]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.1"
        ds.save_as(f)
    uids = set(find_dicom_series(folder))
    assert len(uids) == 2
    with pytest.raises(ValueError, match="holds 2 DICOM series") as err:
        read_volume(folder)
    assert all(uid in str(err.value) for uid in uids)
    chosen = read_volume(folder, series_uid="1.2.826.0.1.3680043.99.1")
    assert chosen.shape[-1] == 5


def test_corrupt_and_unsupported_inputs_name_the_file(phantom_files, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(phantom_files["dicom"], folder)
    victim = sorted(folder.iterdir())[3]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])  # an interrupted copy: pixel data cut short
    with pytest.raises(ValueError, match=f"{victim.name}: cannot decode pixel data"):
        read_volume(folder)
    victim.write_bytes(data[:400])  # cut inside the header
    with pytest.raises(ValueError, match=f"{victim.name}: DICOM image without"):
        read_volume(folder)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: unreadable volume"):
        read_volume(broken)
    with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz"):
        read_volume(tmp_path / "missing.nii.gz")
    other = tmp_path / "scan.mha"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"scan\.mha: unsupported volume format"):
        read_volume(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no DICOM image files"):
        read_volume(empty)


def test_two_dimensional_inputs_are_refused(tmp_path):
    flat = write_nifti(np.zeros((16, 12), np.int16), np.eye(4), tmp_path / "flat.nii.gz")
    with pytest.raises(ValueError, match=r"flat\.nii\.gz: a 3-D volume is needed"):
        read_volume(flat)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), single / "ct.dcm")
    with pytest.raises(ValueError, match="a 3-D volume is needed"):
        read_volume(single)
    assert read_volume(single, require_3d=False).shape == (128, 128, 1)


def test_nibabel_shipped_volume_keeps_its_affine():
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    ours = read_volume(path)
    ref = nib.load(path)
    assert tuple(ours.shape) == ref.shape[:3]
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine, atol=1e-6)
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref.dataobj)[..., :ours.shape[2]],
                               rtol=1e-6)
