"""The 6-connected 3-D graph cut against exhaustive search on tiny volumes, against the 2-D cut
on volumes of depth 1, and its refusal of bad input."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.crf import CRFWeights, map_labelling, volume_energy, volume_map_labelling
from pipeline.crf.volume import spacing_factors
from tests.oracles.brute import volume_beta_loop, volume_brute_minimum, volume_energy_loop

SHAPE = (2, 2, 3)  # 12 voxels: 4096 labellings


def _costs(prob):
    return -np.log1p(-prob), -np.log(prob)


def _random_case(rng, shape, channels):
    prob = rng.uniform(0.02, 0.98, shape)
    image = rng.random(shape) if channels == 0 else rng.random((channels, *shape))
    # pairwise weights large enough to matter on 12 voxels, sometimes one of them 0
    w = rng.uniform(0.0, 2.0, 3) * (rng.random(3) > 0.2)
    w[0] = rng.uniform(0.2, 2.0)
    return prob, image, CRFWeights(*w)


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0, 1.0), (0.7, 0.7, 2.5), (3.0, 1.0, 0.5)])
def test_map_labelling_is_the_brute_force_minimum(rng, spacing):
    for channels in (0, 2, 0):
        prob, image, weights = _random_case(rng, SHAPE, channels)
        beta = float(rng.uniform(0.5, 8.0))
        y = volume_map_labelling(prob, image, weights, spacing=spacing, beta=beta)
        assert y.dtype == np.uint8 and y.shape == SHAPE
        found = volume_energy_loop(*_costs(prob), image, y, weights.as_array(), beta, spacing)
        best = volume_brute_minimum(*_costs(prob), image, weights.as_array(), beta, spacing)
        assert found == pytest.approx(best, abs=1e-12)
        assert volume_energy(y, prob, image, weights, spacing=spacing, beta=beta) == \
            pytest.approx(found, rel=1e-12)


def test_data_driven_beta_is_taken_over_the_whole_volume(rng):
    prob, image, weights = _random_case(rng, SHAPE, 0)
    weights = CRFWeights(weights.w1, 0.0, 1.5)  # contrast only: β decides the result
    beta = volume_beta_loop(image, SHAPE)
    y = volume_map_labelling(prob, image, weights)
    found = volume_energy_loop(*_costs(prob), image, y, weights.as_array(), beta)
    assert found == pytest.approx(
        volume_brute_minimum(*_costs(prob), image, weights.as_array(), beta), abs=1e-12)
    for _ in range(5):
        other = (rng.random(SHAPE) < 0.5).astype(np.uint8)
        assert volume_energy(other, prob, image, weights) == pytest.approx(
            volume_energy_loop(*_costs(prob), image, other, weights.as_array(), beta), rel=1e-12)


def test_voxels_are_coupled_across_slices(rng):
    """A voxel whose CNN vote is weak follows its neighbours in the slices above and below,
    which no slice-by-slice CRF can do (that slice alone has nothing to smooth towards)."""
    prob = np.full((3, 1, 1), 0.9)
    prob[1] = 0.3
    image = np.zeros((3, 1, 1))
    weights = CRFWeights(1.0, 1.0, 0.0)
    assert map_labelling(prob[1], image[1], weights).tolist() == [[0]]
    assert volume_map_labelling(prob, image, weights).ravel().tolist() == [1, 1, 1]
    # thick slices: the coupling along axis 0 is scaled by 1/spacing and no longer wins
    thick = volume_map_labelling(prob, image, weights, spacing=(10.0, 1.0, 1.0))
    assert thick.ravel().tolist() == [1, 0, 1]


@pytest.mark.parametrize("beta", [None, 2.0])
@pytest.mark.parametrize("spacing", [None, (4.0, 0.8, 0.8)])
def test_a_volume_of_depth_one_is_the_2d_cut(rng, beta, spacing):
    for _ in range(4):
        weights = CRFWeights(1.0, *rng.uniform(0.1, 0.8, 2))
        prob = rng.uniform(0.0, 1.0, (23, 17))
        image = rng.random((3, 23, 17))
        flat = map_labelling(prob, image, weights, connectivity=4, beta=beta)
        deep = volume_map_labelling(prob[None], image[:, None], weights, spacing=spacing,
                                    beta=beta)
        np.testing.assert_array_equal(deep[0], flat)
        assert 0 < np.count_nonzero(flat != (prob > 0.5)) < flat.size  # the CRF did something


def test_the_same_slice_along_another_axis_is_the_2d_cut(rng):
    weights = CRFWeights(1.0, 0.02, 0.03)
    prob = rng.uniform(0.0, 1.0, (12, 9))
    image = rng.random((12, 9))
    flat = map_labelling(prob, image, weights)
    deep = volume_map_labelling(prob[:, None], image[:, None], weights)
    np.testing.assert_array_equal(deep[:, 0], flat)


def test_spacing_factors_follow_face_areas():
    np.testing.assert_allclose(spacing_factors(None), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(spacing_factors((0.5, 0.5, 2.0)), [1.0, 1.0, 0.25])
    np.testing.assert_allclose(spacing_factors([2.0, 1.0, 4.0]), [0.5, 1.0, 0.25])


def test_only_relative_spacing_matters(rng):
    prob = rng.uniform(0.0, 1.0, (4, 6, 5))
    image = rng.random((4, 6, 5))
    weights = CRFWeights(1.0, 0.05, 0.05)
    a = volume_map_labelling(prob, image, weights, spacing=(2.5, 0.9, 0.9))
    b = volume_map_labelling(prob, image, weights, spacing=(25.0, 9.0, 9.0))
    np.testing.assert_array_equal(a, b)


def test_unary_only_is_thresholding(rng):
    prob = rng.uniform(0.0, 1.0, (5, 6, 7))
    y = volume_map_labelling(prob, rng.random((5, 6, 7)), CRFWeights(1.0, 0.0, 0.0))
    np.testing.assert_array_equal(y, (prob > 0.5).astype(np.uint8))


PROB = np.full((2, 3, 4), 0.5)
IMAGE = np.zeros((2, 3, 4))
W = CRFWeights(1.0, 0.5, 0.5)


@pytest.mark.parametrize(("prob", "image", "kwargs", "message"), [
    (np.full((2, 3, 4), 1.5), IMAGE, {}, r"prob must lie in \[0, 1\]"),
    (np.full((2, 3, 4), -0.1), IMAGE, {}, r"prob must lie in \[0, 1\]"),
    (np.where(np.ones((2, 3, 4)) > 0, np.nan, 0.5), IMAGE, {}, "prob contains NaN"),
    (np.full((3, 4), 0.5), IMAGE, {}, "prob must be a non-empty D×H×W array"),
    (np.full((1, 2, 3, 4), 0.5), IMAGE, {}, "prob must be a non-empty D×H×W array"),
    (np.zeros((0, 3, 4)), IMAGE, {}, "prob must be a non-empty D×H×W array"),
    (np.full((2, 3, 4), "a"), IMAGE, {}, "prob must be numeric"),
    (PROB, np.zeros((2, 3, 5)), {}, r"image must be D×H×W or C×D×H×W with D×H×W = \(2, 3, 4\)"),
    (PROB, np.zeros((3, 4)), {}, "image must be D×H×W or C×D×H×W"),
    (PROB, np.full((2, 3, 4), np.inf), {}, "image contains NaN or infinite"),
    (PROB, IMAGE, {"spacing": (1.0, 1.0)}, "spacing must be three finite numbers > 0"),
    (PROB, IMAGE, {"spacing": (1.0, 0.0, 1.0)}, "spacing must be three finite numbers > 0"),
    (PROB, IMAGE, {"spacing": (1.0, np.nan, 1.0)}, "spacing must be three finite numbers > 0"),
    (PROB, IMAGE, {"spacing": "thick"}, "spacing must be three numbers > 0"),
    (PROB, IMAGE, {"beta": -1.0}, "beta must be None"),
])
def test_bad_input_is_refused(prob, image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        volume_map_labelling(prob, image, W, **kwargs)
    with pytest.raises(ValueError, match=message):
        volume_energy(np.zeros((2, 3, 4), dtype=np.uint8), prob, image, W, **kwargs)


def test_bad_weights_or_labelling_are_refused():
    with pytest.raises(ValueError, match="weights must be a CRFWeights"):
        volume_map_labelling(PROB, IMAGE, (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"labelling must have shape \(2, 3, 4\)"):
        volume_energy(np.zeros((2, 3)), PROB, IMAGE, W)
    with pytest.raises(ValueError, match="labelling must be binary"):
        volume_energy(np.full((2, 3, 4), 2), PROB, IMAGE, W)


@pytest.mark.parametrize("learned", [False, True])
def test_a_confident_volume_is_cut_only_where_it_is_uncertain(rng, graph_sizes, no_persistency,
                                                              learned):
    # persistency on the 3-D cut: the voxels the unaries decide stay out of the graph, and
    # the labelling is the whole volume's cut (persistency switched off as the oracle); with
    # a boundary volume, the learned edges' capacities count in the bound too
    shape = (6, 40, 50)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[1:5, 10:30, 12:40] = 1
    logit = 12.0 * (2.0 * truth - 1.0) + 0.5 * rng.standard_normal(shape)
    logit[2:4, 8:16, 10:22] = 1.5 * rng.standard_normal((2, 8, 12))
    prob, image = 1.0 / (1.0 + np.exp(-logit)), truth + 0.3 * rng.standard_normal(shape)
    boundary = rng.random(shape) if learned else None
    weights = CRFWeights(0.5, 0.05, 0.1, 0.4) if learned else CRFWeights(0.5, 0.1, 0.2)
    spacing = (2.5, 0.8, 0.8)
    reduced = volume_map_labelling(prob, image, weights, spacing=spacing, boundary=boundary)
    assert 0 < graph_sizes[-1] <= 4 * 10 * 14  # the uncertain block grown by one voxel
    no_persistency()
    whole = volume_map_labelling(prob, image, weights, spacing=spacing, boundary=boundary)
    assert graph_sizes[-1] == prob.size
    np.testing.assert_array_equal(reduced, whole)
    if learned:  # the learned edges did something
        plain = volume_map_labelling(prob, image, weights, spacing=spacing)
        assert np.count_nonzero(whole != plain) > 0


def _learned_case(rng, shape):
    """A random case with a boundary volume and a w4 large enough to matter (sometimes 0)."""
    prob, image, weights = _random_case(rng, shape, 0)
    w4 = float(rng.uniform(0.3, 2.5)) if rng.random() > 0.2 else 0.0
    return prob, image, CRFWeights(*weights.as_array(), w4), rng.random(shape)


@pytest.mark.parametrize("spacing", [None, (0.7, 0.7, 2.5)])
def test_the_learned_edge_feature_cut_is_the_brute_force_minimum(rng, spacing):
    for _ in range(3):
        prob, image, weights, boundary = _learned_case(rng, SHAPE)
        beta = float(rng.uniform(0.5, 8.0))
        w = weights.as_array(learned=True)
        y = volume_map_labelling(prob, image, weights, spacing=spacing, beta=beta,
                                 boundary=boundary)
        found = volume_energy_loop(*_costs(prob), image, y, w, beta, spacing, boundary)
        best = volume_brute_minimum(*_costs(prob), image, w, beta, spacing, boundary)
        assert found == pytest.approx(best, abs=1e-12)
        assert volume_energy(y, prob, image, weights, spacing=spacing, beta=beta,
                             boundary=boundary) == pytest.approx(found, rel=1e-12)


def test_the_boundary_volume_moves_the_cut_across_slices():
    """A weak middle slice follows the slices above and below where the boundary map says
    no outline lies between them, and keeps its own vote where it says one does."""
    prob = np.full((3, 1, 1), 0.9)
    prob[1] = 0.3
    image = np.zeros((3, 1, 1))
    weights = CRFWeights(1.0, 0.0, 0.0, 1.0)
    smooth = volume_map_labelling(prob, image, weights, boundary=np.zeros((3, 1, 1)))
    assert smooth.ravel().tolist() == [1, 1, 1]
    outline = volume_map_labelling(prob, image, weights, boundary=np.ones((3, 1, 1)))
    assert outline.ravel().tolist() == [1, 0, 1]
    # without a boundary volume, w4 weighs nothing: the unaries alone
    assert volume_map_labelling(prob, image, weights).ravel().tolist() == [1, 0, 1]


@pytest.mark.parametrize("spacing", [None, (4.0, 0.8, 0.8)])
def test_a_volume_of_depth_one_with_a_boundary_map_is_the_2d_cut(rng, spacing):
    for _ in range(4):
        weights = CRFWeights(1.0, *rng.uniform(0.0, 0.3, 2), rng.uniform(0.3, 0.9))
        prob = rng.uniform(0.0, 1.0, (23, 17))
        image, boundary = rng.random((23, 17)), rng.random((23, 17))
        flat = map_labelling(prob, image, weights, connectivity=4, boundary=boundary)
        deep = volume_map_labelling(prob[None], image[None], weights, spacing=spacing,
                                    boundary=boundary[None])
        np.testing.assert_array_equal(deep[0], flat)
        plain = map_labelling(prob, image, weights, connectivity=4)
        assert np.count_nonzero(flat != plain) > 0  # the learned edges did something


@pytest.mark.parametrize(("boundary", "message"), [
    (np.zeros((2, 3, 5)), r"boundary must have shape \(2, 3, 4\)"),
    (np.full((2, 3, 4), 1.5), r"boundary strengths must be finite and lie in \[0, 1\]"),
    (np.full((2, 3, 4), np.nan), r"boundary strengths must be finite"),
])
def test_a_bad_boundary_volume_is_refused(boundary, message):
    weights = CRFWeights(1.0, 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match=message):
        volume_map_labelling(PROB, IMAGE, weights, boundary=boundary)
    with pytest.raises(ValueError, match=message):
        volume_energy(np.zeros((2, 3, 4), dtype=np.uint8), PROB, IMAGE, weights,
                      boundary=boundary)
