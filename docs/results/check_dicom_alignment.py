"""Is the mask ``mmcrf infer`` wrote for the shared DICOM series on the series' own grid?

Compares the mask's geometry with SimpleITK's reading of the series (size, spacing, origin,
direction, and the voxel → RAS affine built from them) and with the LAS-stored segmentation
that ships with the series (canonical shape and affine; and a feature: through the affines,
its organ voxels must fall inside the series' body outline, HU > -500 with holes filled per
slice, on the mask's grid). Prints JSON.

Run from the repository root::

    .venv/bin/python docs/results/check_dicom_alignment.py --data ../shared/data \\
        --mask ../runs/heart_ct/infer_dicom/ct_dicom_series_mask.nii.gz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.data.alignment import resample_to_grid
from pipeline.data.readers import read_volume

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the tests' geometry oracle, shared with the realdata test

from tests.oracles.geometry import sitk_ras_affine  # noqa: E402


def check(data: Path, mask_path: Path) -> dict:
    """The comparisons, as a JSON-able dict."""
    folder = data / "ct_dicom_series"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    series = reader.Execute()
    ours = sitk.ReadImage(str(mask_path))
    mask = nib.load(mask_path)

    def geometry(image: sitk.Image) -> dict:
        return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())}

    seg = nib.load(data / "ct_dicom_series_seg" / "example_seg_dicom.nii.gz")
    seg_ras, mask_ras = nib.as_closest_canonical(seg), nib.as_closest_canonical(mask)
    hu = read_volume(folder).numpy()
    body = np.stack([ndimage.binary_fill_holes(hu[..., k] > -500) for k in range(hu.shape[2])],
                    axis=-1)
    organs = np.asarray(seg.dataobj) > 0
    on_grid = resample_to_grid(organs.astype(np.uint8), seg.affine, mask.affine, mask.shape)
    return {
        "series_simpleitk": geometry(series),
        "mask_simpleitk": geometry(ours),
        "max_abs_difference": {
            "spacing": float(np.max(np.abs(np.subtract(ours.GetSpacing(),
                                                       series.GetSpacing())))),
            "origin_mm": float(np.max(np.abs(np.subtract(ours.GetOrigin(),
                                                         series.GetOrigin())))),
            "direction": float(np.max(np.abs(np.subtract(ours.GetDirection(),
                                                         series.GetDirection())))),
            "mask_affine_vs_simpleitk_ras_affine": float(np.max(np.abs(
                mask.affine - sitk_ras_affine(series)))),
            "canonical_affine_mask_vs_las_seg": float(np.max(np.abs(seg_ras.affine
                                                                    - mask_ras.affine))),
        },
        "axes": {"mask": "".join(nib.aff2axcodes(mask.affine)),
                 "seg": "".join(nib.aff2axcodes(seg.affine))},
        "canonical_shapes_equal": seg_ras.shape == mask_ras.shape,
        "seg_organ_voxels": int(organs.sum()),
        "seg_organ_voxels_on_mask_grid": int(on_grid.sum()),
        "organ_fraction_inside_body_through_affines": float(body[on_grid > 0].mean()),
        "organ_fraction_inside_body_if_las_taken_for_lps": float(body[organs].mean()),
        "mask_foreground_voxels": int(np.asarray(mask.dataobj).astype(bool).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("MMCRF_SHARED_DATA",
                                                         str(REPO.parent / "shared" / "data")))
    parser.add_argument("--mask", default=str(REPO.parent / "runs" / "heart_ct" / "infer_dicom"
                                              / "ct_dicom_series_mask.nii.gz"))
    args = parser.parse_args(argv)
    print(json.dumps(check(Path(args.data), Path(args.mask)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
