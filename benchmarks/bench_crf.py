"""CRF cost benchmark: graph-cut overhead, cutting-plane time, envelope vs KKT gradient.

Every ratio is measured side by side in this one run (A/B interleaved), so a noisy shared
machine affects both sides alike. Prints a table, then ONE JSON object as the last line.

Targets (DESIGN.md / issue 2): graphcut_overhead_ratio ≤ 1.15 at 256²; envelope gradient
≥ 100× faster than the KKT system with the same values to 1e-6; a whole cutting plane on
10 images of 256² under 3 s median (issue 17: serial and cold, ``cutting_plane_batch10_256_s``,
with the default schedule, the QP re-solved after each sample; beside it the schedule of the
pool, once per pass, and the ratio of the two).

    python benchmarks/bench_crf.py [--repeats 15] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import maxflow
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report beside this script

from _report import print_measures, print_targets

from pipeline.crf import (
    CRFWeights,
    GraphCutPool,
    GridCRF,
    cutting_plane,
    envelope_gradient,
    graph_cut,
    map_labelling,
)
from pipeline.data import noisy_blocks
from tests.oracles.kkt import kkt_system_gradient, reference_qp


def _time(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _bare_graph(arrays):
    """The same graph as graph_cut builds, from precomputed capacities, with no project code."""
    src, snk, structures, capacities, shape = arrays
    g = maxflow.Graph[float](src.size, src.size * len(structures))
    ids = g.add_grid_nodes(shape)
    g.add_grid_tedges(ids, src, snk)
    for structure, cap in zip(structures, capacities, strict=True):
        g.add_grid_edges(ids, weights=cap, structure=structure, symmetric=True)
    g.maxflow()
    return g.get_grid_segments(ids)


def bench_graph_cut(repeats: int) -> dict:
    """Our cut against the bare PyMaxflow graph (every direction by ``add_grid_edges``), 4-
    and 8-connected: since the edges go in by ``add_edges``, a ratio below 1."""
    out = {}
    for connectivity in (4, 8):
        sample = noisy_blocks((256, 256), rng=1, noise=2.0)
        crf = GridCRF.from_probabilities(sample.prob, sample.image, connectivity=connectivity)
        weights = CRFWeights(0.6, 0.3, 0.4)
        w1, w2, w3 = weights.as_array()
        c1, c0 = w1 * crf.cost1, w1 * crf.cost0
        m = np.minimum(c0, c1)
        arrays = (c1 - m, c0 - m, [e.structure for e in crf.edges],
                  [w2 + w3 * e.contrast for e in crf.edges], crf.shape)
        assert np.array_equal(_bare_graph(arrays).astype(np.uint8), graph_cut(crf, weights))
        ours, bare = [], []
        for i in range(repeats):  # interleaved, alternating which side goes first (ABBA)
            if i % 2:
                bare.append(_time(_bare_graph, arrays)[0])
                ours.append(_time(graph_cut, crf, weights)[0])
            else:
                ours.append(_time(graph_cut, crf, weights)[0])
                bare.append(_time(_bare_graph, arrays)[0])
        cut_all = functools.partial(map_labelling, sample.prob, sample.image, weights,
                                    connectivity=connectivity)
        full = [_time(cut_all)[0] for _ in range(repeats)]
        g, b = statistics.median(ours), statistics.median(bare)
        tag = "" if connectivity == 4 else "_c8"
        out.update({f"graphcut_256{tag}_ms": 1e3 * g, f"bare_pymaxflow_256{tag}_ms": 1e3 * b,
                    f"graphcut_overhead_ratio{tag}": g / b,
                    f"map_labelling_from_arrays_256{tag}_ms": 1e3 * statistics.median(full)})
    return out


def bench_cutting_plane(runs: int, workers: int) -> dict:
    samples = [noisy_blocks((256, 256), rng=100 + i, noise=2.0) for i in range(10)]
    truths = [s.truth for s in samples]
    logits = [np.log(s.prob) - np.log1p(-s.prob) for s in samples]
    crfs = [GridCRF.from_logits(a, s.image) for a, s in zip(logits, samples, strict=True)]
    rng = np.random.default_rng(0)
    moved = [a + 0.1 * rng.standard_normal(a.shape) for a in logits]
    crfs_moved = [GridCRF.from_logits(a, s.image) for a, s in zip(moved, samples, strict=True)]
    times: dict[str, list[float]] = {"serial": [], "pool": [], "warm": [], "serial_violated": [],
                                     "serial_pass": []}
    gamma_gap, gamma_gap_pass = [], []
    passes: dict[str, list[int]] = {"serial": [], "warm": []}
    with GraphCutPool(workers) as pool:
        pool.cut_all(crfs[:workers], CRFWeights())  # start the workers before timing
        for _ in range(runs):
            t, result = _time(lambda: cutting_plane(crfs, truths, C=10.0))  # QP per sample
            times["serial"].append(t)
            passes["serial"].append(result.iterations)
            # side by side: the QP re-solved once per pass (the pool's schedule)
            t, per_pass = _time(lambda: cutting_plane(crfs, truths, C=10.0, update="pass"))
            times["serial_pass"].append(t)
            gamma_gap_pass.append(abs(per_pass.gamma - result.gamma) / abs(per_pass.gamma))
            # side by side: only the violated samples re-cut, then a verification pass
            t, full = _time(lambda: cutting_plane(crfs, truths, C=10.0, recut="violated"))
            times["serial_violated"].append(t)
            gamma_gap.append(abs(full.gamma - result.gamma) / max(1e-12, abs(full.gamma)))
            t, pooled = _time(lambda: cutting_plane(crfs, truths, C=10.0, pool=pool))
            times["pool"].append(t)
            assert abs(pooled.gamma - per_pass.gamma) <= 1e-9 * max(1.0, per_pass.gamma)
            # the next visit of the same batch after a CNN step: moved logits, warm start
            t, again = _time(lambda r=result: cutting_plane(
                crfs_moved, truths, C=10.0, working_sets=r.working_sets,
                initial_weights=r.weights))
            times["warm"].append(t)
            passes["warm"].append(again.iterations)
    grad_t = [_time(envelope_gradient, result, truths)[0] for _ in range(5)]
    return {"cutting_plane_batch10_256_s": statistics.median(times["serial"]),
            "cutting_plane_batch10_256_per_pass_s": statistics.median(times["serial_pass"]),
            "cutting_plane_per_sample_speedup": statistics.median(
                a / b for a, b in zip(times["serial_pass"], times["serial"], strict=True)),
            "cutting_plane_per_sample_gamma_rel_gap": max(gamma_gap_pass),
            "cutting_plane_batch10_256_recut_violated_s": statistics.median(
                times["serial_violated"]),
            "cutting_plane_recut_violated_speedup": statistics.median(
                a / b for a, b in zip(times["serial"], times["serial_violated"], strict=True)),
            "cutting_plane_recut_gamma_rel_gap": max(gamma_gap),
            f"cutting_plane_batch10_256_pool{workers}_s": statistics.median(times["pool"]),
            "cutting_plane_batch10_256_warm_s": statistics.median(times["warm"]),
            "cutting_plane_passes_cold": statistics.median(passes["serial"]),
            "cutting_plane_passes_warm": statistics.median(passes["warm"]),
            "grad_envelope_batch10_256_ms": 1e3 * statistics.median(grad_t)}


def bench_gradient(repeats: int) -> dict:
    samples = [noisy_blocks((32, 32), rng=200 + i, noise=2.0) for i in range(2)]
    truths = [s.truth for s in samples]
    logits = [np.log(s.prob) - np.log1p(-s.prob) for s in samples]
    crfs = [GridCRF.from_logits(a, s.image) for a, s in zip(logits, samples, strict=True)]
    result = cutting_plane(crfs, truths, C=10.0)
    qp = reference_qp(result.dpsi, result.losses, 10.0)
    env_t, kkt_t = [], []
    for _ in range(repeats):
        t, env = _time(envelope_gradient, result, truths)
        env_t.append(t)
        t, kkt = _time(kkt_system_gradient, logits, truths, result.working_sets, result.dpsi, qp,
                       10.0)
        kkt_t.append(t)
        if len(kkt_t) >= 3 and sum(kkt_t) > 20:
            break
    e = np.concatenate([g.ravel() for g in env])
    k = np.concatenate([g.ravel() for g in kkt])
    env_ms, kkt_ms = 1e3 * statistics.median(env_t), 1e3 * statistics.median(kkt_t)
    return {"grad_envelope_ms": env_ms, "grad_kkt_ms": kkt_ms,
            "grad_speedup_vs_kkt": kkt_ms / env_ms,
            "grad_max_rel_diff_vs_kkt": float(np.abs(e - k).max() / np.abs(k).max()),
            "grad_size": "2 images 32x32",
            "grad_constraints": int(sum(len(ws) for ws in result.working_sets))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--runs", type=int, default=3, help="cutting-plane runs (median)")
    parser.add_argument("--workers", type=int, default=2, help="graph-cut processes (pool run)")
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    args = parser.parse_args()
    repeats, runs = (3, 1) if args.quick else (args.repeats, args.runs)
    out = {}
    out.update(bench_graph_cut(repeats))
    out.update(bench_cutting_plane(runs, args.workers))
    out.update(bench_gradient(repeats))
    out["machine"] = f"{platform.machine()} python {platform.python_version()}"
    targets = [("graphcut_overhead_ratio", "<=", 1.15),
               ("grad_speedup_vs_kkt", ">=", 100.0),
               ("grad_max_rel_diff_vs_kkt", "<=", 1e-6),
               ("cutting_plane_batch10_256_s", "<=", 3.0),
               (f"cutting_plane_batch10_256_pool{args.workers}_s", "<=", 3.0),
               ("cutting_plane_batch10_256_warm_s", "<=", 3.0)]
    print_measures(out, width=40)
    print_targets(out, targets)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
