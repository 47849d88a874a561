"""Graph cuts in worker processes give exactly the in-process results."""

from __future__ import annotations

import multiprocessing
import platform
import resource
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest

from pipeline.crf import (
    CRFWeights,
    GraphCutPool,
    GridCRF,
    cutting_plane,
    graph_cut,
    map_labelling,
)
from pipeline.crf.graphcut import keep_freed_memory
from pipeline.data import noisy_blocks


@pytest.fixture(scope="module")
def pool():
    with GraphCutPool(2) as p:
        yield p


def test_pool_cuts_equal_in_process_cuts(pool):
    samples = [noisy_blocks((40, 48), rng=i) for i in range(5)]
    crfs = [GridCRF.from_probabilities(s.prob, s.image) for s in samples]
    weights = CRFWeights(0.7, 0.2, 0.5)
    truths = [s.truth for s in samples]
    for pooled, crf, truth in zip(pool.cut_all(crfs, weights, truths), crfs, truths, strict=True):
        np.testing.assert_array_equal(pooled, graph_cut(crf, weights, truth))
    for pooled, crf in zip(pool.cut_all(crfs, weights), crfs, strict=True):
        np.testing.assert_array_equal(pooled, graph_cut(crf, weights))


def test_many_cuts_come_back_in_order(pool):
    # 19 images over 8 strided chunks: every chunk holds several, results reassembled
    samples = [noisy_blocks((24, 20), rng=100 + i) for i in range(19)]
    weights = CRFWeights(0.6, 0.3, 0.4)
    pooled = pool.map_labellings([s.prob for s in samples], [s.image for s in samples], weights)
    assert len(pooled) == 19
    for got, s in zip(pooled, samples, strict=True):
        np.testing.assert_array_equal(got, map_labelling(s.prob, s.image, weights))
    assert pool.map_labellings([], [], weights) == []


def test_pool_sends_only_what_persistency_leaves_to_cut(pool):
    # confident maps (nothing left to cut, no job sent), maps with an uncertain box, and noisy
    # ones cut whole, mixed over the chunks: the results equal the in-process ones, in order
    rng = np.random.default_rng(7)
    probs, images = [], []
    for k in range(11):
        truth = np.zeros((30, 40))
        truth[5:20, 8:30] = 1
        logit = 12.0 * (2.0 * truth - 1.0)
        if k % 3 == 1:
            logit[3:10, 5:15] = rng.standard_normal((7, 10))
        elif k % 3 == 2:
            logit = rng.standard_normal(truth.shape)
        probs.append(1.0 / (1.0 + np.exp(-logit)))
        images.append(truth + 0.2 * rng.standard_normal(truth.shape))
    weights = CRFWeights(0.5, 0.1, 0.2)
    pooled = pool.map_labellings(probs, images, weights)
    for got, prob, image in zip(pooled, probs, images, strict=True):
        np.testing.assert_array_equal(got, map_labelling(prob, image, weights))
    crfs = [GridCRF.from_probabilities(p, x) for p, x in zip(probs, images, strict=True)]
    for got, crf in zip(pool.cut_all(crfs, weights), crfs, strict=True):
        np.testing.assert_array_equal(got, graph_cut(crf, weights))
    assert np.array_equal(pooled[0], (probs[0] > 0.5).astype(np.uint8))


def test_cutting_plane_with_pool_matches_serial(pool):
    samples = [noisy_blocks((32, 32), rng=50 + i) for i in range(4)]
    crfs = [GridCRF.from_probabilities(s.prob, s.image) for s in samples]
    truths = [s.truth for s in samples]
    serial = cutting_plane(crfs, truths, C=10.0, update="pass")  # the pool's schedule
    pooled = cutting_plane(crfs, truths, C=10.0, pool=pool)
    assert pooled.iterations == serial.iterations
    assert pooled.gamma == pytest.approx(serial.gamma, rel=1e-12)
    for a, b in zip(pooled.working_sets, serial.working_sets, strict=True):
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_pool_cannot_serve_the_per_sample_schedule(pool):
    crfs = [GridCRF.from_probabilities(np.full((4, 4), 0.5), np.zeros((4, 4)))]
    with pytest.raises(ValueError, match="a pool cannot share its cuts"):
        cutting_plane(crfs, [np.zeros((4, 4), np.uint8)], update="sample", pool=pool)


def test_pool_rejects_bad_input(pool):
    crf = GridCRF.from_probabilities(np.full((4, 4), 0.5), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="at least 1 worker"):
        GraphCutPool(0)
    with pytest.raises(ValueError, match="got 1 CRFs but 2 truths"):
        pool.cut_all([crf], CRFWeights(), [np.zeros((4, 4)), np.zeros((4, 4))])
    with pytest.raises(ValueError, match="truth must be binary"):
        pool.cut_all([crf], CRFWeights(), [np.full((4, 4), 3)])


def _faults_of_repeated_cuts() -> int:
    """Minor page faults of the second of two identical rounds of 512² MAP cuts."""
    rng = np.random.default_rng(0)
    images = [rng.random((512, 512)).astype(np.float32) for _ in range(3)]

    def cuts():
        for x in images:
            map_labelling(x, x, CRFWeights(1.0, 0.1, 0.1))

    cuts()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cuts()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_pool_workers_reuse_freed_memory(pool):
    glibc = platform.libc_ver()[0] == "glibc"
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as other:  # not this test process's malloc
        assert other.submit(keep_freed_memory).result() is glibc
    pooled = pool._executor.submit(_faults_of_repeated_cuts).result()
    # a plain spawned process (no initialiser) pages in each slice's arrays afresh
    with ProcessPoolExecutor(1, mp_context=spawn) as plain:
        control = plain.submit(_faults_of_repeated_cuts).result()
    if glibc:
        assert pooled < 500 < 5000 < control
