"""Where data enters: readers, label alignment, view slicing, manifests and phantoms."""

from __future__ import annotations

from pipeline.data.alignment import AlignLabel, AlignLabeld, align_label_to_image, binarize_label
from pipeline.data.cta import (
    CTA_HU_WINDOW,
    LoadVolumed,
    SliceSplit,
    cta_slice_transforms,
    cta_volume_transforms,
    run_transforms,
    select_slices,
    slice_datalist,
)
from pipeline.data.datasets.horse import (
    BrokenImageError,
    LoadHorsed,
    horse_datalist,
    horse_split,
    load_horse,
    load_horse_manifest,
    scan_horse_folder,
    write_horse_manifest,
)
from pipeline.data.phantoms import (
    CTAPhantom,
    NoisyBlocks,
    cta_phantom,
    noisy_blocks,
    write_cta_phantom,
)
from pipeline.data.readers import DicomSeriesReader, find_dicom_series, is_nifti, read_volume
from pipeline.data.splits import read_split
from pipeline.data.ultrasound import (
    LoadUltrasoundFrames,
    LoadUltrasoundFramesd,
    UltrasoundFrame,
    load_ultrasound,
    load_ultrasound_frame,
)
from pipeline.data.views import (
    VIEWS,
    SliceView,
    SliceViewsd,
    restack_slices,
    slice_affine,
    slice_volume,
)
from pipeline.data.writers import write_dicom_series, write_nifti

__all__ = [
    "CTA_HU_WINDOW",
    "VIEWS",
    "AlignLabel",
    "AlignLabeld",
    "BrokenImageError",
    "CTAPhantom",
    "DicomSeriesReader",
    "LoadHorsed",
    "LoadUltrasoundFrames",
    "LoadUltrasoundFramesd",
    "LoadVolumed",
    "NoisyBlocks",
    "SliceSplit",
    "SliceView",
    "SliceViewsd",
    "UltrasoundFrame",
    "align_label_to_image",
    "binarize_label",
    "cta_phantom",
    "cta_slice_transforms",
    "cta_volume_transforms",
    "find_dicom_series",
    "horse_datalist",
    "horse_split",
    "is_nifti",
    "load_horse",
    "load_horse_manifest",
    "load_ultrasound",
    "load_ultrasound_frame",
    "noisy_blocks",
    "read_split",
    "read_volume",
    "restack_slices",
    "run_transforms",
    "scan_horse_folder",
    "select_slices",
    "slice_affine",
    "slice_datalist",
    "slice_volume",
    "write_cta_phantom",
    "write_dicom_series",
    "write_horse_manifest",
    "write_nifti",
]
