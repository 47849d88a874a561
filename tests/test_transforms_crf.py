"""The CRF as MONAI transforms (GraphCutCRF / GraphCutCRFd) and the bundles' inferer
(SliceResizeInferer), against the project's own functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from pipeline.crf import CRFWeights, map_labelling, volume_map_labelling
from pipeline.data import noisy_blocks
from pipeline.inference.inferer import SliceResizeInferer
from pipeline.inference.predictor import TrainedModel
from pipeline.models import build_model, has_learned_pairwise, save_checkpoint
from pipeline.transforms import GraphCutCRF, GraphCutCRFd, crf_settings
from tests.test_engines_training import TINY_NET

WEIGHTS = CRFWeights(0.8, 0.3, 0.5)


def _volume(shape=(20, 18, 12), seed=0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.float32)
    truth[5:15, 4:14, 3:9] = 1.0
    prob = np.clip(0.5 + 0.35 * (2 * truth - 1) + 0.3 * rng.standard_normal(shape), 0.01, 0.99)
    image = np.clip(truth * 0.6 + 0.2 + 0.1 * rng.standard_normal(shape), 0, 1)
    return prob.astype(np.float32), image.astype(np.float32)


def test_a_2d_map_is_the_graph_cut_map_labelling():
    sample = noisy_blocks((24, 28), rng=3, noise=1.5)
    mask = GraphCutCRF(WEIGHTS, connectivity=8)(sample.prob[None], sample.image[None])
    oracle = map_labelling(sample.prob, sample.image, WEIGHTS, connectivity=8)
    assert mask.shape == (1, 24, 28) and mask.dtype == torch.uint8
    np.testing.assert_array_equal(mask[0].numpy(), oracle)
    assert 0 < oracle.sum() < oracle.size


def test_a_volume_is_cut_slice_by_slice_in_its_view_or_as_one_3d_grid():
    prob, image = _volume()
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    meta_prob = MetaTensor(torch.as_tensor(prob[None]), affine=torch.as_tensor(affine))
    # axial slices are the z-planes; with β fixed, each plane's cut does not depend on how
    # the plane is displayed (rows and columns reversed and swapped), so this is an oracle
    axial = GraphCutCRF(WEIGHTS, view="axial", beta=3.0)(meta_prob, image[None])
    oracle = np.stack([map_labelling(prob[:, :, k], image[:, :, k], WEIGHTS, beta=3.0)
                       for k in range(prob.shape[2])], axis=2)
    np.testing.assert_array_equal(axial[0].numpy(), oracle)
    assert isinstance(axial, MetaTensor)
    np.testing.assert_allclose(axial.affine.numpy(), affine)
    sagittal = GraphCutCRF(WEIGHTS, view="sagittal", beta=3.0)(prob[None], image[None])
    oracle = np.stack([map_labelling(prob[i], image[i], WEIGHTS, beta=3.0)
                       for i in range(prob.shape[0])])
    np.testing.assert_array_equal(sagittal[0].numpy(), oracle)
    cut3d = GraphCutCRF(WEIGHTS, crf_3d=True)(meta_prob, image[None])
    np.testing.assert_array_equal(cut3d[0].numpy(), volume_map_labelling(
        prob, image, WEIGHTS, spacing=[0.8, 0.8, 2.5]))


def test_the_dictionary_transform_works_in_a_compose_and_reads_a_checkpoint(tmp_path):
    model = build_model(TINY_NET)
    ckpt = save_checkpoint({"network": TINY_NET, "model": model.state_dict(),
                            "crf": [0.8, 0.3, 0.5],
                            "config": {"connectivity": 8, "beta": 2.0}}, tmp_path / "m.pt")
    weights, connectivity, beta = crf_settings(ckpt)
    assert weights == WEIGHTS and connectivity == 8 and beta == 2.0
    sample = noisy_blocks((20, 20), rng=5, noise=1.5)
    out = Compose([GraphCutCRFd("pred", "image", checkpoint=ckpt)])(
        {"pred": sample.prob[None], "image": sample.image[None], "other": 1})
    np.testing.assert_array_equal(out["pred"][0].numpy(), map_labelling(
        sample.prob, sample.image, WEIGHTS, connectivity=8, beta=2.0))
    assert out["other"] == 1
    cnn_only = save_checkpoint({"network": TINY_NET, "model": model.state_dict()},
                               tmp_path / "cnn.pt")
    with pytest.raises(ValueError, match=r"cnn\.pt: a CNN-only model"):
        GraphCutCRFd("pred", checkpoint=cnn_only)


def test_bad_settings_and_shapes_are_refused():
    with pytest.raises(ValueError, match="give the CRF weights or a checkpoint"):
        GraphCutCRF()
    with pytest.raises(ValueError, match="give the CRF weights or a checkpoint"):
        GraphCutCRF(WEIGHTS, checkpoint="x.pt")
    prob, image = _volume()
    with pytest.raises(ValueError, match="needs the view"):
        GraphCutCRF(WEIGHTS)(prob[None], image[None])
    with pytest.raises(ValueError, match="grid"):
        GraphCutCRF(WEIGHTS, view="axial")(prob[None], image[None, :, :, :5])
    with pytest.raises(ValueError, match="view must be one of"):
        GraphCutCRF(WEIGHTS, view="oblique")(prob[None], image[None])


def test_the_inferer_gives_the_models_own_probabilities(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY_NET).eval()
    ckpt = save_checkpoint({"network": TINY_NET, "model": model.state_dict(),
                            "config": {"data": {"size": 32, "view": "coronal"}}},
                           tmp_path / "m.pt")
    trained = TrainedModel.from_checkpoint(ckpt)
    images = np.random.default_rng(1).random((5, 40, 36)).astype(np.float32)
    inferer = SliceResizeInferer(checkpoint=ckpt, batch_size=2)
    assert (inferer.size, inferer.view) == (32, "coronal")
    got = inferer(torch.as_tensor(images[:, None]), trained.model)
    np.testing.assert_array_equal(got[:, 0].numpy(), trained.probabilities(images, batch_size=2))
    volume = np.random.default_rng(2).random((1, 1, 20, 18, 12)).astype(np.float32)
    got = inferer(MetaTensor(torch.as_tensor(volume)), trained.model)
    assert isinstance(got, MetaTensor) and got.shape == (1, 1, 20, 18, 12)
    assert 0.0 <= float(got.min()) and float(got.max()) <= 1.0
    with pytest.raises(ValueError, match="tta needs the checkpoint"):
        SliceResizeInferer(32, tta=True)
    with pytest.raises(ValueError, match="trained without flips"):
        SliceResizeInferer(checkpoint=ckpt, tta=True)
    with pytest.raises(ValueError, match="need the view"):
        SliceResizeInferer(32)(torch.as_tensor(volume), trained.model)


LP_WEIGHTS = CRFWeights(0.8, 0.1, 0.2, 1.5)


def _lp_checkpoint(tmp_path, **config):
    """A tiny model with a boundary head and a CRF with the learned edge feature."""
    torch.manual_seed(3)
    network = dict(TINY_NET, boundary_head=True)
    model = build_model(network).eval()
    return save_checkpoint({"network": network, "model": model.state_dict(),
                            "crf": LP_WEIGHTS.as_array(learned=True).tolist(),
                            "config": {"connectivity": 8, "data": {"size": 32}, **config}},
                           tmp_path / "lp.pt")


def test_a_learned_pairwise_model_runs_through_the_inferer_and_the_crf_transform(tmp_path):
    ckpt = _lp_checkpoint(tmp_path)
    assert has_learned_pairwise(ckpt)
    trained = TrainedModel.from_checkpoint(ckpt)
    images = np.random.default_rng(4).random((3, 40, 36)).astype(np.float32)
    inferer = SliceResizeInferer(checkpoint=ckpt, batch_size=2)
    assert inferer.boundary
    maps = inferer(torch.as_tensor(images[:, None]), trained.model)
    assert maps.shape == (3, 2, 40, 36)
    probs, edges = trained.maps(images, batch_size=2)
    np.testing.assert_array_equal(maps[:, 0].numpy(), probs)
    np.testing.assert_array_equal(maps[:, 1].numpy(), edges)
    crf = Compose([GraphCutCRFd("pred", "image", checkpoint=ckpt)])
    for k in range(3):
        out = crf({"pred": maps[k], "image": torch.as_tensor(images[k][None])})["pred"]
        oracle = map_labelling(probs[k], images[k], LP_WEIGHTS, connectivity=8,
                               boundary=edges[k])
        assert out.shape == (1, 40, 36)
        np.testing.assert_array_equal(out[0].numpy(), oracle)
    # the second channel is what the term reads: b = 1 everywhere (no learned feature) and
    # b = 0 (every edge's feature 1) give other masks on the same probabilities
    sample = noisy_blocks((24, 28), rng=3, noise=1.5)
    cut = GraphCutCRF(LP_WEIGHTS, learned_pairwise=True, connectivity=8)
    masks = {}
    for b in (0.0, 1.0):
        edges = np.full(sample.prob.shape, b, np.float32)
        masks[b] = cut(np.stack([sample.prob, edges]), sample.image[None])[0].numpy()
        np.testing.assert_array_equal(masks[b], map_labelling(
            sample.prob, sample.image, LP_WEIGHTS, connectivity=8, boundary=edges))
    assert not np.array_equal(masks[0.0], masks[1.0])
    # a volume: the boundary channel is sliced and restacked with the probabilities
    volume = np.random.default_rng(5).random((1, 1, 20, 18, 12)).astype(np.float32)
    maps = SliceResizeInferer(checkpoint=ckpt, view="axial")(torch.as_tensor(volume),
                                                             trained.model)
    assert maps.shape == (1, 2, 20, 18, 12)
    mask = GraphCutCRF(checkpoint=ckpt, view="axial")(maps[0], volume[0])
    axial = maps[0].numpy()
    oracle = np.stack([map_labelling(axial[0, :, :, z], volume[0, 0, :, :, z], LP_WEIGHTS,
                                     connectivity=8, boundary=axial[1, :, :, z])
                       for z in range(12)], axis=2)  # a plane's cut ignores its display
    np.testing.assert_array_equal(mask[0].numpy(), oracle)
    # the 3-D cut reads the boundary channel as a volume, on the edges of all three axes
    rng = np.random.default_rng(6)
    prob, edges = rng.random((2, 20, 18, 12)).astype(np.float32)
    cut3d = GraphCutCRF(LP_WEIGHTS, learned_pairwise=True, crf_3d=True)
    mask = cut3d(np.stack([prob, edges]), volume[0])[0].numpy()
    oracle3d = volume_map_labelling(prob, volume[0, 0], LP_WEIGHTS, boundary=edges)
    np.testing.assert_array_equal(mask, oracle3d)
    assert not np.array_equal(oracle3d, volume_map_labelling(prob, volume[0, 0], LP_WEIGHTS))


def test_a_learned_pairwise_crf_refuses_what_it_cannot_cut(tmp_path):
    ckpt = _lp_checkpoint(tmp_path)
    sample = noisy_blocks((20, 20), rng=5, noise=1.5)
    with pytest.raises(ValueError, match=r"2×H×W or 2×X×Y×Z input \(probabilities, boundary"):
        GraphCutCRF(checkpoint=ckpt)(sample.prob[None], sample.image[None])
    with pytest.raises(ValueError, match=r"w4 = 1\.5 weighs the learned edge feature"):
        GraphCutCRF(LP_WEIGHTS)
    plain = build_model(TINY_NET).eval()
    with pytest.raises(ValueError, match="the network has no boundary head"):
        SliceResizeInferer(32, boundary=True)(torch.zeros(1, 1, 20, 20), plain)
