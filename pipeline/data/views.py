"""Axial, coronal and sagittal 2-D sets of a RAS-oriented volume, and their exact inverse.

In a RAS-oriented X×Y×Z array (x → patient Right, y → Anterior, z → Superior) the 2-D images
use the radiological display convention, so that what the model sees is what a reader sees:

* axial (fixed z): rows anterior → posterior, columns patient right → left;
* coronal (fixed y): rows superior → inferior, columns patient right → left;
* sagittal (fixed x): rows superior → inferior, columns anterior → posterior.

Each 2-D sample carries a 4×4 affine mapping (row, column, 0) to world RAS mm, so a prediction
can be put back without knowing this convention.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = [
    "VIEWS",
    "SliceView",
    "SliceViewsd",
    "restack_slices",
    "slice_affine",
    "slice_axis",
    "slice_volume",
]

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
# view → (slice axis, row axis, column axis) of the X×Y×Z array; rows and columns run backwards
_LAYOUT: dict[str, tuple[int, int, int]] = {
    "axial": (2, 1, 0),
    "coronal": (1, 2, 0),
    "sagittal": (0, 2, 1),
}


def _check_view(view: str) -> tuple[int, int, int]:
    if view not in _LAYOUT:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return _LAYOUT[view]


def slice_axis(view: str) -> int:
    """The axis of an X×Y×Z RAS array a view's slices are stacked along (axial: 2, coronal: 1,
    sagittal: 0)."""
    return _check_view(view)[0]


def check_ras(affine, source: str = "volume") -> None:
    """Raises ValueError unless the affine's axes point to R, A, S (orient to RAS first)."""
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    if codes != ("R", "A", "S"):
        raise ValueError(f"{source}: volume axes are {''.join(codes)}; orient it to RAS first "
                         f"(monai.transforms.Orientationd(axcodes='RAS'))")


def slice_volume(volume, view: str) -> np.ndarray:
    """Cuts a C×X×Y×Z RAS volume into its 2-D images along one view.

    Args:
        volume: C×X×Y×Z array or tensor.
        view: ``axial``, ``coronal`` or ``sagittal``.

    Returns:
        N×C×H×W array, N the size of the volume along the view's slice axis.
    """
    s, r, c = _check_view(view)
    arr = np.asarray(volume)
    if arr.ndim != 4:
        raise ValueError(f"expected a C×X×Y×Z volume, got shape {arr.shape}")
    moved = np.moveaxis(arr, (1 + s, 1 + r, 1 + c), (1, 2, 3))  # C×S×R×Col
    return np.ascontiguousarray(moved[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def restack_slices(slices, view: str) -> np.ndarray:
    """Exact inverse of :func:`slice_volume`: N×C×H×W images of one view → C×X×Y×Z."""
    s, r, c = _check_view(view)
    arr = np.asarray(slices)
    if arr.ndim != 4:
        raise ValueError(f"expected N×C×H×W slices, got shape {arr.shape}")
    moved = arr.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    return np.ascontiguousarray(np.moveaxis(moved, (1, 2, 3), (1 + s, 1 + r, 1 + c)))


def slice_affine(volume_affine, volume_shape: Sequence[int], view: str, index: int
                 ) -> np.ndarray:
    """4×4 affine mapping (row, column, 0, 1) of one 2-D image to world RAS mm.

    Args:
        volume_affine: the RAS volume's voxel-to-world affine.
        volume_shape: (X, Y, Z).
        view: the view.
        index: the slice index along the view's slice axis.
    """
    s, r, c = _check_view(view)
    shape = tuple(int(n) for n in volume_shape)[-3:]
    to_voxel = np.zeros((4, 4))
    to_voxel[r, 0] = -1.0
    to_voxel[c, 1] = -1.0
    to_voxel[s, 2] = 1.0
    to_voxel[r, 3] = shape[r] - 1
    to_voxel[c, 3] = shape[c] - 1
    to_voxel[s, 3] = index
    to_voxel[3, 3] = 1.0
    return np.asarray(volume_affine, dtype=np.float64) @ to_voxel


class SliceView(Transform):
    """Array transform: C×X×Y×Z RAS volume → N×C×H×W images of one view."""

    def __init__(self, view: str) -> None:
        _check_view(view)
        self.view = view

    def __call__(self, volume) -> np.ndarray:
        affine = getattr(volume, "affine", None)
        if affine is not None:
            check_ras(affine)
        return slice_volume(volume, self.view)


class SliceViewsd(MapTransform):
    """Dictionary transform: one volume → a list of 2-D samples of the chosen views.

    Each sample holds the 2-D ``keys`` (C×H×W float tensors) and ``source`` (the volume's id),
    ``view``, ``slice`` (index along the view's axis), ``affine`` (2-D → world, see
    :func:`slice_affine`), ``volume_affine``, ``volume_shape`` and, when ``label_key`` is
    present, ``label_empty``. MONAI's ``Compose`` maps later transforms over the list.

    Args:
        keys: the volumes to slice (same grid), e.g. ("image", "label").
        views: which views to produce.
        label_key: the key whose emptiness is recorded.
        source_key: the key holding the volume's id (default: the image's file name).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), views: Sequence[str] = VIEWS,
                 label_key: str = "label", source_key: str = "source",
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        for view in views:
            _check_view(view)
        self.views = tuple(views)
        self.label_key = label_key
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict]:
        keys = list(self.key_iterator(data))
        if not keys:
            raise ValueError(f"none of the keys {self.keys} is in the sample")
        ref = data[keys[0]]
        affine = np.asarray(getattr(ref, "affine", np.eye(4)), dtype=np.float64)
        check_ras(affine, self._source(data, keys[0]))
        shape = tuple(ref.shape[-3:])
        for key in keys[1:]:
            if tuple(data[key].shape[-3:]) != shape:
                raise ValueError(f"{key} has grid {tuple(data[key].shape[-3:])}, {keys[0]} has "
                                 f"{shape}; align them first (AlignLabeld)")
        source = self._source(data, keys[0])
        out = []
        for view in self.views:
            cut = {key: slice_volume(np.asarray(data[key]), view) for key in keys}
            for index in range(len(cut[keys[0]])):
                sample = {key: torch.as_tensor(cut[key][index]) for key in keys}
                sample.update(source=source, view=view, slice=index,
                              affine=slice_affine(affine, shape, view, index),
                              volume_affine=affine, volume_shape=np.asarray(shape))
                if self.label_key in cut:
                    sample["label_empty"] = not bool(np.any(cut[self.label_key][index]))
                out.append(sample)
        return out

    def _source(self, data: Mapping, key: Hashable) -> str:
        if self.source_key in data:
            return str(data[self.source_key])
        meta = getattr(data[key], "meta", {}) or {}
        return str(meta.get("filename_or_obj", "volume"))
