"""`Augmenter.motion_pairs`: clean and motion views of the same patches with the same draws."""
from __future__ import annotations

import pytest
import torch

from robustseg.augment.presets import build_augmenter
from robustseg.config import AugmentConfig


def augmenter(levels, out_shape=(32, 32)):
    aug = build_augmenter(AugmentConfig(preset="cardiac"), 2, "cmr", out_shape=out_shape)
    aug.params["motion"]["levels"] = list(levels)
    return aug


def batch(n: int = 6, size: int = 48):
    g = torch.Generator().manual_seed(1)
    image = torch.randn((n, 1, size, size), generator=g)
    label = torch.randint(0, 4, (n, 1, size, size), generator=g)
    return image, label


def test_with_a_motion_free_level_the_two_views_are_bit_identical() -> None:
    # Level 0 leaves the source as it is, so any difference would come from unshared draws.
    image, label = batch()
    x, y = augmenter([0]).motion_pairs(image, label, torch.Generator().manual_seed(0))
    assert x.shape == (6, 1, 32, 32) and y.shape == (6, 1, 32, 32)
    assert torch.equal(x[:3], x[3:]) and torch.equal(y[:3], y[3:])


def test_the_second_half_carries_the_artefact_and_shares_the_label() -> None:
    image, label = batch()
    x, y = augmenter([3]).motion_pairs(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(y[:3], y[3:])
    per_sample = (x[:3] - x[3:]).abs().flatten(1).mean(1)
    assert bool((per_sample > 0.05).all()), per_sample


def test_sources_are_every_other_sample_and_an_odd_batch_rounds_up() -> None:
    # The strided pick keeps the sampler's foreground-first order spread over both halves.
    image, label = batch(n=5, size=32)
    aug = augmenter([0], out_shape=None)
    aug.params = {k: ({**v, "p": 0.0} if "p" in v else v) for k, v in aug.params.items()}
    aug.params["motion"]["levels"] = [0]
    x, y = aug.motion_pairs(image, label, torch.Generator().manual_seed(0))
    assert x.shape[0] == 6
    assert torch.equal(x[:3], image[::2]) and torch.equal(y[3:], label[::2])


def test_same_generator_state_gives_the_same_pairs() -> None:
    image, label = batch()
    aug = augmenter([2, 3])
    a = aug.motion_pairs(image, label, torch.Generator().manual_seed(7))
    b = aug.motion_pairs(image, label, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_mismatched_label_is_refused() -> None:
    image, label = batch()
    with pytest.raises(ValueError):
        augmenter([3]).motion_pairs(image, label[:, :, :10], torch.Generator())
