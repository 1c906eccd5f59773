"""Batch augmentation: seeded, bounded, mild, and on whole batches."""

from __future__ import annotations

import torch

from medlens.config import AugmentConfig
from medlens.data.augment import BatchAugment


def _batch(n: int = 16, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = (0.3 + 0.4 * xx * yy)[None, None]
    return (base + 0.05 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)


def test_same_seed_same_augmentation_and_different_seed_differs():
    x = _batch()
    a = BatchAugment(AugmentConfig(), torch.Generator().manual_seed(1))(x)
    b = BatchAugment(AugmentConfig(), torch.Generator().manual_seed(1))(x)
    c = BatchAugment(AugmentConfig(), torch.Generator().manual_seed(2))(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_stays_in_range_and_shape_and_each_image_is_changed_differently():
    x = _batch()
    y = BatchAugment(AugmentConfig(p=1.0), torch.Generator().manual_seed(0))(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    change = (y - x).abs().mean(dim=(1, 2, 3))
    assert (change > 1e-3).all() and change.std() > 1e-4


def test_disabled_or_probability_zero_is_the_identity():
    x = _batch()
    assert torch.equal(BatchAugment(AugmentConfig(enabled=False), torch.Generator())(x), x)
    y = BatchAugment(AugmentConfig(p=0.0, noise_std=0.0), torch.Generator().manual_seed(0))(x)
    assert torch.allclose(y, x, atol=1e-5)


def test_augmentation_is_mild_enough_to_keep_the_anatomy():
    """A radiologist would accept it: the augmented image still correlates strongly with the original."""
    x = _batch(32)
    y = BatchAugment(AugmentConfig(p=1.0), torch.Generator().manual_seed(0))(x)
    xc = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    yc = y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
    corr = (xc * yc).sum(1) / (xc.norm(dim=1) * yc.norm(dim=1))
    assert corr.min() > 0.6
