"""CTA volumes → per-view 2-D sets: load, align label, orient to RAS, resample, window, slice;
and leave-slices-out within one volume (:class:`SliceSplit`)."""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
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
    "RAS_LABELS",
    "SLICE_PARTS",
    "LoadVolumed",
    "SliceSplit",
    "cta_slice_transforms",
    "cta_volume_transforms",
    "run_transforms",
    "select_slices",
    "slice_datalist",
]

#: Axis labels of MONAI's Orientation for the RAS+ world convention used everywhere here.
RAS_LABELS: tuple[tuple[str, str], ...] = (("L", "R"), ("P", "A"), ("I", "S"))
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
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS,
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

    An entry carrying ``slice_split`` (a :class:`SliceSplit` spec) and ``slice_part``
    (``"held_out"`` or ``"rest"``, as :func:`pipeline.data.manifests.manifest_entries` sets
    them) gives only that part of its slices, view by view; ``slice_split`` without
    ``slice_part`` gives every slice (the whole volume, e.g. to segment it).

    Args:
        datalist: entries like ``{"image": path, "label": path}`` (optionally ``source``,
            ``slice_split`` and ``slice_part``).
        views: views to produce.
        **kwargs: passed to :func:`cta_volume_transforms`.

    Returns:
        The 2-D samples, volume by volume, view by view, slice by slice.

    Raises:
        ValueError: a problem with a volume or with its slice split (names the file).
    """
    pipeline = cta_slice_transforms(views, **kwargs)
    return [sample for entry in datalist for sample in entry_slices(pipeline, entry)]


def entry_slices(pipeline, entry: Mapping) -> list[dict]:
    """One datalist entry through a slicing ``pipeline``, limited to its ``slice_part`` of
    its ``slice_split`` where it names one (see :func:`slice_datalist`).

    Raises:
        ValueError: a problem with the volume or its slice split (names the file).
    """
    part = entry.get("slice_part")
    split = None
    if part is not None:
        where = str(entry.get("source", entry.get("image", "entry")))
        if entry.get("slice_split") is None:
            raise ValueError(f"{where}: slice_part {part!r} needs a slice_split")
        split = SliceSplit.from_spec(entry["slice_split"], where=where)
    samples = run_transforms(pipeline, dict(entry))
    return samples if split is None else select_slices(samples, split, part)


#: The two parts of a volume under a :class:`SliceSplit`.
SLICE_PARTS: tuple[str, ...] = ("held_out", "rest")
_SPLIT_KEYS = ("held_out", "gap", "split")


def _fraction_pair(value, where: str) -> tuple[float, float]:
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{where}: held_out must be two fractions [start, stop] of the slice "
                         f"axis, e.g. [0.4, 0.6], got {value!r}")
    start, stop = float(value[0]), float(value[1])
    if not (math.isfinite(start) and math.isfinite(stop) and 0.0 <= start < stop <= 1.0):
        raise ValueError(f"{where}: held_out [start, stop] needs 0 <= start < stop <= 1, got "
                         f"{list(value)!r}")
    if start == 0.0 and stop == 1.0:
        raise ValueError(f"{where}: held_out [0, 1] holds out every slice; nothing is left to "
                         f"train on")
    return start, stop


@dataclass(frozen=True)
class SliceSplit:
    """Leave-slices-out within one volume: per view, a contiguous block of slice positions is
    held out (e.g. for validation), ``gap`` slices on each side of it are dropped (neighbouring
    slices are nearly identical, so they would leak the held-out block into training), and
    the rest is for training.

    Positions are fractions of the view's slicing axis of the RAS-oriented (and, when
    resampled, resampled) grid: 0 is the patient's left / posterior / inferior end (sagittal /
    coronal / axial), 1 the right / anterior / superior end, whatever the file's own axis
    order. For N slices the held-out block is slices ``round(start·N) ≤ i < round(stop·N)``
    (halves rounded up).
    Each view is split along its own axis, so the axial, coronal and sagittal models see
    different voxels; the voxels no view trained on are the intersection of the three blocks.

    Written in a manifest entry as ``"slice_split": {"held_out": [0.4, 0.6], "gap": 3,
    "split": "validation"}``; ``held_out`` may also map each view to its own pair.

    Attributes:
        held_out: view → (start, stop) fractions, one pair for each of the three views.
        gap: slices dropped on each side of the block (0 allowed).
        split: the split the held-out block belongs to (``validation`` or ``test``).
    """

    held_out: Mapping[str, tuple[float, float]]
    gap: int = 2
    split: str = "validation"

    @classmethod
    def from_spec(cls, spec, *, where: str = "slice_split") -> SliceSplit:
        """Parses and checks a manifest's ``slice_split`` dict (or passes a SliceSplit on).

        Args:
            spec: ``{"held_out": [start, stop] or {view: [start, stop]}, "gap": int,
                "split": str}``; ``gap`` defaults to 2, ``split`` to ``validation``.
            where: what to name in error messages (e.g. the manifest entry).

        Raises:
            ValueError: unknown keys, fractions outside [0, 1] or not increasing, a block
                spanning the whole axis, a missing or unknown view, a negative or non-integer
                gap, or a split other than ``validation``/``test``.
        """
        if isinstance(spec, SliceSplit):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: slice_split must be an object like "
                             f"{{'held_out': [0.4, 0.6], 'gap': 3}}, got {spec!r}")
        unknown = sorted(set(spec) - set(_SPLIT_KEYS))
        if unknown:
            raise ValueError(f"{where}: slice_split has unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(_SPLIT_KEYS)})")
        if "held_out" not in spec:
            raise ValueError(f"{where}: slice_split needs held_out: [start, stop] fractions")
        raw = spec["held_out"]
        if isinstance(raw, Mapping):
            missing = [v for v in VIEWS if v not in raw]
            extra = sorted(set(raw) - set(VIEWS))
            if missing or extra:
                raise ValueError(f"{where}: held_out per view needs exactly the views "
                                 f"{', '.join(VIEWS)} (missing: {', '.join(missing) or '-'}; "
                                 f"unknown: {', '.join(map(str, extra)) or '-'})")
            held = {v: _fraction_pair(raw[v], f"{where} ({v})") for v in VIEWS}
        else:
            pair = _fraction_pair(raw, where)
            held = dict.fromkeys(VIEWS, pair)
        gap = spec.get("gap", 2)
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"{where}: gap must be a whole number of slices >= 0, got {gap!r}")
        split = spec.get("split", "validation")
        if split not in ("validation", "test"):
            raise ValueError(f"{where}: the held-out slices go to 'validation' or 'test', got "
                             f"split {split!r}")
        return cls(held, gap, split)

    def to_spec(self) -> dict:
        """The manifest form (a single pair when all views share it)."""
        pairs = {v: list(self.held_out[v]) for v in VIEWS}
        first = pairs[VIEWS[0]]
        held = first if all(p == first for p in pairs.values()) else pairs
        return {"held_out": held, "gap": self.gap, "split": self.split}

    def block(self, view: str, n_slices: int, where: str = "volume") -> range:
        """The held-out slice indices of a view with ``n_slices`` slices.

        Raises:
            ValueError: unknown view, or a block holding no slice or leaving none to train on.
        """
        if view not in self.held_out:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        start, stop = self.held_out[view]
        first, last = math.floor(start * n_slices + 0.5), math.floor(stop * n_slices + 0.5)
        if last <= first:
            raise ValueError(f"{where}: held_out {[start, stop]} of the {view} view holds no "
                             f"slice of {n_slices}; widen it")
        if first - self.gap <= 0 and last + self.gap >= n_slices:
            raise ValueError(f"{where}: held_out {[start, stop]} with a gap of {self.gap} leaves "
                             f"no {view} slice of {n_slices} to train on")
        return range(first, last)

    def indices(self, view: str, n_slices: int, part: str, where: str = "volume") -> list[int]:
        """Slice indices of one part: ``held_out`` (the block) or ``rest`` (all slices more
        than ``gap`` away from the block)."""
        if part not in SLICE_PARTS:
            raise ValueError(f"slice part must be one of {SLICE_PARTS}, got {part!r}")
        block = self.block(view, n_slices, where)
        if part == "held_out":
            return list(block)
        low, high = block.start - self.gap, block.stop + self.gap
        return [i for i in range(n_slices) if i < low or i >= high]


def select_slices(samples: Sequence[Mapping], split: SliceSplit | Mapping, part: str
                  ) -> list[dict]:
    """Keeps one part of one volume's 2-D samples (all slices of each view, as
    :class:`pipeline.data.views.SliceViewsd` gives them) under a slice split.

    Args:
        samples: one volume's samples with ``view`` and ``slice``.
        split: a :class:`SliceSplit` or its manifest spec.
        part: ``held_out`` or ``rest``.

    Returns:
        The kept samples, in their order.

    Raises:
        ValueError: a bad split or part, or samples that are not every slice of their view.
    """
    rule = SliceSplit.from_spec(split)
    if part not in SLICE_PARTS:
        raise ValueError(f"slice part must be one of {SLICE_PARTS}, got {part!r}")
    by_view: dict[str, list[int]] = {}
    for sample in samples:
        by_view.setdefault(str(sample["view"]), []).append(int(sample["slice"]))
    keep: dict[str, set[int]] = {}
    for view, indices in by_view.items():
        n = len(indices)
        if sorted(indices) != list(range(n)):
            raise ValueError(f"a slice split needs every slice of the {view} view, got "
                             f"{n} slices with indices up to {max(indices)}")
        where = str(next(iter(samples)).get("source", "volume"))
        keep[view] = set(rule.indices(view, n, part, where))
    return [dict(s) for s in samples if int(s["slice"]) in keep[str(s["view"])]]
