"""CTA volumes → per-view 2-D sets: load, align label, orient to RAS, resample, window, slice."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from pipeline.data.alignment import AlignLabeld
from pipeline.data.readers import read_volume
from pipeline.data.views import VIEWS, SliceViewsd

__all__ = [
    "CTA_HU_WINDOW",
    "LoadVolumed",
    "cta_slice_transforms",
    "cta_volume_transforms",
    "run_transforms",
    "slice_datalist",
]

#: Default CT window for contrast-enhanced cardiac CT (level 300, width 1000 HU).
CTA_HU_WINDOW: tuple[float, float] = (-200.0, 800.0)


class LoadVolumed(MapTransform):
    """Loads NIfTI files or DICOM series folders as channel-first 1×X×Y×Z MetaTensors.

    Paths are taken relative to ``root`` when given. The volume's id (``source``) is set from
    the first key's path unless the sample already has one.

    Args:
        keys: keys holding paths, e.g. ("image", "label").
        root: data root that relative paths are resolved against.
        series_uid: DICOM series to pick in folders holding several.
        allow_missing_keys: skip absent keys (e.g. no label at inference).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), root: str | None = None,
                 series_uid: str | None = None, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.root = None if root in (None, "") else Path(root)
        self.series_uid = series_uid

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for i, key in enumerate(self.key_iterator(d)):
            path = Path(os.fspath(d[key]))
            if self.root is not None and not path.is_absolute():
                path = self.root / path
            if i == 0:
                d.setdefault("source", str(data[key]))
            d[key] = read_volume(path, series_uid=self.series_uid)[None]
        return d


def cta_volume_transforms(*, keys: Sequence[str] = ("image", "label"), root: str | None = None,
                          hu_window: tuple[float, float] | None = CTA_HU_WINDOW,
                          spacing: float | Sequence[float] | None = None,
                          label_value: int | None = None, allow_crop: bool = False,
                          series_uid: str | None = None) -> Compose:
    """Volume preprocessing: load, put the label on the image grid, orient to RAS, optionally
    resample, and window HU to [0, 1].

    Args:
        keys: (image key, label key); the label may be absent from a sample.
        root: data root for relative paths.
        hu_window: (low, high) HU mapped to [0, 1] with clipping; None leaves intensities.
        spacing: isotropic voxel size in mm (a number) or per-axis sizes; None keeps the grid.
        label_value: foreground value in multi-label maps (None: the label must be binary).
        allow_crop: accept label foreground outside the image grid (dropped).
        series_uid: DICOM series to pick in folders holding several.

    Returns:
        A MONAI ``Compose``.
    """
    image_key, label_key = keys[0], keys[1]
    transforms: list = [
        LoadVolumed(keys, root=root, series_uid=series_uid),
        AlignLabeld(label_key, ref_key=image_key, label_value=label_value,
                    allow_crop=allow_crop, allow_missing_keys=True),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")),
                     allow_missing_keys=True),
    ]
    if spacing is not None:
        pixdim = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(spacing)
        transforms.append(Spacingd(keys, pixdim=pixdim, mode=("bilinear", "nearest"),
                                   allow_missing_keys=True))
    if hu_window is not None:
        low, high = hu_window
        if not high > low:
            raise ValueError(f"hu_window must be (low, high) with high > low, got {hu_window}")
        transforms.append(ScaleIntensityRanged(image_key, a_min=low, a_max=high, b_min=0.0,
                                               b_max=1.0, clip=True))
    return Compose(transforms)


def cta_slice_transforms(views: Sequence[str] = VIEWS, **kwargs) -> Compose:
    """:func:`cta_volume_transforms` followed by slicing into the chosen views (a list of 2-D
    samples per volume)."""
    keys = kwargs.get("keys", ("image", "label"))
    return Compose([cta_volume_transforms(**kwargs),
                    SliceViewsd(keys, views=views, label_key=keys[1])])


def run_transforms(transform, data):
    """Applies a MONAI transform, re-raising the ValueError/FileNotFoundError that MONAI wraps
    in ``RuntimeError("applying transform ...")``, so users see which file is wrong and why."""
    try:
        return transform(data)
    except RuntimeError as err:
        cause: BaseException = err
        while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        raise


def slice_datalist(datalist: Sequence[Mapping], views: Sequence[str] = VIEWS, **kwargs
                   ) -> list[dict]:
    """Runs :func:`cta_slice_transforms` over a datalist of volumes and flattens the slices.

    Args:
        datalist: entries like ``{"image": path, "label": path}`` (optionally ``source``).
        views: views to produce.
        **kwargs: passed to :func:`cta_volume_transforms`.

    Returns:
        All 2-D samples, volume by volume, view by view, slice by slice.
    """
    pipeline = cta_slice_transforms(views, **kwargs)
    out: list[dict] = []
    for entry in datalist:
        out.extend(run_transforms(pipeline, dict(entry)))
    return out
