"""Inference benchmark on a 512×512×N CT volume: CNN only vs CNN + CRF, and graph-cut workers.

Targets (issue 6): CRF share of inference time ≤ 25% with the CPU-sized network; graph cuts
in 2 worker processes ≥ 1.5× faster than in one. Issue 17: the pipeline (each batch of
slices cut in the workers while the network runs the next; the default only where the network
runs on a GPU) takes ≤ 0.8× the whole-volume time of the staged run (network first, then the
same workers cut), ``pipeline_vs_serial``;
``unsure_pipeline_vs_serial`` is the same ratio with the network made unsure (logits / 4),
where the cuts, not the persistency planning done in this process, are the CRF's work.
With ``--device cuda`` the CPU runs the same network beside it (``cnn_at_<size>_cuda_vs_cpu``)
and ``--amp`` is timed against full precision (``cnn_at_<size>_amp_speedup``, with the share
of voxels whose mask agrees).
The CRF always runs at 512²; the CNN runs either at its training size (slices resized, as
``mmcrf infer`` does for a model trained at that size) or natively at 512² (``crf_share``).
Measured side by side in one run; prints a table, then ONE JSON object as the last line.
``crf_3d_s`` times the optional 6-connected 3-D graph cut over the whole volume (``mmcrf
infer --crf-3d``) that replaces the per-slice CRF, on the same volume and probabilities.

Graph cuts and workers: persistency leaves only the pixels the network is unsure of to cut
(``cut_fraction``: the share of each slice's grid still cut), so on this volume the CRF
step is mostly the per-slice set-up done in the main process, and the workers speed it up
little (``crf_pool_speedup``, the CRF step of ``mmcrf infer --workers``). They are for the
slices where the cuts are the work: ``graphcut_pool_speedup`` times the same slices with
the network made unsure (its logits divided by 4, as early in training or on a scan unlike
its training data), which leaves the whole grid to cut, serially and in the workers.

    python benchmarks/bench_infer.py [--slices 24] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report beside this script

from _report import print_measures, print_targets
from monai.data import MetaTensor

from pipeline.crf import CRFWeights, keep_freed_memory, learn_weights, map_labelling
from pipeline.crf.graphcut import _map_plan
from pipeline.data import cta_phantom
from pipeline.data.phantoms import write_cta_cohort
from pipeline.data.samples import cta_samples
from pipeline.distributed import resolve_device
from pipeline.engines import TrainConfig, train
from pipeline.inference import VolumePredictor
from pipeline.models import load_checkpoint, load_run, save_checkpoint


def _checkpoint(folder: Path, epochs: int, size: int) -> Path:
    """A lite FCN-8s trained briefly on the phantom cohort's axial slices at size², with CRF
    weights learned on its own output (realistic, ambiguous probability maps)."""
    write_cta_cohort(folder / "data", shape=(96, 96, 24))
    entries = [{"image": str(p), "label": str(p.parent / "label.nii.gz")}
               for p in sorted((folder / "data").glob("*/image.nii.gz"))]
    samples = cta_samples(entries, "axial", size=size)
    data = {"size": size, "hu_window": [-200.0, 800.0]}
    cnn = train(TrainConfig(mode="cnn", epochs=epochs, batch_size=10, lr=3e-3,
                            network={"preset": "lite", "in_channels": 1}, data=data),
                samples, [], folder / "cnn")
    model, _, _ = load_run(cnn.last_checkpoint)
    chosen = [s for s in samples if not s["label_empty"]][::4]
    with torch.no_grad():
        images = torch.stack([s["image"] for s in chosen])
        probs = torch.sigmoid(model(images)[:, 0]).numpy()
    result = learn_weights(list(probs), list(images[:, 0].numpy()),
                           [s["label"][0].numpy().astype(np.uint8) for s in chosen], C=10.0)
    payload = load_checkpoint(cnn.last_checkpoint)
    payload["crf"] = result.weights.as_array().tolist()
    out = folder / "bench.pt"
    save_checkpoint({k: v for k, v in payload.items() if k != "format"}, out)
    return out


class _Unsure(torch.nn.Module):
    """A network whose logits are ``factor`` times smaller (as early in training, or on a scan
    unlike its training data): most of each slice is left to cut."""

    def __init__(self, model: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.factor


def _unsure(prob: np.ndarray, factor: float) -> np.ndarray:
    """The probabilities of a network whose logits are ``factor`` times smaller."""
    z = np.clip(prob.astype(np.float64), 1e-6, 1.0 - 1e-6)
    return (1.0 / (1.0 + (z / (1.0 - z)) ** (-1.0 / factor))).astype(np.float32)


def _cut_fraction(prob: np.ndarray, image: np.ndarray, weights: CRFWeights) -> float:
    """The share of the grid that persistency leaves to the graph cut."""
    plan = _map_plan(prob, image, weights, 4, None)
    return 0.0 if plan.box is None else plan.args[0].size / prob.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=24, help="N (>= 16) of the 512×512×N volume")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="training/CNN input size")
    parser.add_argument("--quick", action="store_true", help="16 slices, 1 repeat")
    parser.add_argument("--device", default="cpu",
                        help="where the CNN runs (auto, cpu, cuda, cuda:N); with a GPU the CPU "
                             "runs beside it for the CUDA/CPU ratio")
    args = parser.parse_args()
    device = resolve_device(args.device)
    keep_freed_memory()  # as mmcrf infer does for its own process
    slices, repeats = (16, 1) if args.quick else (args.slices, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp), 3 if args.quick else 6, args.size)
        # the phantom's anatomy scales with its field of view: 512² at 0.17 mm looks like the
        # 96² training volumes at 0.9 mm, so the network sees familiar images
        phantom = cta_phantom((512, 512, slices), (0.9 * 96 / 512, 0.9 * 96 / 512, 2.5),
                              rng=5)
        volume = MetaTensor(torch.as_tensor(phantom.image.astype(np.float32)),
                            affine=torch.as_tensor(phantom.affine))
        serial = VolumePredictor(ckpt, ["axial"], workers=0, device=device)
        pooled = VolumePredictor(ckpt, ["axial"], workers=args.workers, device=device,
                                 pipeline=True)
        staged = VolumePredictor(ckpt, ["axial"], workers=args.workers, device=device,
                                 pipeline=False)  # the network first, then the cuts
        # the same pair with an unsure network: the cuts are the work, as the pipeline's case
        unsure_staged = VolumePredictor(ckpt, ["axial"], workers=args.workers, device=device,
                                        pipeline=False)
        unsure_piped = VolumePredictor(ckpt, ["axial"], workers=args.workers, device=device,
                                       pipeline=True)
        for p in (unsure_staged, unsure_piped):
            p.models["axial"].model = _Unsure(p.models["axial"].model, 4.0)
        native = VolumePredictor(ckpt, ["axial"], workers=0, device=device)
        on_cpu = VolumePredictor(ckpt, ["axial"], workers=0) if device.type != "cpu" else None
        # mixed precision where it pays (float16 on CUDA), side by side with full precision
        amp = (VolumePredictor(ckpt, ["axial"], workers=0, device=device, amp=True)
               if device.type == "cuda" else None)
        native.models["axial"].size = None  # fully convolutional: the CNN at 512² as well
        volume_cut = VolumePredictor(ckpt, ["axial"], workers=0, crf_3d=True, device=device)
        pooled.predict(volume)  # start the workers before timing
        staged.predict(volume)
        unsure_staged.predict(volume)
        unsure_piped.predict(volume)
        timings: dict[str, list[float]] = {k: [] for k in ("cnn", "crf", "crf_pool",
                                                            "cnn_native", "crf_native",
                                                            "crf_3d", "cuts_serial",
                                                            "cuts_pool", "cnn_cpu",
                                                            "staged", "pipelined", "cnn_amp",
                                                            "unsure_staged", "unsure_piped")}
        for _ in range(repeats):
            result = serial.predict(volume)
            timings["cnn"].append(result.seconds["cnn"])
            if on_cpu is not None:  # the same network on the CPU, side by side
                timings["cnn_cpu"].append(on_cpu.predict(volume).seconds["cnn"])
            if amp is not None:
                half = amp.predict(volume)
                timings["cnn_amp"].append(half.seconds["cnn"])
                amp_agreement = float(np.mean(half.mask == result.mask))
            timings["crf"].append(result.seconds["crf"])
            start = time.perf_counter()
            again = staged.predict(volume)
            timings["staged"].append(time.perf_counter() - start)
            timings["crf_pool"].append(again.seconds["crf"])
            assert np.array_equal(again.mask, result.mask)
            start = time.perf_counter()
            piped = pooled.predict(volume)
            timings["pipelined"].append(time.perf_counter() - start)
            start = time.perf_counter()
            slow = unsure_staged.predict(volume)
            timings["unsure_staged"].append(time.perf_counter() - start)
            start = time.perf_counter()
            fast = unsure_piped.predict(volume)
            timings["unsure_piped"].append(time.perf_counter() - start)
            assert np.array_equal(slow.mask, fast.mask)
            assert np.array_equal(piped.mask, result.mask)
            full = native.predict(volume)
            timings["cnn_native"].append(full.seconds["cnn"])
            timings["crf_native"].append(full.seconds["crf"])
            cut3d = volume_cut.predict(volume)
            timings["crf_3d"].append(cut3d.seconds["crf_3d"])
        weights = CRFWeights.from_array(load_checkpoint(ckpt)["crf"])
        probs = [result.probability[:, :, k] for k in range(slices)]
        low, high = serial.models["axial"].hu_window
        images = [np.clip((phantom.image[:, :, k] - low) / (high - low), 0.0, 1.0)
                  .astype(np.float32) for k in range(slices)]
        cut_fraction = float(np.mean([_cut_fraction(p, x, weights)
                                      for p, x in zip(probs, images, strict=True)]))
        unsure = [_unsure(p, 4.0) for p in probs]
        unsure_fraction = float(np.mean([_cut_fraction(p, x, weights)
                                         for p, x in zip(unsure, images, strict=True)]))
        for _ in range(repeats):
            start = time.perf_counter()
            one = [map_labelling(p, x, weights) for p, x in zip(unsure, images, strict=True)]
            timings["cuts_serial"].append(time.perf_counter() - start)
            start = time.perf_counter()
            two = pooled.pool.map_labellings(unsure, images, weights)
            timings["cuts_pool"].append(time.perf_counter() - start)
            assert all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))
        pooled.close()
        staged.close()
        unsure_staged.close()
        unsure_piped.close()
    med = {k: statistics.median(v) for k, v in timings.items() if v}
    cnn, crf, crf_pool = med["cnn"], med["crf"], med["crf_pool"]
    out = {
        "volume": f"512x512x{slices}",
        "network": "lite FCN-8s (1.3M parameters)",
        "crf_weights": weights.as_array().round(4).tolist(),
        f"cnn_at_{args.size}_slices_per_s": slices / cnn,
        f"cnn_at_{args.size}_crf_slices_per_s": slices / (cnn + crf),
        f"crf_share_cnn_at_{args.size}": crf / (cnn + crf),
        "cnn_native_slices_per_s": slices / med["cnn_native"],
        "cnn_native_crf_slices_per_s": slices / (med["cnn_native"] + med["crf_native"]),
        "crf_share": med["crf_native"] / (med["cnn_native"] + med["crf_native"]),
        "crf_serial_s": crf,
        f"crf_pool{args.workers}_s": crf_pool,
        "crf_pool_speedup": crf / crf_pool,
        f"volume_staged_pool{args.workers}_s": med["staged"],
        f"volume_pipelined_pool{args.workers}_s": med["pipelined"],
        "pipeline_vs_serial": med["pipelined"] / med["staged"],
        f"unsure_volume_staged_pool{args.workers}_s": med["unsure_staged"],
        f"unsure_volume_pipelined_pool{args.workers}_s": med["unsure_piped"],
        "unsure_pipeline_vs_serial": med["unsure_piped"] / med["unsure_staged"],
        "cut_fraction": cut_fraction,
        "unsure_cut_fraction": unsure_fraction,
        "unsure_cuts_serial_s": med["cuts_serial"],
        f"unsure_cuts_pool{args.workers}_s": med["cuts_pool"],
        "graphcut_pool_speedup": med["cuts_serial"] / med["cuts_pool"],
        "crf_3d_s": med["crf_3d"],
        "crf_3d_changed_fraction": float(np.mean(cut3d.mask != result.mask)),
        "foreground_fraction": float(result.mask.mean()),
        "device": str(device),
        **({f"cnn_at_{args.size}_cuda_vs_cpu": med["cnn_cpu"] / med["cnn"]}
           if "cnn_cpu" in med else {}),
        **({f"cnn_at_{args.size}_amp_speedup": med["cnn"] / med["cnn_amp"],
            "amp_mask_agreement": amp_agreement} if "cnn_amp" in med else {}),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
        "machine": f"{platform.machine()} python {platform.python_version()}",
    }
    print_measures(out, width=34)
    targets = [("crf_share", "<=", 0.25), (f"crf_share_cnn_at_{args.size}", "<=", 0.25),
               ("graphcut_pool_speedup", ">=", 1.5), ("pipeline_vs_serial", "<=", 0.8)]
    print_targets(out, targets)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
