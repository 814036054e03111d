"""AdvChain transforms: identity at zero, bounds, inverses, per-transform step sizes, determinism."""
from __future__ import annotations

import math

import pytest
import torch

from robustseg.augment.advchain import (AdvChain, Affine, BiasField, Deformation, Noise, bspline_matrix,
                                        random_subchain)


def _family():
    return {"noise": Noise(1.0, 1.0), "bias": BiasField(0.5, 0.3, 1.0), "affine": Affine(30.0, 0.2, 0.05, 1.0),
            "deformation": Deformation(8, 1.0, 0.0625, 8, 1.0)}


def _smooth(shape=(2, 1, 48, 48)) -> torch.Tensor:
    """A smooth image (low frequencies only), so resampling error is small."""
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape[2:]], indexing="ij")
    img = torch.sin(2.5 * axes[-1] + 0.5) * torch.cos(2 * axes[-2]) + 0.3 * axes[0]
    return img.expand(*shape).clone()


@pytest.mark.parametrize("name", ["noise", "bias", "affine", "deformation"])
def test_every_transform_is_identity_at_zero_parameters_2d(name):
    t = _family()[name]
    x = torch.randn(2, 1, 32, 40, generator=torch.Generator().manual_seed(0))
    t.init(x.shape, None)
    assert torch.count_nonzero(t.param) == 0
    assert torch.allclose(t.forward(x), x, atol=1e-5)
    probs = torch.softmax(x.repeat(1, 3, 1, 1), 1)
    assert torch.allclose(t.warp(probs), probs, atol=1e-5) and torch.allclose(t.inverse(probs), probs, atol=1e-5)
    label = torch.randint(0, 4, (2, 1, 32, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(t.warp(label, mode="nearest"), label)
    # ...and random parameters do change the image (so the identity check can fail).
    t.init(x.shape, torch.Generator().manual_seed(2))
    assert (t.forward(x) - x).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["noise", "bias", "affine"])
def test_identity_at_zero_and_effect_in_3d(name):
    t = _family()[name]
    x = torch.randn(2, 1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    t.init(x.shape, None)
    assert torch.allclose(t.forward(x), x, atol=1e-5)
    t.init(x.shape, torch.Generator().manual_seed(3))
    y = t.forward(x)
    assert y.shape == x.shape and (y - x).abs().max() > 1e-2


def test_deformation_is_2d_only():
    with pytest.raises(ValueError, match="2D batches"):
        Deformation(8, 1.0, 0.05, 4, 1.0).init((2, 1, 4, 24, 24), None)


def test_affine_3d_acts_on_each_slice_like_2d_and_keeps_the_slice_axis():
    x = torch.randn(2, 1, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    t3, t2 = Affine(30.0, 0.2, 0.05, 1.0), Affine(30.0, 0.2, 0.05, 1.0)
    t3.init(x.shape, torch.Generator().manual_seed(5))
    t2.param = t3.param.clone()
    y3 = t3.warp(x)  # zero fill: forward() fills with the sample minimum, which differs per slice
    for d in range(3):
        assert torch.allclose(y3[:, :, d], t2.warp(x[:, :, d]), atol=1e-5)
    assert (y3 - x).abs().max() > 0.5


def test_project_enforces_every_bound_even_after_huge_steps():
    fam = {"noise": Noise(0.7, 50.0), "bias": BiasField(0.5, 0.3, 50.0), "affine": Affine(20.0, 0.1, 0.05, 50.0),
           "deformation": Deformation(8, 0.0, 0.05, 6, 50.0)}
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) + 1.0
    x[:, :, 0, 0] = 0.0  # the sample minimum, so the bias acts as a pure factor elsewhere
    g = torch.Generator().manual_seed(1)
    for t in fam.values():
        t.init(x.shape, g)
        for i in range(3):
            t.ascend(torch.randn(t.param.shape, generator=g), i)
            p = t.param
            if t.l2_ball:
                assert p.flatten(1).norm(dim=1).max() <= 1 + 1e-5
            else:
                assert p.abs().max() <= 1.0
    noise = fam["noise"]
    assert ((noise.forward(x) - x).flatten(1).norm(dim=1) <= 0.7 + 1e-4).all()
    ratio = (fam["bias"].forward(x) / x)[x > 0]
    assert ratio.min() >= math.exp(-0.3) - 1e-5 and ratio.max() <= math.exp(0.3) + 1e-5
    assert ratio.max() - ratio.min() > 0.05  # the field is not flat
    angle, scale, shift = fam["affine"].components()
    assert angle.abs().max() <= 20.0 + 1e-4 and (scale - 1).abs().max() <= 0.1 + 1e-6
    assert shift.abs().max() <= 0.05 + 1e-6
    # Displacement (normalised units: 2 x fraction of the axis) never exceeds the velocity bound.
    disp = fam["deformation"].displacement((32, 32))
    assert disp.abs().max() <= 2 * 0.05 + 1e-4 and disp.abs().max() > 0.01


def test_bias_field_log_bound_holds_for_any_control_points_in_the_box():
    t = BiasField(0.25, 0.4, 1.0)
    t.init((1, 1, 40, 40), None)
    t.param = torch.ones_like(t.param)  # the worst case: every control point at the bound
    assert torch.allclose(t.log_field((40, 40)), torch.full((1, 1, 40, 40), 0.4), atol=1e-5)
    m = bspline_matrix(4, 40, torch.device("cpu"))
    assert m.shape == (7, 40) and (m >= 0).all() and torch.allclose(m.sum(0), torch.ones(40), atol=1e-6)


@pytest.mark.parametrize("name", ["affine", "deformation"])
def test_inverse_undoes_forward_warp(name):
    t = _family()[name]
    x = _smooth()
    t.init(x.shape, torch.Generator().manual_seed(4))
    moved = t.warp(x)
    assert (moved - x).abs().max() > 0.2  # it really moved
    chain = AdvChain({name: t})
    chain.select([name], x.shape, torch.Generator().manual_seed(4))
    mask = (chain.valid_weight(x) > 0.99).float()
    assert 0.3 < mask.mean() <= 1.0
    back = t.inverse(t.warp(x))
    assert ((back - x).abs() * mask).max() < 0.03


def test_valid_weight_drops_pixels_that_left_the_view_and_ramps_at_the_edges():
    t = Affine(0.0, 0.0, 0.25, 1.0)
    t.init((1, 1, 32, 32), None)
    t.param[:, 4] = 1.0  # shift W by a quarter of the axis (8 px)
    chain = AdvChain({"affine": t})
    chain.active = [t]
    w = chain.valid_weight(torch.zeros(1, 1, 32, 32))[0, 0]
    cols = w.mean(0)
    # Output column j samples input column j + 8, so clean columns 0-7 never come back.
    assert (cols[:8] == 0).all() and (cols[8:] == 1).all()
    ramped = chain.valid_weight(torch.zeros(1, 1, 32, 32), margin=4.0)[0, 0]
    assert (ramped[:, :8] == 0).all() and ramped[16, 16] == 1.0
    assert ramped[16, 8] == pytest.approx(0.5 / 4)  # the perturbed frame's left edge...
    assert ramped[16, 30] == pytest.approx(1.5 / 4)  # ...and the clean frame's right edge ramp
    assert ramped[0, 20] == pytest.approx((0.5 / 4) ** 2)
    chain.select(["affine"], (1, 1, 32, 32), None)
    assert torch.equal(chain.valid_weight(torch.zeros(1, 1, 32, 32)), torch.ones(1, 1, 32, 32))


def test_each_transform_steps_with_its_own_step_size():
    def stepped(step_noise, step_affine):
        fam = {"noise": Noise(1.0, step_noise), "affine": Affine(30.0, 0.2, 0.05, step_affine)}
        chain = AdvChain(fam)
        chain.select(["noise", "affine"], (2, 1, 16, 16), None)  # zeros: no projection interferes
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in
                 enumerate(chain.parameters())]
        chain.ascend(grads)
        return [p.clone() for p in chain.parameters()], grads

    (n1, a1), grads = stepped(0.1, 0.1)
    (n2, a2), _ = stepped(0.1, 0.4)
    (n3, a3), _ = stepped(0.3, 0.1)
    assert torch.equal(n1, n2) and not torch.equal(a1, a2)  # only the affine update changed...
    assert torch.equal(a1, a3) and not torch.equal(n1, n3)  # ...and only the noise one here
    assert torch.allclose(a2, 0.4 * grads[1].sign()) and torch.allclose(a1, 0.1 * grads[1].sign())
    norms = n3.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.3), atol=1e-6)
    # Later inner iterations take smaller steps: step / sqrt(iteration + 1).
    t = Affine(30.0, 0.2, 0.05, 0.4)
    t.init((1, 1, 8, 8), None)
    t.ascend(torch.ones(1, 5), iteration=3)
    assert torch.allclose(t.param, torch.full((1, 5), 0.2))


def test_same_generator_seed_gives_the_same_chain_and_parameters():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        names, extra = random_subchain(list(_family()), g, n_extra=1)
        chain = AdvChain(_family())
        chain.select(names, (2, 1, 32, 32), g)
        return names, extra, [p.clone() for p in chain.parameters()]

    a, b = draw(7), draw(7)
    assert a[0] == b[0] and a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    draws = [draw(s) for s in range(12)]
    assert len({tuple(d[0]) for d in draws}) > 3  # orders and lengths vary
    assert {len(d[0]) for d in draws} >= {1, 2}
    assert all(len(set(d[0])) == len(d[0]) and 0 <= d[1][0] < 1 for d in draws)


def test_chain_applies_in_order_and_inverts_in_reverse():
    x = _smooth((1, 1, 48, 48))
    chain = AdvChain(_family(), preserve_range=False)
    chain.select(["affine", "deformation"], x.shape, torch.Generator().manual_seed(9))
    aff, def_ = chain.active
    assert torch.allclose(chain.warp(x), def_.warp(aff.warp(x)))
    assert torch.allclose(chain.inverse(x), aff.inverse(def_.inverse(x)))
    back = chain.inverse(chain.warp(x))
    assert ((back - x).abs() * (chain.valid_weight(x) > 0.99)).max() < 0.05


def test_preserve_range_keeps_each_sample_within_its_clean_range():
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1, 1)
    chain = AdvChain(_family(), preserve_range=True)
    chain.select(["noise", "bias"], x.shape, torch.Generator().manual_seed(1))
    y = chain.forward(x)
    assert torch.allclose(y.flatten(1).amin(1), x.flatten(1).amin(1), atol=1e-5)
    assert torch.allclose(y.flatten(1).amax(1), x.flatten(1).amax(1), atol=1e-5)
    assert (y - x).abs().max() > 1e-2


def test_deformation_cache_follows_parameter_edits_and_never_reuses_a_graph():
    t = Deformation(8, 1.0, 0.05, 4, 1.0)
    x = _smooth((1, 1, 32, 32))
    t.init(x.shape, torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = t.forward(x)
        assert torch.equal(t.forward(x), first)
        t.param.mul_(-1)  # an in-place edit must not be served from the cache
        assert not torch.allclose(t.forward(x), first)
    t.param.requires_grad_(True)
    for _ in range(2):  # a second backward through a cached graph would raise
        t.forward(x).sum().backward()
    assert t.param.grad.abs().sum() > 0
