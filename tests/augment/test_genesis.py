"""Models Genesis corruptions: ranges, determinism, identities, and what each may change."""
from __future__ import annotations

import pytest
import torch

from robustseg.augment.genesis import (Corruption, apply_bezier, block_ids, bezier_lookup, corrupt, inpaint,
                                       local_shuffle, nonlinear, outpaint, paint, random_flips, shuffle_blocks)

SHAPES = {2: (6, 1, 48, 40), 3: (3, 1, 12, 32, 28)}


def _image(dims: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(SHAPES[dims], generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


TRANSFORMS = {
    "flips": lambda x, g: random_flips(x, g, 0.4),
    "local_shuffle": lambda x, g: local_shuffle(x, g, 1.0),
    "nonlinear": lambda x, g: nonlinear(x, g, 1.0),
    "paint": lambda x, g: paint(x, g),
    "corrupt": lambda x, g: corrupt(x, g),
}


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_shape_range_and_determinism(name, dims):
    x = _image(dims)
    a = TRANSFORMS[name](x, _gen(5))
    b = TRANSFORMS[name](x, _gen(5))
    c = TRANSFORMS[name](x, _gen(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


@pytest.mark.parametrize("dims", [2, 3])
def test_zero_probabilities_leave_the_batch_unchanged(dims):
    x = _image(dims)
    c = Corruption(flip_p=0, local_p=0, nonlinear_p=0, paint_p=0)
    assert torch.equal(random_flips(x, _gen(), 0.0), x)
    assert torch.equal(local_shuffle(x, _gen(), 0.0), x)
    assert torch.equal(nonlinear(x, _gen(), 0.0), x)
    assert torch.equal(paint(x, _gen(), c), x)
    assert torch.equal(corrupt(x, _gen(), c), x)


def test_each_sample_draws_its_own_transform():
    x = _image(2).repeat(8, 1, 1, 1)  # 48 identical-ish rows: 6 distinct images x 8
    out = nonlinear(x, _gen(2), p=0.5)
    changed = (out != x).flatten(1).any(1)
    assert changed.any() and not changed.all()
    assert torch.equal(out[~changed], x[~changed])
    # Two copies of the same image get different curves.
    same = torch.nonzero(changed).squeeze(1)
    pairs = [(i, j) for i in same for j in same if i < j and (i - j) % 6 == 0]
    assert pairs and any(not torch.allclose(out[i], out[j]) for i, j in pairs)


def test_bezier_with_control_points_on_the_diagonal_is_the_identity():
    x = _image(2)
    control = torch.tensor([[[0.2, 0.2], [0.7, 0.7]], [[0.9, 0.9], [0.1, 0.1]]]).repeat(3, 1, 1)
    out = apply_bezier(x, control, torch.zeros(6, dtype=torch.bool))
    assert torch.allclose(out, x, atol=1e-5)


def test_inverted_straight_bezier_is_one_minus_x():
    x = _image(2)
    control = torch.tensor([[1 / 3, 1 / 3], [2 / 3, 2 / 3]]).expand(6, 2, 2)
    out = apply_bezier(x, control, torch.ones(6, dtype=torch.bool))
    assert torch.allclose(out, 1 - x, atol=1e-4)


def test_plain_bezier_is_monotone_and_inverted_decreasing():
    g = _gen(3)
    control = torch.rand(16, 2, 2, generator=g)
    v = torch.linspace(0, 1, 501).expand(16, 501)
    up = apply_bezier(v, control, torch.zeros(16, dtype=torch.bool))
    assert (up.diff(dim=1) >= -1e-6).all()
    assert torch.allclose(up[:, 0], torch.zeros(16), atol=1e-6) and torch.allclose(up[:, -1], torch.ones(16), atol=1e-6)
    xs, ys = bezier_lookup(control, torch.ones(16, dtype=torch.bool))
    assert (xs.diff(dim=1) >= 0).all()
    down = apply_bezier(v, control, torch.ones(16, dtype=torch.bool))
    assert (down[:, 0] > 0.99).all() and (down[:, -1] < 0.01).all()  # dark becomes bright


@pytest.mark.parametrize("dims", [2, 3])
def test_local_shuffle_permutes_within_blocks(dims):
    x = _image(dims)
    n, spatial = x.shape[0], x.shape[2:]
    size = torch.tensor([[2, 3, 4][:dims], [1, 4, 3][:dims], [3, 2, 2][:dims]]).repeat(2, 1)[:n]
    offset = size - 1
    ids = block_ids(spatial, size, offset)
    out = shuffle_blocks(x, ids, _gen())
    flat_in, flat_out = x.reshape(n, -1), out.reshape(n, -1)
    assert not torch.equal(out, x)
    for s in range(n):
        for b in ids[s].unique()[:50]:
            sel = ids[s] == b
            assert torch.equal(flat_in[s, sel].sort().values, flat_out[s, sel].sort().values)


def test_block_ids_tile_the_image():
    ids = block_ids((5, 7), torch.tensor([[2, 3]]), torch.tensor([[1, 0]]))[0].reshape(5, 7)
    # Rows: (i + 1) // 2 -> 0,1,1,2,2; columns: j // 3 -> 0,0,0,1,1,1,2.
    assert ids[0, 0] == ids[0, 2] and ids[0, 2] != ids[0, 3]
    assert ids[1, 0] == ids[2, 0] and ids[0, 0] != ids[1, 0] and ids[2, 0] != ids[3, 0]
    assert len(ids.unique()) == 3 * 3


def test_local_shuffle_blocks_are_small():
    # A horizontal ramp: a pixel moves at most one block (a tenth of the axis) along W.
    w = 100
    x = torch.linspace(0, 1, w).expand(4, 1, 30, w).contiguous()
    out = local_shuffle(x, _gen(), p=1.0, block_fraction=0.1)
    assert (out - x).abs().max() <= 9 / (w - 1) + 1e-6
    assert torch.allclose(out.sum(dim=(2, 3)), x.sum(dim=(2, 3)), atol=1e-3)


@pytest.mark.parametrize("dims", [2, 3])
def test_inpainting_changes_only_inside_its_boxes(dims):
    x = _image(dims)
    noise = torch.full_like(x, 0.5)
    out, mask = inpaint(x, noise, _gen(4))
    assert mask.shape == (x.shape[0], 1, *x.shape[2:])
    assert mask.any()
    assert torch.equal(out[~mask.expand_as(x)], x[~mask.expand_as(x)])
    assert torch.equal(out[mask.expand_as(x)], noise[mask.expand_as(x)])
    # Boxes are at most a third of each axis and stay off the border (3-pixel margin).
    border = torch.zeros_like(mask)
    border[..., :3, :] = border[..., -3:, :] = True
    border[..., :3] = border[..., -3:] = True
    assert not (mask & border).any()


@pytest.mark.parametrize("dims", [2, 3])
def test_outpainting_keeps_its_boxes_exactly(dims):
    x = _image(dims)
    noise = torch.full_like(x, 0.5)
    out, keep = outpaint(x, noise, _gen(4))
    k = keep.expand_as(x)
    assert keep.flatten(1).any(1).all()  # at least one box per sample
    assert torch.equal(out[k], x[k])
    assert torch.equal(out[~k], noise[~k])
    frac = keep.float().mean()
    assert 0.05 < frac < 0.95


def test_in_and_out_painting_are_exclusive_per_sample():
    x = torch.full((200, 1, 32, 32), 0.25)
    noisy = paint(x, _gen(7)) != 0.25
    border = torch.zeros(32, 32, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    on_border = noisy[:, 0, border]
    outpainted = on_border.all(1)  # out-painting's kept boxes stay 3 pixels off the border
    clean_border = ~on_border.any(1)  # in-painting's boxes do too
    assert (outpainted | clean_border).all()  # never a mix of both
    inpainted = clean_border & noisy.flatten(1).any(1)
    untouched = ~noisy.flatten(1).any(1)
    # paint_p = 0.9, outpaint_p = 0.8: ~72% out, ~17% in (+ 5% of them with no box), ~10% untouched.
    assert 0.62 < float(outpainted.float().mean()) < 0.82
    assert 0.09 < float(inpainted.float().mean()) < 0.26
    assert 0.04 < float(untouched.float().mean()) < 0.2


def test_flips_are_in_plane_flips_of_input_only():
    x = _image(3)
    out = random_flips(x, _gen(0), p=1.0)
    for s in range(x.shape[0]):
        candidates = [x[s], x[s].flip(-1), x[s].flip(-2), x[s].flip(-1).flip(-2)]
        assert any(torch.equal(out[s], c) for c in candidates)


def test_flip_rounds_follow_the_probability():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(400, 1, 1, 1)
    out = random_flips(x, _gen(0), p=0.4)
    flipped = (out != x).flatten(1).any(1).float().mean()
    # Rounds run with 0.4, 0.16, 0.064; each picks the channel (no-op), H or W. P(net flip) ~ 0.27.
    assert 0.2 < float(flipped) < 0.34


def test_corrupt_rejects_multichannel_batches():
    with pytest.raises(ValueError):
        corrupt(torch.rand(2, 2, 16, 16), _gen())
