"""Geometry oracle: a voxel → RAS affine from SimpleITK's own reading, no project code."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def sitk_ras_affine(image: sitk.Image) -> np.ndarray:
    """SimpleITK's LPS geometry (spacing, origin, direction) as a voxel → RAS affine."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
