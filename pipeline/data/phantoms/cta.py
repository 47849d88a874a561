"""CTA-like phantom volumes: a contrast-filled heart inside a pericardial sac, in a chest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.data.writers import write_dicom_series, write_nifti

__all__ = [
    "DEMO_COHORT",
    "CTAPhantom",
    "cta_phantom",
    "demo_cohort_manifest",
    "write_cta_cohort",
    "write_cta_phantom",
]


@dataclass
class CTAPhantom:
    """A synthetic chest CT angiogram.

    Attributes:
        image: X×Y×Z int16 HU, stored like most CT (x → patient left, y → posterior, z → up).
        label: X×Y×Z uint8 mask of the pericardial sac and its contents.
        affine: 4×4 voxel → RAS world mm (anisotropic spacing).
        heart_centre: RAS world position (mm) of the heart's centre: on the patient's left
            (x < 0), anterior (y > 0) and below the volume's middle, so that any flip or
            swapped axis is detectable.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    heart_centre: np.ndarray


def _ellipsoid(points: np.ndarray, centre, radii) -> np.ndarray:
    return np.sum(((points - np.asarray(centre)) / np.asarray(radii)) ** 2, axis=-1)


def cta_phantom(shape: tuple[int, int, int] = (64, 56, 40),
                spacing: tuple[float, float, float] = (0.9, 0.9, 2.5), *,
                noise: float = 25.0, rng: np.random.Generator | int | None = None) -> CTAPhantom:
    """Generates one phantom; shapes and positions vary a little with the generator.

    Args:
        shape: voxels along x, y, z (each ≥ 16).
        spacing: voxel size in mm (anisotropic on purpose).
        noise: standard deviation of the Gaussian noise in HU.
        rng: a numpy Generator or a seed.

    Returns:
        The phantom.

    Raises:
        ValueError: a dimension smaller than 16.
    """
    if min(shape) < 16:
        raise ValueError(f"cta_phantom needs at least 16 voxels per axis, got {shape}")
    gen = np.random.default_rng(rng)
    sx, sy, sz = spacing
    nx, ny, nz = shape
    fov = np.array([nx * sx, ny * sy, nz * sz])
    # LPS-ordered storage: RAS affine with negative x and y steps, centred on the origin
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [fov[0] / 2, fov[1] / 2, -fov[2] / 2]
    idx = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]  # RAS mm
    jitter = gen.uniform(0.9, 1.1, size=3)

    image = np.full(shape, -1000.0)  # air
    body = ((world[..., 0] / (0.45 * fov[0])) ** 2 + (world[..., 1] / (0.38 * fov[1])) ** 2) <= 1
    image[body] = -90.0  # subcutaneous fat
    inner = ((world[..., 0] / (0.40 * fov[0])) ** 2 + (world[..., 1] / (0.33 * fov[1])) ** 2) <= 1
    image[inner] = 40.0  # soft tissue
    lung_r = _ellipsoid(world, (0.19 * fov[0], -0.02 * fov[1], 0), (0.16 * fov[0], 0.25 * fov[1],
                                                                      0.6 * fov[2])) <= 1
    lung_l = _ellipsoid(world, (-0.21 * fov[0], -0.06 * fov[1], 0),
                        (0.13 * fov[0], 0.2 * fov[1], 0.55 * fov[2])) <= 1
    image[lung_r | lung_l] = -820.0
    spine = ((world[..., 0] / (0.07 * fov[0])) ** 2
             + ((world[..., 1] + 0.25 * fov[1]) / (0.07 * fov[1])) ** 2) <= 1
    image[spine] = 650.0

    centre = np.array([-0.07 * fov[0], 0.07 * fov[1], -0.12 * fov[2]]) * jitter
    radii = np.array([0.15 * fov[0], 0.13 * fov[1], 0.26 * fov[2]]) * jitter[::-1]
    sac = _ellipsoid(world, centre, radii * 1.22)
    heart = _ellipsoid(world, centre, radii)
    blood = _ellipsoid(world, centre + np.array([0.01 * fov[0], 0, 0]), radii * 0.72)
    image[sac <= 1.08] = 35.0  # pericardium (thin wall)
    image[sac <= 1.0] = -70.0  # pericardial fat
    image[heart <= 1.0] = 110.0  # myocardium
    image[blood <= 1.0] = 380.0  # contrast-filled blood pool
    label = (sac <= 1.0).astype(np.uint8)

    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.3))
    image += noise * gen.standard_normal(shape)
    return CTAPhantom(image=np.round(image).astype(np.int16), label=label, affine=affine,
                      heart_centre=centre)


def write_cta_phantom(folder: str | os.PathLike, case: str = "case000", *,
                      dicom: bool = True, rng: np.random.Generator | int | None = None,
                      **kwargs) -> dict[str, Path]:
    """Generates a phantom and writes it as real files.

    Writes ``<folder>/<case>/image.nii.gz``, ``label.nii.gz`` and, with ``dicom``, the same
    image as a CT DICOM series in ``<folder>/<case>/dicom/``.

    Args:
        folder: destination root.
        case: case folder name.
        dicom: also write the DICOM series.
        rng: generator or seed.
        **kwargs: passed to :func:`cta_phantom`.

    Returns:
        Paths by role: ``image``, ``label`` and (with dicom) ``dicom``.
    """
    phantom = cta_phantom(rng=rng, **kwargs)
    root = Path(folder) / case
    paths = {
        "image": write_nifti(phantom.image, phantom.affine, root / "image.nii.gz"),
        "label": write_nifti(phantom.label, phantom.affine, root / "label.nii.gz"),
    }
    if dicom:
        paths["dicom"] = write_dicom_series(phantom.image, phantom.affine, root / "dicom",
                                            patient_id=case, series_description="CTA phantom")
    return paths


#: The demo cohort: case names and generator seeds; ``data_manifests/cta_phantom.json`` lists
#: these cases with paths relative to the folder :func:`write_cta_cohort` writes.
DEMO_COHORT: tuple[tuple[str, int], ...] = tuple((f"phantom{i:02d}", 1000 + i) for i in range(6))


def write_cta_cohort(folder: str | os.PathLike, *, dicom: bool = False, **kwargs
                     ) -> list[dict[str, Path]]:
    """Writes the demo cohort (:data:`DEMO_COHORT`) of CTA phantoms under ``folder``.

    Args:
        folder: destination root; each case gets ``<folder>/<case>/image.nii.gz`` and
            ``label.nii.gz`` (and ``dicom/`` with ``dicom``).
        dicom: also write each image as a DICOM series.
        **kwargs: passed to :func:`cta_phantom`.

    Returns:
        The written paths per case.
    """
    return [write_cta_phantom(folder, case, dicom=dicom, rng=seed, **kwargs)
            for case, seed in DEMO_COHORT]


def demo_cohort_manifest(folder: str | os.PathLike) -> dict:
    """The demo cohort's manifest (4 training, 1 validation, 1 test volume, seed 0), writing
    the cohort to ``folder`` first where it is missing; equals
    ``data_manifests/cta_phantom.json``."""
    from pipeline.data.manifests import build_manifest

    base = Path(folder)
    if not all((base / case / "label.nii.gz").exists() for case, _ in DEMO_COHORT):
        write_cta_cohort(base)
    return build_manifest(base, fractions=(4, 1, 1), seed=0)
