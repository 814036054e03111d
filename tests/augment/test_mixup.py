"""Mixup: convex pairs, soft targets that still sum to one, Beta draws under a generator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustseg.augment import mixup_batch, sample_beta


def _batch(b: int = 8, k: int = 4):
    g = torch.Generator().manual_seed(0)
    # Sample i is the constant image i, so a mixed value tells which partner it met.
    image = torch.arange(b, dtype=torch.float32).reshape(b, 1, 1, 1).expand(b, 1, 16, 16).contiguous()
    label = torch.randint(0, k, (b, 16, 16), generator=g)
    target = F.one_hot(label, k).permute(0, 3, 1, 2).float()
    return image, target


def test_mixed_pairs_are_convex_and_targets_sum_to_one():
    image, target = _batch()
    out, soft, lam = mixup_batch(image, target, 0.4, torch.Generator().manual_seed(1), return_lambda=True)
    assert out.shape == image.shape and soft.shape == target.shape
    assert ((lam >= 0.5) & (lam <= 1)).all()  # folded: each sample stays the dominant one
    assert torch.allclose(soft.sum(1), torch.ones(8, 16, 16), atol=1e-6)
    assert (soft >= 0).all() and (soft <= 1).all()
    # out_i = lam_i * i + (1 - lam_i) * j_i: recover the partners; they form a permutation.
    own = torch.arange(8, dtype=torch.float32)
    mixed = out[:, 0, 0, 0]
    partner = torch.where(lam < 1, (mixed - lam * own) / (1 - lam).clamp_min(1e-12), own)
    assert torch.allclose(partner, partner.round(), atol=1e-3)
    assert sorted(partner.round().long().tolist()) == list(range(8))


def test_tiny_or_zero_alpha_is_identity():
    image, target = _batch()
    for alpha in (0.0, 1e-6):
        out, soft = mixup_batch(image, target, alpha, torch.Generator().manual_seed(2))
        assert torch.equal(out, image) and torch.equal(soft, target)


def test_deterministic_under_the_generator():
    image, target = _batch()
    image = image + torch.randn(image.shape, generator=torch.Generator().manual_seed(5))
    a = mixup_batch(image, target, 0.4, torch.Generator().manual_seed(3))
    b = mixup_batch(image, target, 0.4, torch.Generator().manual_seed(3))
    c = mixup_batch(image, target, 0.4, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("alpha", [0.2, 1.0, 3.0])
def test_beta_draws_have_beta_moments(alpha):
    lam = sample_beta(alpha, (20000,), torch.Generator().manual_seed(6)).double()
    assert ((lam >= 0) & (lam <= 1)).all()
    var = 1.0 / (4 * (2 * alpha + 1))  # Var of Beta(a, a)
    assert abs(float(lam.mean()) - 0.5) < 5 * (var / 20000) ** 0.5
    assert abs(float(lam.var()) / var - 1) < 0.05
    if alpha == 1.0:  # Beta(1, 1) is uniform: check the quartiles too
        q = torch.quantile(lam, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        assert torch.allclose(q, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), atol=0.015)


def test_bad_inputs():
    image, target = _batch()
    with pytest.raises(ValueError, match="float tensor"):
        mixup_batch(image, target.long(), 0.4, torch.Generator())
    with pytest.raises(ValueError, match="does not match"):
        mixup_batch(image, target[:, :, :8], 0.4, torch.Generator())
    with pytest.raises(ValueError, match="alpha must be > 0"):
        sample_beta(0.0, (3,), torch.Generator())
