"""Training-batch augmentation: flips, affine warps and intensity jitter, image and label alike."""

from __future__ import annotations

import pytest
import torch

from pipeline.engines import TrainConfig
from pipeline.engines.augment import Augmentation


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(4, 1, 40, 48)
    labels[:, :, 8:30, 10:26] = 1.0  # an off-centre block, so flips and shifts show
    images = torch.cat([labels, torch.rand(4, 2, 40, 48, generator=gen)], 1)
    return images, labels


def test_flips_are_exact_and_move_image_and_label_together():
    images, labels = _batch()
    out_i, out_l = Augmentation(hflip=1.0, vflip=0.0)(images, labels, torch.Generator())
    assert torch.equal(out_i, images.flip(-1)) and torch.equal(out_l, labels.flip(-1))
    out_i, out_l = Augmentation(hflip=0.0, vflip=1.0)(images, labels, torch.Generator())
    assert torch.equal(out_i, images.flip(-2)) and torch.equal(out_l, labels.flip(-2))


def test_the_warp_path_at_identity_equals_the_exact_flips():
    # the affine sampler's flip conventions checked against torch.flip (a second implementation)
    images, labels = _batch()
    aug = Augmentation(hflip=1.0, vflip=1.0, scale=(1.0, 1.0 + 1e-12))
    assert aug.warps
    out_i, out_l = aug(images, labels, torch.Generator())
    assert torch.allclose(out_i, images.flip(-1).flip(-2), atol=1e-5)
    assert torch.equal(out_l, labels.flip(-1).flip(-2))


def test_warps_keep_labels_binary_and_aligned_with_the_image():
    images, labels = _batch()
    aug = Augmentation(hflip=0.5, scale=(0.8, 1.25), rotate=15.0, translate=0.1)
    out_i, out_l = aug(images, labels, torch.Generator().manual_seed(3))
    assert set(out_l.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out_l, labels)
    # channel 0 of the image is the label itself: warped bilinearly and thresholded it must
    # agree with the nearest-neighbour label warp everywhere but along the edges
    agree = ((out_i[:, :1] > 0.5).float() == out_l).float().mean()
    assert agree > 0.97


def test_intensity_jitter_changes_images_only():
    images, labels = _batch()
    aug = Augmentation(hflip=0.0, vflip=0.0, brightness=0.2, contrast=0.3)
    out_i, out_l = aug(images, labels, torch.Generator().manual_seed(1))
    assert torch.equal(out_l, labels) and not torch.allclose(out_i, images)


def test_same_generator_seed_same_batch():
    images, labels = _batch()
    aug = Augmentation(scale=(0.9, 1.1), rotate=10.0, brightness=0.1)
    a = aug(images, labels, torch.Generator().manual_seed(7))
    b = aug(images, labels, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_config_values():
    assert Augmentation.from_config(False) is None and Augmentation.from_config(None) is None
    assert Augmentation.from_config(True) == Augmentation()
    aug = Augmentation.from_config({"vflip": 0, "scale": [0.8, 1.2], "rotate": 5})
    assert aug.vflip == 0.0 and aug.scale == (0.8, 1.2) and aug.rotate == 5.0
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['rotation'\]"):
        Augmentation.from_config({"rotation": 5})
    with pytest.raises(ValueError, match="hflip is a probability"):
        Augmentation.from_config({"hflip": 2})
    with pytest.raises(ValueError, match="scale must be"):
        Augmentation.from_config({"scale": [1.2, 0.8]})
    with pytest.raises(ValueError, match="unknown setting"):  # fails when the config is made
        TrainConfig(augment={"zoom": 1.1})
