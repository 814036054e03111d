"""The GPU's sync-free path (blend full-batch results by mask), exercised on the CPU."""
import pytest
import torch

import robustseg.augment.intensity as intensity
from robustseg.augment import build_augmenter
from robustseg.config import AugmentConfig


@pytest.fixture
def force(monkeypatch):
    def set_mode(value):
        monkeypatch.setattr(intensity, "SYNC_FREE", value)
    return set_mode


def _batch(seed=0, b=16):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 1, 32, 32, generator=g)
    label = torch.randint(0, 4, (b, 1, 32, 32), generator=g)
    return image, label


def test_blend_mode_leaves_unselected_rows_exact(force):
    force(True)
    aug = build_augmenter(AugmentConfig(preset="nnunet"), 2)
    image, label = _batch()
    out_i, out_l, info = aug(image, label, torch.Generator().manual_seed(1), return_info=True)
    touched = torch.zeros(image.shape[0], dtype=torch.bool)
    for mask in info.values():
        touched |= mask if mask.ndim == 1 else mask.any(1)
    assert (~touched).any() and touched.any()
    assert torch.equal(out_i[~touched], image[~touched]) and torch.equal(out_l[~touched], label[~touched])
    assert not torch.equal(out_i[touched], image[touched])
    assert set(out_l.unique().tolist()) <= {0, 1, 2, 3}


def test_blend_equals_subset_when_every_row_is_selected(force):
    every = {name: {"p": 1.0} for name in ("rotation", "scaling", "noise", "brightness", "gamma")}
    cfg = AugmentConfig(preset="none", params=every)
    image, label = _batch(3)
    force(False)
    a = build_augmenter(cfg, 2)(image, label, torch.Generator().manual_seed(5))
    force(True)
    b = build_augmenter(cfg, 2)(image, label, torch.Generator().manual_seed(5))
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.equal(a[1], b[1])
