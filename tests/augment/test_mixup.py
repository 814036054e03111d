"""Mixup: convex pairs, soft targets that still sum to one, Beta draws under a generator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustseg.augment import mixup_batch, sample_beta
from robustseg.augment.mixup import asymmetric_mixup_batch, asymmetric_target


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


# --------------------------------------------------------------------------- asymmetric mixup
def _binary_labels(b: int = 8, size: int = 16):
    """Sample i: a foreground square at a sample-dependent place (so pairs overlap partly)."""
    label = torch.zeros(b, 1, size, size, dtype=torch.long)
    for i in range(b):
        r, c = (2 * i) % 9, (3 * i) % 9
        label[i, 0, r:r + 6, c:c + 6] = 1
    return label


def _partners(out: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Recover each sample's partner from constant images (sample i is the constant i)."""
    own = torch.arange(out.shape[0], dtype=torch.float32)
    mixed = out[:, 0, 0, 0]
    partner = torch.where(lam < 1, (mixed - lam * own) / (1 - lam).clamp_min(1e-12), own)
    return partner.round().long()


def test_asymmetric_mixup_pairs_and_mixes_images_exactly_as_mixup_batch():
    image, target = _batch()
    label = target.argmax(1, keepdim=True)
    a_img, a_t, a_lam = asymmetric_mixup_batch(image, label, 4, 0.4, torch.Generator().manual_seed(1),
                                               return_lambda=True)
    s_img, s_t, s_lam = mixup_batch(image, target, 0.4, torch.Generator().manual_seed(1), return_lambda=True)
    assert torch.equal(a_img, s_img) and torch.equal(a_lam, s_lam)
    # Never soft: every voxel is one class, fully, or left out (all zeros).
    assert set(a_t.unique().tolist()) <= {0.0, 1.0}
    assert set(a_t.sum(1).unique().tolist()) <= {0.0, 1.0}
    assert ((s_t > 0) & (s_t < 1)).any()  # the symmetric targets of the same pairs are soft


@pytest.mark.parametrize("margin", [0.2, 0.0])
def test_asymmetric_binary_rule_keeps_visible_foreground_hard(margin):
    b = 8
    label = _binary_labels(b)
    image = torch.arange(b, dtype=torch.float32).reshape(b, 1, 1, 1).expand(b, 1, 16, 16).contiguous()
    out, tgt, lam = asymmetric_mixup_batch(image, label, 2, 0.4, torch.Generator().manual_seed(3), margin=margin,
                                           return_lambda=True)
    j = _partners(out, lam)
    own, other = label[:, 0].bool(), label[j, 0].bool()
    w = lam.reshape(b, 1, 1)
    fg, bg = tgt[:, 1] == 1, tgt[:, 0] == 1
    partner_visible = w < 1 - margin
    assert torch.equal(fg, own | (other & partner_visible))  # own foreground always, the partner's when visible
    assert torch.equal(bg, ~own & ~other)
    left_out = tgt.sum(1) == 0
    assert torch.equal(left_out, ~own & other & ~partner_visible)  # a faint partner foreground: neither class
    if margin > 0:  # this seed covers both sides of the margin
        assert bool((lam >= 1 - margin).any()) and bool((lam < 1 - margin).any())
        assert bool(left_out.any())
    else:
        assert not bool(left_out.any())


def test_asymmetric_target_several_classes_and_a_rare_subset():
    label = torch.tensor([[[0, 1, 2, 1]], [[2, 2, 1, 0]]])  # (B=2, 1, S=4)
    perm, lam = torch.tensor([1, 0]), torch.tensor([0.6, 0.6])

    def classes(t):  # -1 marks a left-out voxel
        return torch.where(t.sum(1) > 0, t.argmax(1), torch.full_like(t.argmax(1), -1))[0].tolist()

    # Rare {1, 2}: a visible partner's rare class wins over background; two different rare classes conflict.
    assert classes(asymmetric_target(label, perm, lam, 3, 0.2)) == [2, -1, -1, 1]
    # Rare {2} only: class 1 is common, so 1 vs 0 is a common-class conflict and is left out.
    assert classes(asymmetric_target(label, perm, lam, 3, 0.2, rare=[2])) == [2, 2, 2, -1]
    # A weight of 1 is no mixing: the own label everywhere.
    assert classes(asymmetric_target(label, perm, torch.tensor([1.0, 1.0]), 3, 0.2)) == [0, 1, 2, 1]


def test_asymmetric_identity_determinism_and_bad_inputs():
    image, target = _batch()
    label = target.argmax(1, keepdim=True)
    out, tgt = asymmetric_mixup_batch(image, label, 4, 0.0, torch.Generator().manual_seed(2))
    assert torch.equal(out, image) and torch.equal(tgt, target)
    a = asymmetric_mixup_batch(image, label, 4, 0.4, torch.Generator().manual_seed(5))
    b = asymmetric_mixup_batch(image, label, 4, 0.4, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="integer"):
        asymmetric_mixup_batch(image, target, 4, 0.4, torch.Generator())
    with pytest.raises(ValueError, match="does not match"):
        asymmetric_mixup_batch(image, label[:, :, :8], 4, 0.4, torch.Generator())
    with pytest.raises(ValueError, match="margin"):
        asymmetric_mixup_batch(image, label, 4, 0.4, torch.Generator(), margin=1.0)
    with pytest.raises(ValueError, match="rare classes"):
        asymmetric_mixup_batch(image, label, 4, 0.4, torch.Generator(), rare=[4])
