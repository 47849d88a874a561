"""Putting a label on its image's grid through the two affines (nearest neighbour), loudly."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from scipy import ndimage

__all__ = ["AlignLabel", "AlignLabeld", "align_label_to_image", "binarize_label",
           "resample_to_grid"]


def _affine(x: MetaTensor, name: str) -> np.ndarray:
    affine = getattr(x, "affine", None)
    if affine is None:
        raise ValueError(f"{name} carries no affine; load it with pipeline.data.read_volume")
    return np.asarray(affine, dtype=np.float64)


def _source(x: MetaTensor) -> str:
    meta = getattr(x, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "<array>"))


def binarize_label(label: np.ndarray, *, source: str = "label", value: int | None = None
                   ) -> np.ndarray:
    """Returns a uint8 {0,1} mask.

    Args:
        label: the label array.
        source: file name used in error messages.
        value: for a multi-label map, the label value that is foreground; None requires the
            label to be binary already.

    Raises:
        ValueError: the label is not binary (and no value was given) or not finite.
    """
    arr = np.asarray(label)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{source}: label contains NaN or infinite values")
    if value is not None:
        return (arr == value).astype(np.uint8)
    values = np.unique(arr)
    if not np.all(np.isin(values, (0, 1))):
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (" ..." if len(values) > 8 else "")
        raise ValueError(f"{source}: label is not binary (values {shown}); pass the foreground "
                         f"label value to select one structure")
    return arr.astype(np.uint8)


def resample_to_grid(array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray,
                     dst_shape: tuple[int, ...], *, order: int = 0) -> np.ndarray:
    """Resamples a 3-D array from one voxel grid to another through their world affines.

    Destination voxel v samples the source at A_src⁻¹·A_dst·v (outside: 0).

    Args:
        array: X×Y×Z source data.
        src_affine, dst_affine: 4×4 voxel → world affines.
        dst_shape: destination X×Y×Z.
        order: 0 nearest neighbour (masks), 1 linear (probabilities).
    """
    mapping = np.linalg.solve(np.asarray(src_affine, np.float64),
                              np.asarray(dst_affine, np.float64))
    moved = _move_axes(np.asarray(array), mapping, tuple(dst_shape))
    if moved is not None:
        return moved
    return ndimage.affine_transform(np.asarray(array), mapping[:3, :3], offset=mapping[:3, 3],
                                    output_shape=tuple(dst_shape), order=order,
                                    mode="constant", cval=0)


def _move_axes(array: np.ndarray, mapping: np.ndarray, dst_shape: tuple[int, ...]
               ) -> np.ndarray | None:
    """:func:`resample_to_grid` where the voxel mapping only permutes and flips axes and
    shifts by whole voxels (a reorientation, such as to and from RAS): every destination
    voxel then sits exactly on a source voxel, so the result is the source's voxels moved,
    with no interpolation (the same at any order, and far faster). None for any other
    mapping."""
    linear, shift = mapping[:3, :3], mapping[:3, 3]
    signs = np.rint(linear)
    steps = np.rint(shift)
    if (not np.allclose(linear, signs, rtol=0.0, atol=1e-6)
            or not np.allclose(shift, steps, rtol=0.0, atol=1e-4)
            or not np.array_equal(np.abs(signs).sum(axis=0), np.ones(3))
            or not np.array_equal(np.abs(signs).sum(axis=1), np.ones(3))):
        return None
    out = np.zeros(dst_shape, dtype=array.dtype)
    # destination axis j reads source axis i = axes[j] at index sign·v + step
    axes = [int(np.flatnonzero(signs[:, j])[0]) for j in range(3)]
    dst_box, src_box = [], []
    for j, i in enumerate(axes):
        sign, step, n_src = int(signs[i, j]), int(steps[i]), array.shape[i]
        if sign > 0:  # source index step + v, v in [0, dst): keep those in [0, n_src)
            first, stop = max(0, -step), min(dst_shape[j], n_src - step)
        else:  # source index step − v
            first, stop = max(0, step - n_src + 1), min(dst_shape[j], step + 1)
        if stop <= first:
            return out  # no destination voxel lands inside the source
        dst_box.append(slice(first, stop))
        start = step + sign * first
        end = step + sign * stop  # one past the last index read, in the step's direction
        src_box.append(slice(start, end if end >= 0 else None, sign))
    out[tuple(dst_box)] = array.transpose(axes)[tuple(src_box)]
    return out


def align_label_to_image(label: MetaTensor, image: MetaTensor, *, allow_crop: bool = False
                         ) -> MetaTensor:
    """Resamples a binary label onto its image's voxel grid (nearest neighbour, through both
    affines); returns it unchanged (as uint8) when the grids already match.

    Args:
        label: X'×Y'×Z' (or 1×X'×Y'×Z') binary label with its affine.
        image: X×Y×Z (or C×X×Y×Z) image with its affine.
        allow_crop: accept label voxels that fall outside the image (they are dropped);
            otherwise losing any foreground is an error.

    Returns:
        The label on the image grid, with the image's affine, same channel layout as given.

    Raises:
        ValueError: the label does not overlap the image, or foreground would be lost.
    """
    lab_aff, img_aff = _affine(label, "label"), _affine(image, "image")
    channel = label.ndim == 4
    lab = np.asarray(label[0] if channel else label)
    img_shape = tuple(image.shape[-3:])
    name = _source(label)
    if lab.shape == img_shape and np.allclose(lab_aff, img_aff, atol=1e-4):
        out = lab.astype(np.uint8)
    else:
        out = resample_to_grid(lab.astype(np.uint8), lab_aff, img_aff, img_shape)
        total = int(np.count_nonzero(lab))
        if total and not np.any(out):
            raise ValueError(f"{name}: label does not overlap its image {_source(image)} "
                             f"(no foreground voxel lands inside the image grid)")
        # foreground voxels of the label whose centres fall outside the image grid
        idx = np.argwhere(lab > 0).astype(np.float64)
        inverse = np.linalg.solve(img_aff, lab_aff)
        pos = idx @ inverse[:3, :3].T + inverse[:3, 3]
        outside = np.any((pos < -0.5) | (pos > np.array(img_shape) - 0.5), axis=1)
        lost = int(np.count_nonzero(outside))
        if lost and not allow_crop:
            raise ValueError(f"{name}: {lost} of {total} foreground voxels fall outside the grid "
                             f"of {_source(image)}; the label would be cut (allow_crop=True "
                             f"accepts that)")
    meta = dict(getattr(label, "meta", {}) or {})
    meta["spatial_shape"] = np.asarray(img_shape)
    return _meta_tensor(out[None] if channel else out, img_aff, meta)


def _meta_tensor(array: np.ndarray, affine: np.ndarray, meta: dict) -> MetaTensor:
    meta = {k: v for k, v in meta.items() if k != "affine"}
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine), meta=meta)


class AlignLabel(Transform):
    """Array transform: ``AlignLabel()(label, image)`` → label on the image grid, binarised.

    Args:
        label_value: foreground value for multi-label maps (None: must be binary).
        allow_crop: see :func:`align_label_to_image`.
    """

    def __init__(self, label_value: int | None = None, allow_crop: bool = False) -> None:
        self.label_value = label_value
        self.allow_crop = allow_crop

    def __call__(self, label: MetaTensor, image: MetaTensor) -> MetaTensor:
        binary = binarize_label(np.asarray(label), source=_source(label), value=self.label_value)
        lab = _meta_tensor(binary, _affine(label, "label"), dict(label.meta))
        return align_label_to_image(lab, image, allow_crop=self.allow_crop)


class AlignLabeld(MapTransform):
    """Dictionary twin of :class:`AlignLabel`: puts ``keys`` onto the grid of ``ref_key``."""

    def __init__(self, keys: KeysCollection = "label", ref_key: str = "image",
                 label_value: int | None = None, allow_crop: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.aligner = AlignLabel(label_value, allow_crop)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.aligner(d[key], d[self.ref_key])
        return d
