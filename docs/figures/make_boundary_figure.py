"""Figure of the learned boundary map (issue 20): image, the boundary head's map b, and the
masks of joint training with and without the learned edge feature, on validation images.

For each picked image: the image with the ground truth's outline; b = sigmoid(boundary head),
at the image's resolution, as the graph cut receives it; the image with the outlines of the
plain joint model's mask and the joint + learned pairwise model's mask. The images are picked
from an evaluation table holding both methods (``mmcrf evaluate --images ... --run
joint=... --run joint_lp=...``): the largest gain, the median image and the largest loss of
joint_lp against joint.

Run from the repository root (commands in ``docs/RESULTS.md``, "Learned pairwise term")::

    .venv/bin/python docs/figures/make_boundary_figure.py --data horse \\
        --images ../shared/data/weizmann_horse --joint runs/horse_lp/models/joint.pt \\
        --joint-lp runs/horse_lp/models/joint_lp.pt --table runs/horse_lp/eval/evaluation.csv \\
        --out docs/figures/horse_boundary_map.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.evaluation.tables import read_eval_table
from pipeline.inference.images import predict_image
from pipeline.inference.predictor import TrainedModel


def _picks(table_file: str) -> list[tuple[str, str, float]]:
    """(image, why, joint_lp − joint Jaccard) for the largest gain, the median and the
    largest loss."""
    rows = list(read_eval_table(table_file).rows())
    score = {(r["method"], r["image"] or r["slice"] or r["case"]): float(r["jaccard"])
             for r in rows if r["jaccard"] == r["jaccard"]}  # NaN: empty ground truth
    names = sorted({n for m, n in score if m == "joint_lp" and ("joint", n) in score})
    gain = {n: score[("joint_lp", n)] - score[("joint", n)] for n in names}
    ordered = sorted(names, key=lambda n: (gain[n], n))
    median = ordered[len(ordered) // 2]
    return [(ordered[-1], "largest gain", gain[ordered[-1]]),
            (median, "median", gain[median]),
            (ordered[0], "largest loss", gain[ordered[0]])]


def _horse(root: Path, name: str, joint: TrainedModel, lp: TrainedModel):
    from pipeline.data.datasets.horse import load_horse

    sample = load_horse(root, name, colour="rgb", on_broken="gray")
    image = sample.image
    _, plain = predict_image(joint, image)
    _, learned = predict_image(lp, image)
    _, _, edges = next(lp.iter_image_maps(image[None]))
    return image.transpose(1, 2, 0), sample.mask, edges[0], plain, learned


def _camus(root: Path, name: str, joint: TrainedModel, lp: TrainedModel):
    from pipeline.data.datasets.camus import find_camus_images, load_camus
    from pipeline.inference.frames import FramePredictor

    patient, view, phase = name.split("_")
    item = next(i for i in find_camus_images(root, views=(view,), phases=(phase,),
                                             patients=[patient]))
    image, truth = load_camus(item, (1,))
    plain = FramePredictor(joint.path).predict(image[None]).mask[0]
    learned = FramePredictor(lp.path).predict(image[None]).mask[0]
    _, edges = lp.maps(image[None])
    return image, truth, edges[0], plain, learned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("horse", "camus"), required=True)
    parser.add_argument("--images", required=True, help="the shared data folder of the set")
    parser.add_argument("--joint", required=True, help="the plain joint model")
    parser.add_argument("--joint-lp", required=True, help="the joint + learned pairwise model")
    parser.add_argument("--table", required=True, help="evaluation.csv with both methods")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    joint = TrainedModel.from_checkpoint(args.joint)
    lp = TrainedModel.from_checkpoint(args.joint_lp)
    if not lp.learned_pairwise:
        raise SystemExit(f"{args.joint_lp}: not a model with the learned edge feature")
    load = _horse if args.data == "horse" else _camus
    picks = _picks(args.table)
    fig = Figure(figsize=(9.6, 3.1 * len(picks)), layout="constrained")
    axes = fig.subplots(len(picks), 3, squeeze=False)
    grey = {"cmap": "gray"} if args.data == "camus" else {}
    for row, (name, why, gain) in zip(axes, picks, strict=True):
        image, truth, edges, plain, learned = load(Path(args.images), name, joint, lp)
        row[0].imshow(image, **grey)
        row[0].contour(truth, levels=[0.5], colors="yellow", linewidths=1.0)
        row[0].set_title(f"{name} ({why}), truth", fontsize=8)
        shown = row[1].imshow(edges, cmap="magma", vmin=0.0, vmax=1.0)
        row[1].set_title(f"boundary map b (w4 = {lp.weights.w4:.3f})", fontsize=8)
        fig.colorbar(shown, ax=row[1], shrink=0.8)
        row[2].imshow(image, **grey)
        row[2].contour(plain, levels=[0.5], colors="cyan", linewidths=1.0)
        row[2].contour(learned, levels=[0.5], colors="magenta", linewidths=1.0)
        row[2].set_title(f"joint (cyan), + learned pairwise (magenta): {100 * gain:+.1f}",
                         fontsize=8)
        for ax in row:
            ax.set_axis_off()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=85)
    print(f"wrote {args.out}: " + ", ".join(f"{n} ({w}, {100 * g:+.2f})" for n, w, g in picks))


if __name__ == "__main__":
    main()
