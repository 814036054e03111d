"""Models Genesis image corruptions, batched on the training device (Zhou et al., MedIA 2021).

Models Genesis pre-trains an encoder-decoder by restoring images from corrupted copies.
Each sample of a batch draws its own corruption, in the reference code's order
(``generate_pair`` in ``pytorch/utils.py`` of github.com/MrGiovanni/ModelsGenesis):

1. `random_flips` of the clean image (input *and* target: plain data augmentation);
2. `local_shuffle`: pixels permuted within small blocks (texture, not layout, is lost);
3. `nonlinear`: intensities remapped through a random cubic Bezier curve (sometimes inverted);
4. `paint`: in-painting (random boxes replaced by noise) or out-painting (noise everywhere
   except a few random inner boxes); the two are mutually exclusive per sample.

Everything works on ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` tensors with intensities in
[0, 1] (D the slice axis), draws every random number from the ``torch.Generator`` passed in
(no NumPy, no ``random``), so a seed reproduces a corruption and a resumed run continues the
same stream. Nothing syncs with the host: every transform is computed for the whole batch and
blended per sample by its "apply" mask, so the number of draws never depends on the data.

Deliberate differences from the reference code (each because the reference loops in Python
over 10,000 blocks per cube, which a GPU cannot do per step):

* local shuffling tiles each sample with blocks of one random size (per axis, 1 to a tenth
  of the axis, as the reference's per-block sizes) at a random offset and shuffles every
  block, instead of 10,000 overlapping blocks of varied sizes; the reference's blocks cover
  about 84 % of a 64x64x32 cube (and every pixel of a 2D 64x64 slice), the tiling covers all;
* the Bezier curve is sampled at `BEZIER_POINTS` points (reference: 100,000).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import Tensor

from robustseg.augment.intensity import rand

BEZIER_POINTS = 4096  # piecewise-linear error < 1e-6 for smooth curves; the lookup is log2(4096) = 12 steps


@dataclass(frozen=True)
class Corruption:
    """Probabilities and geometry of the Models Genesis corruptions (defaults: the reference code).

    Attributes:
        flip_p: Probability of each of up to 3 flip rounds (``flip_rate = 0.4``).
        local_p: Probability of local pixel shuffling per sample (``local_rate = 0.5``).
        nonlinear_p: Probability of the Bezier intensity curve per sample (``nonlinear_rate = 0.9``).
        invert_p: Probability that a drawn curve is inverted (decreasing): "Half change to get flip".
        paint_p: Probability of in- or out-painting per sample (``paint_rate = 0.9``).
        outpaint_p: Given painting, probability of out-painting rather than in-painting
            (``outpaint_rate = 0.8``, ``inpaint_rate = 1 - outpaint_rate``).
        block_fraction: Largest shuffling block per axis as a fraction of it (``img_rows // 10``).
        box_continue_p: Probability of drawing each further paint box (``random.random() < 0.95``).
        inpaint_boxes: Most in-painting boxes (``cnt = 5``).
        outpaint_boxes: Most kept boxes in out-painting (1 + ``cnt = 4``).
        margin: Pixels between a paint box and the image border (``random.randint(3, ...)``).
    """

    flip_p: float = 0.4
    local_p: float = 0.5
    nonlinear_p: float = 0.9
    invert_p: float = 0.5
    paint_p: float = 0.9
    outpaint_p: float = 0.8
    block_fraction: float = 0.1
    box_continue_p: float = 0.95
    inpaint_boxes: int = 5
    outpaint_boxes: int = 5
    margin: int = 3


# --------------------------------------------------------------------------- random draws
def randint(lo: Tensor, hi: Tensor, shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Integers uniform in ``[lo, hi]`` (both included, like ``random.randint``), int64.

    Args:
        lo: Lower bounds, broadcastable to ``shape`` (int tensor on the generator's device).
        hi: Upper bounds (``hi >= lo``), broadcastable to ``shape``.
        shape: Output shape.
        generator: Source of randomness.
    """
    u = rand(shape, generator, lo.device)
    span = (hi - lo + 1).to(u.dtype)
    return (lo + torch.minimum((u * span).floor().long(), (hi - lo).long())).long()


def _leading(u: Tensor, p: float) -> Tensor:
    """``while random() < p`` as a mask: True up to (not including) the first failure."""
    return torch.cumprod((u < p).long(), dim=-1).bool()


def _per_sample(mask: Tensor, x: Tensor) -> Tensor:
    """``(N,)`` to a shape broadcasting against ``x`` (N, C, *S)."""
    return mask.reshape(-1, *([1] * (x.ndim - 1)))


def _spatial(x: Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in x.shape[2:])


# --------------------------------------------------------------------------- flips
def random_flips(x: Tensor, generator: torch.Generator, p: float = 0.4) -> Tensor:
    """Per-sample in-plane flips as Models Genesis's ``data_augmentation``.

    Up to 3 rounds, each run with probability ``p`` while the previous ones ran; a round
    picks one of 3 axes of the reference's ``(1, rows, cols, deps)`` sample: the channel (a
    no-op), rows (H) or columns (W). The slice axis (deps, D here) is never flipped there,
    so it is not here either. Apply the same flips to the input and the restoration target.

    Args:
        x: ``(N, C, *S)`` batch.
        generator: Source of randomness.
        p: Probability of each round.

    Returns:
        The flipped batch (a new tensor).
    """
    n = x.shape[0]
    run = _leading(rand((n, 3), generator, x.device), p)
    axis = (rand((n, 3), generator, x.device) * 3).floor().long()  # 0: channel (no-op), 1: H, 2: W
    for choice, dim in ((1, -2), (2, -1)):
        odd = ((run & (axis == choice)).sum(1) % 2).bool()  # two flips of one axis cancel
        x = torch.where(_per_sample(odd, x), x.flip(dim), x)
    return x


# --------------------------------------------------------------------------- non-linear intensity
def bezier_lookup(control: Tensor, invert: Tensor, points: int = BEZIER_POINTS) -> Tuple[Tensor, Tensor]:
    """Per-sample lookup tables ``(xs, ys)`` of a cubic Bezier curve from (0, 0) to (1, 1).

    As the reference: the abscissae are sorted; a plain curve sorts its ordinates too (a
    non-decreasing map), an inverted one keeps them in the reference's parameter order, which
    runs from (1, 1) to (0, 0), so the map decreases (dark becomes bright).

    Args:
        control: ``(N, 2, 2)`` control points ``[[x1, y1], [x2, y2]]`` in [0, 1].
        invert: ``(N,)`` bool, which curves to invert.
        points: Samples of the curve.

    Returns:
        ``xs, ys`` of shape ``(N, points)``; ``xs`` ascending from 0 to 1.
    """
    s = torch.linspace(0.0, 1.0, points, device=control.device, dtype=torch.float32)[None, :]
    b1, b2, b3 = 3 * (1 - s) ** 2 * s, 3 * (1 - s) * s ** 2, s ** 3  # the (0, 0) endpoint has no term
    c = control.float()
    xs = b1 * c[:, 0, 0, None] + b2 * c[:, 1, 0, None] + b3
    ys = b1 * c[:, 0, 1, None] + b2 * c[:, 1, 1, None] + b3
    ys = torch.where(invert[:, None], ys.flip(1), ys.sort(dim=1).values)
    return xs.sort(dim=1).values, ys


def interp(x: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Per-sample piecewise-linear interpolation (``np.interp``, ends clamped).

    Args:
        x: ``(N, ...)`` values.
        xs: ``(N, T)`` ascending abscissae.
        ys: ``(N, T)`` ordinates.
    """
    flat = x.reshape(x.shape[0], -1).float().contiguous()
    t = xs.shape[1]
    hi = torch.searchsorted(xs.contiguous(), flat).clamp(1, t - 1)
    x0, x1 = xs.gather(1, hi - 1), xs.gather(1, hi)
    y0, y1 = ys.gather(1, hi - 1), ys.gather(1, hi)
    dx = x1 - x0
    w = torch.where(dx > 0, (flat.clamp(xs[:, :1], xs[:, -1:]) - x0) / dx.clamp_min(1e-12), torch.zeros_like(dx))
    return (y0 + w.clamp(0, 1) * (y1 - y0)).reshape(x.shape).to(x.dtype)


def apply_bezier(x: Tensor, control: Tensor, invert: Tensor) -> Tensor:
    """Map every sample of ``x`` through its own Bezier curve (see `bezier_lookup`)."""
    xs, ys = bezier_lookup(control, invert)
    return interp(x, xs, ys)


def nonlinear(x: Tensor, generator: torch.Generator, p: float = 0.9, invert_p: float = 0.5) -> Tensor:
    """Models Genesis's non-linear transformation, per sample with probability ``p``.

    Control points are uniform in the unit square; ``invert_p`` of the curves are inverted.
    Samples not drawn are returned unchanged.

    Args:
        x: ``(N, C, *S)`` batch in [0, 1].
        generator: Source of randomness.
        p: Probability per sample.
        invert_p: Probability that a curve is inverted.
    """
    n, dev = x.shape[0], x.device
    apply = rand((n,), generator, dev) < p
    control = rand((n, 2, 2), generator, dev)
    invert = rand((n,), generator, dev) < invert_p
    return torch.where(_per_sample(apply, x), apply_bezier(x, control, invert), x)


# --------------------------------------------------------------------------- local shuffling
def block_ids(spatial: Sequence[int], size: Tensor, offset: Tensor) -> Tensor:
    """Block index ``(N, prod(spatial))`` of every pixel for a per-sample tiling.

    Along each axis, pixel ``i`` lies in block ``(i + offset) // size``; the per-axis indices
    are combined in a mixed radix (each index is at most the axis length).

    Args:
        spatial: Spatial shape ``(H, W)`` or ``(D, H, W)``.
        size: ``(N, d)`` block size per axis (>= 1).
        offset: ``(N, d)`` tiling offset per axis (0 <= offset < size).
    """
    d = len(spatial)
    ids = torch.zeros((size.shape[0], *spatial), dtype=torch.long, device=size.device)
    for a, length in enumerate(spatial):
        coord = torch.arange(length, device=size.device).reshape([1] * (1 + a) + [length] + [1] * (d - a - 1))
        index = (coord + offset[:, a].reshape([-1] + [1] * d)) // size[:, a].reshape([-1] + [1] * d)
        ids = ids * (length + 1) + index
    return ids.reshape(size.shape[0], -1)


def shuffle_blocks(x: Tensor, ids: Tensor, generator: torch.Generator) -> Tensor:
    """Permute the pixels of ``x`` randomly within each block of ``ids``.

    Sorting by ``(block, random key)`` lists each block's pixels in random order; sorting by
    block alone (stable) lists them in place order; matching the two orders moves every pixel
    to a random position of its own block, for all blocks and samples in two sorts.

    Args:
        x: ``(N, 1, *S)`` batch.
        ids: ``(N, prod(S))`` block index per pixel (`block_ids`).
        generator: Source of randomness.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    keys = torch.randint(0, 2 ** 31, flat.shape, generator=generator, device=x.device)
    shuffled = torch.argsort(ids * 2 ** 31 + keys, dim=1, stable=True)
    in_place = torch.argsort(ids, dim=1, stable=True)
    return torch.empty_like(flat).scatter_(1, in_place, flat.gather(1, shuffled)).reshape(x.shape)


def local_shuffle(x: Tensor, generator: torch.Generator, p: float = 0.5, block_fraction: float = 0.1) -> Tensor:
    """Local pixel shuffling, per sample with probability ``p`` (see the module docstring).

    Block sizes are uniform in ``[1, max(1, floor(axis * block_fraction))]`` per axis and
    sample, the tiling offset uniform in ``[0, size - 1]``.

    Args:
        x: ``(N, 1, *S)`` batch.
        generator: Source of randomness.
        p: Probability per sample.
        block_fraction: Largest block per axis as a fraction of the axis.
    """
    n, dev, spatial = x.shape[0], x.device, _spatial(x)
    apply = rand((n,), generator, dev) < p
    largest = torch.tensor([max(1, math.floor(s * block_fraction)) for s in spatial], device=dev)
    one = torch.ones((), dtype=torch.long, device=dev)
    size = randint(one, largest, (n, len(spatial)), generator)
    offset = randint(torch.zeros_like(size), size - 1, size.shape, generator)
    shuffled = shuffle_blocks(x, block_ids(spatial, size, offset), generator)
    return torch.where(_per_sample(apply, x), shuffled, x)


# --------------------------------------------------------------------------- in-/out-painting
def box_mask(spatial: Sequence[int], start: Tensor, size: Tensor, active: Tensor) -> Tensor:
    """Union of the active boxes as an ``(N, 1, *spatial)`` bool mask.

    Args:
        spatial: Spatial shape.
        start: ``(N, B, d)`` first pixel of each box per axis.
        size: ``(N, B, d)`` box extent per axis.
        active: ``(N, B)`` which boxes exist.
    """
    d = len(spatial)
    inside = active.reshape(*active.shape, *([1] * d))
    for a, length in enumerate(spatial):
        coord = torch.arange(length, device=start.device).reshape([1, 1] + [1] * a + [length] + [1] * (d - a - 1))
        lo = start[..., a].reshape(*start.shape[:2], *([1] * d))
        hi = lo + size[..., a].reshape(*size.shape[:2], *([1] * d))
        inside = inside & (coord >= lo) & (coord < hi)
    return inside.any(dim=1, keepdim=True)


def draw_boxes(spatial: Sequence[int], n: int, boxes: int, size_lo: Tensor, size_hi: Tensor, margin: int,
               generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Random box sizes in ``[size_lo, size_hi]`` and starts at least ``margin`` from the border.

    The margin shrinks where an axis is too short for it (the reference would fail there).

    Returns:
        ``start, size``, each ``(n, boxes, d)`` int64.
    """
    dims = torch.tensor(list(spatial), device=size_lo.device)
    size = randint(size_lo, size_hi, (n, boxes, len(spatial)), generator)
    room = torch.clamp(torch.minimum(torch.full_like(size, margin), (dims - size) // 2), min=0)
    start = randint(room, dims - size - room, size.shape, generator)
    return start, size


def inpaint(x: Tensor, noise: Tensor, generator: torch.Generator,
            c: Corruption = Corruption()) -> Tuple[Tensor, Tensor]:
    """Replace up to ``c.inpaint_boxes`` random boxes of every sample by ``noise``.

    Box sides are uniform in ``[axis // 6, axis // 3]`` (reference); the number of boxes is
    the run of successes of ``c.box_continue_p`` (0 to 5; 0 with probability 0.05).

    Returns:
        ``(painted, mask)``: the mask is True where the noise went.
    """
    n, dev, spatial = x.shape[0], x.device, _spatial(x)
    lo = torch.tensor([s // 6 for s in spatial], device=dev)
    hi = torch.tensor([max(s // 3, s // 6) for s in spatial], device=dev)
    active = _leading(rand((n, c.inpaint_boxes), generator, dev), c.box_continue_p)
    start, size = draw_boxes(spatial, n, c.inpaint_boxes, lo, hi, c.margin, generator)
    mask = box_mask(spatial, start, size, active)
    return torch.where(mask, noise, x), mask


def outpaint(x: Tensor, noise: Tensor, generator: torch.Generator,
             c: Corruption = Corruption()) -> Tuple[Tensor, Tensor]:
    """Keep the image inside 1 to ``c.outpaint_boxes`` random boxes and put ``noise`` outside.

    Box sides are ``axis - U{3 axis // 7, 4 axis // 7}`` (3/7 to 4/7 of the axis, reference);
    the first box always exists, each further one with the run of ``c.box_continue_p``.

    Returns:
        ``(painted, keep)``: ``keep`` is True where the image was kept.
    """
    n, dev, spatial = x.shape[0], x.device, _spatial(x)
    dims = torch.tensor(list(spatial), device=dev)
    lo = dims - torch.tensor([4 * s // 7 for s in spatial], device=dev)
    hi = dims - torch.tensor([3 * s // 7 for s in spatial], device=dev)
    more = _leading(rand((n, c.outpaint_boxes - 1), generator, dev), c.box_continue_p)
    active = torch.cat([torch.ones((n, 1), dtype=torch.bool, device=dev), more], dim=1)
    start, size = draw_boxes(spatial, n, c.outpaint_boxes, lo, hi, c.margin, generator)
    keep = box_mask(spatial, start, size, active)
    return torch.where(keep, x, noise), keep


def paint(x: Tensor, generator: torch.Generator, c: Corruption = Corruption()) -> Tensor:
    """In- or out-painting per sample: painting with ``c.paint_p``, then out with ``c.outpaint_p``.

    Both are drawn for every sample (a fixed number of draws) and one is kept per sample;
    the noise is uniform in [0, 1) as the reference's ``np.random.rand``.
    """
    n, dev = x.shape[0], x.device
    do_paint = rand((n,), generator, dev) < c.paint_p
    out = rand((n,), generator, dev) < c.outpaint_p
    noise = rand(x.shape, generator, dev).to(x.dtype)
    inner, _ = inpaint(x, noise, generator, c)
    outer, _ = outpaint(x, noise, generator, c)
    painted = torch.where(_per_sample(out, x), outer, inner)
    return torch.where(_per_sample(do_paint, x), painted, x)


# --------------------------------------------------------------------------- all together
def corrupt(x: Tensor, generator: torch.Generator, c: Corruption = Corruption()) -> Tensor:
    """The Models Genesis input for restoration target ``x``: shuffle, Bezier, paint.

    Flips are not applied here: they change the target too (`random_flips` first).

    Args:
        x: ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` in [0, 1].
        generator: Source of randomness (on ``x``'s device).
        c: Probabilities and geometry.

    Returns:
        The corrupted batch, same shape, values in [0, 1].
    """
    if x.ndim not in (4, 5) or x.shape[1] != 1:
        raise ValueError(f"expected (N, 1, H, W) or (N, 1, D, H, W), got {tuple(x.shape)}")
    x = local_shuffle(x, generator, c.local_p, c.block_fraction)
    x = nonlinear(x, generator, c.nonlinear_p, c.invert_p)
    return paint(x, generator, c)


__all__ = ["BEZIER_POINTS", "Corruption", "apply_bezier", "bezier_lookup", "block_ids", "box_mask", "corrupt",
           "draw_boxes", "inpaint", "interp", "local_shuffle", "nonlinear", "outpaint", "paint", "randint",
           "random_flips", "shuffle_blocks"]
