"""Overlay figure and 3-D checks of the heart-CT smoke experiment (leave-slices-out, one volume).

Reads the shared heart CT and its heart mask (put on the CT's grid by the project's own loader,
through both affines), the masks ``mmcrf infer`` wrote for the whole CT
(``<infer>/<method>/<view>/ct_cropped_mask.nii.gz``, and ``<infer>/<method>/all/...`` for the
three views fused), and the slice split of ``data_manifests/ct_heart.json``. Writes:

* ``--out``: one panel per view, the CT slice through the heart centre that lies in the view's
  held-out block, with the reference contour and the predicted contours;
* ``--metrics``: JSON with, per mask, that its grid equals the CT's (shape and affine), Dice
  and Jaccard over the whole volume (mostly slices the model trained on), over the view's
  held-out slab (slices that view's model never saw) and, for the fused mask, over the cube
  no view saw (the three slabs' intersection), and the distance between the predicted and the
  reference heart centroids in mm.

Run from the repository root (after the commands in ``docs/RESULTS.md`` (heart CT section))::

    .venv/bin/python docs/figures/make_heart_overlay.py --data ../shared/data \\
        --infer ../runs/heart_ct/infer --out docs/figures/heart_ct_overlay.png \\
        --metrics docs/results/heart_ct_metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.data.alignment import resample_to_grid
from pipeline.data.cta import SliceSplit, cta_volume_transforms, run_transforms
from pipeline.data.manifests import load_manifest, manifest_entries
from pipeline.data.views import VIEWS, slice_volume

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "data_manifests" / "ct_heart.json"
CASE = "ct_cropped_mask.nii.gz"
#: view → the RAS array axis its slices are cut along
SLICE_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
#: view → (row axis, column axis) of its 2-D images (see pipeline.data.views)
IMAGE_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
STYLE = {"cnn": ("tab:orange", "--", 1.2), "piecewise": ("tab:blue", ":", 1.2),
         "joint": ("red", "-", 1.6), "fused": ("cyan", "-.", 1.4)}


def overlap(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice and Jaccard of two binary arrays (NaN where both are empty)."""
    p, t = pred > 0, truth > 0
    inter, union, total = np.sum(p & t), np.sum(p | t), p.sum() + t.sum()
    return {"dice": float(2 * inter / total) if total else float("nan"),
            "jaccard": float(inter / union) if union else float("nan"),
            "predicted_voxels": int(p.sum()), "reference_voxels": int(t.sum())}


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) centroid of a binary mask."""
    idx = np.argwhere(mask > 0).mean(axis=0)
    return (affine @ np.r_[idx, 1.0])[:3]


def load_reference(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, SliceSplit, Path]:
    """The CT (HU) and heart mask on the CT's RAS grid, the RAS affine, the slice split and
    the CT's file path, all as the training code makes them."""
    manifest = load_manifest(MANIFEST)
    (entry,) = manifest_entries(manifest, data, ["training"])
    rule = SliceSplit.from_spec(entry["slice_split"])
    volume = run_transforms(cta_volume_transforms(hu_window=None),
                            {"image": entry["image"], "label": entry["label"]})
    ct = np.asarray(volume["image"])[0]
    heart = np.asarray(volume["label"])[0].astype(np.uint8)
    return ct, heart, np.asarray(volume["image"].affine, np.float64), rule, Path(entry["image"])


def find_masks(infer: Path) -> dict[tuple[str, str], Path]:
    """(method, view or 'all') → mask file, for what exists under ``infer``."""
    found = {}
    for method_dir in sorted(p for p in infer.iterdir() if p.is_dir()):
        for view in (*VIEWS, "all"):
            path = method_dir / view / CASE
            if path.is_file():
                found[(method_dir.name, view)] = path
    return found


def slab(shape: tuple[int, ...], rule: SliceSplit, view: str) -> np.ndarray:
    """Boolean volume: the view's held-out slices."""
    axis = SLICE_AXIS[view]
    block = rule.block(view, shape[axis])
    out = np.zeros(shape, bool)
    index = [slice(None)] * 3
    index[axis] = slice(block.start, block.stop)
    out[tuple(index)] = True
    return out


def measure(masks: dict[tuple[str, str], Path], ct_file: Path, heart: np.ndarray,
            affine: np.ndarray, rule: SliceSplit) -> tuple[dict, dict[tuple[str, str], np.ndarray]]:
    """Grid checks and overlap numbers of every mask; also returns the masks on the RAS grid."""
    ct_nii = nib.load(ct_file)
    shape = heart.shape
    slabs = {v: slab(shape, rule, v) for v in VIEWS}
    unseen = slabs["axial"] & slabs["coronal"] & slabs["sagittal"]
    ref_centre = centroid_mm(heart, affine)
    results, on_grid = {}, {}
    for (method, view), path in masks.items():
        nii = nib.load(path)
        same_grid = (nii.shape == ct_nii.shape
                     and bool(np.allclose(nii.affine, ct_nii.affine, atol=1e-5)))
        mask = resample_to_grid(np.asarray(nii.dataobj).astype(np.uint8), nii.affine, affine,
                                shape)
        on_grid[(method, view)] = mask
        row = {"file": str(path), "same_shape_and_affine_as_ct": same_grid,
               "shape": list(nii.shape), "whole_volume": overlap(mask, heart)}
        if view in VIEWS:
            row["held_out_slab"] = overlap(mask[slabs[view]], heart[slabs[view]])
        else:
            row["unseen_cube"] = overlap(mask[unseen], heart[unseen])
            row.update({f"{v}_slab": overlap(mask[slabs[v]], heart[slabs[v]]) for v in VIEWS})
        if mask.any():
            centre = centroid_mm(mask, affine)
            row["centroid_mm"] = [round(float(c), 2) for c in centre]
            row["centroid_distance_mm"] = round(float(np.linalg.norm(centre - ref_centre)), 2)
        results[f"{method}/{view}"] = row
    summary = {"reference_centroid_mm": [round(float(c), 2) for c in ref_centre],
               "reference_voxels": int(heart.sum()), "ras_shape": list(shape),
               "slice_split": rule.to_spec(),
               "held_out_blocks": {v: [rule.block(v, shape[SLICE_AXIS[v]]).start,
                                       rule.block(v, shape[SLICE_AXIS[v]]).stop - 1]
                                   for v in VIEWS},
               "unseen_cube_voxels": int(unseen.sum()),
               "unseen_cube_reference_voxels": int(heart[unseen].sum()),
               "masks": results}
    return summary, on_grid


def draw(ct: np.ndarray, heart: np.ndarray, affine: np.ndarray, rule: SliceSplit,
         masks: dict[tuple[str, str], np.ndarray], out: Path) -> dict[str, int]:
    """The three-panel overlay; returns the slice drawn per view."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    centre = np.argwhere(heart > 0).mean(axis=0)
    fig = Figure(figsize=(13.5, 5.4))
    axes = fig.subplots(1, 3)
    chosen = {}
    methods = [m for m in ("cnn", "piecewise", "joint") if any(k[0] == m for k in masks)]
    for ax, view in zip(axes, VIEWS, strict=True):
        n = ct.shape[SLICE_AXIS[view]]
        block = rule.block(view, n)
        index = int(np.clip(round(centre[SLICE_AXIS[view]]), block.start, block.stop - 1))
        chosen[view] = index
        image = slice_volume(ct[None], view)[index, 0]
        ref = slice_volume(heart[None], view)[index, 0]
        rows, cols = IMAGE_AXES[view]
        ax.imshow(image, cmap="gray", vmin=-200, vmax=800, interpolation="nearest",
                  aspect=spacing[rows] / spacing[cols])
        ax.contour(ref, levels=[0.5], colors="lime", linewidths=1.8)
        parts = []
        for method in methods:
            if (method, view) not in masks:
                continue
            pred = slice_volume(masks[(method, view)][None], view)[index, 0]
            colour, style, width = STYLE[method]
            if pred.any():
                ax.contour(pred, levels=[0.5], colors=colour, linestyles=style,
                           linewidths=width)
            parts.append(f"{method} {overlap(pred, ref)['dice']:.2f}")
        ax.set_title(f"{view}, slice {index} of {n} (held-out block {block.start}–"
                     f"{block.stop - 1})\nslice Dice: " + ", ".join(parts), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], color="lime", lw=1.8, label="reference (heart mask, resampled)")]
    handles += [Line2D([], [], color=STYLE[m][0], ls=STYLE[m][1], lw=STYLE[m][2],
                       label=f"{m}: that view's own model, mmcrf infer") for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    fig.suptitle("Heart CT, smoke-level leave-slices-out experiment (one volume; each view's "
                 "slice is from its held-out block)", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.83, bottom=0.09, wspace=0.04)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("MMCRF_SHARED_DATA",
                                                         str(REPO.parent / "shared" / "data")),
                        help="the shared data root (holds ct_heart/)")
    parser.add_argument("--infer", default=str(REPO.parent / "runs" / "heart_ct" / "infer"),
                        help="folder of mmcrf infer outputs: <method>/<view or all>/")
    parser.add_argument("--out", default=str(REPO / "docs" / "figures" /
                                             "heart_ct_overlay.png"))
    parser.add_argument("--metrics", default=None, help="JSON file for the numbers")
    args = parser.parse_args(argv)
    data, infer = Path(args.data), Path(args.infer)
    if not (data / "ct_heart").is_dir():
        print(f"no ct_heart/ under {data} (give --data)", file=sys.stderr)
        return 2
    ct, heart, affine, rule, ct_file = load_reference(data)
    masks = find_masks(infer)
    if not masks:
        print(f"no {CASE} under {infer}/<method>/<view>/", file=sys.stderr)
        return 2
    summary, on_grid = measure(masks, ct_file, heart, affine, rule)
    per_view = {k: v for k, v in on_grid.items() if k[1] in VIEWS}
    summary["figure_slices"] = draw(ct, heart, affine, rule, per_view, Path(args.out))
    text = json.dumps(summary, indent=2)
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
