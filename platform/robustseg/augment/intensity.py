"""Batched intensity augmentation (nnU-Net v2's default scheme) on the training device.

Every transform takes the whole batch ``x`` of shape ``(B, C, *S)`` and draws its per-sample
"apply or not" mask and its per-sample (or per-sample-and-channel) parameters as tensors in
one call each from the caller's ``torch.Generator``; the heavy work then runs once on the
subset of rows that were selected, never in a Python loop over samples, and writes them back
into ``x`` in place (the `Augmenter` works on its own copy of the batch). Rows that were not
selected are left bit-for-bit unchanged.

The order and defaults follow nnU-Net v2's ``get_training_transforms`` (see
``robustseg.augment.presets`` for the values and where each comes from):
noise -> blur -> brightness -> contrast -> low resolution -> inverted gamma -> gamma.

The random-draw helpers at the top are shared with ``spatial.py``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Transform = Callable[..., Tuple[Tensor, Tensor]]  # (x, cfg, generator, shared_channels=False)


# --------------------------------------------------------------------------- random draws
def rand(shape: Sequence[int], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) float32 draws from ``generator`` (the only source of randomness here)."""
    return torch.rand(tuple(shape), generator=generator, device=device)


def uniform(lo: float, hi: float, shape: Sequence[int], generator: torch.Generator,
            device: torch.device) -> Tensor:
    """U(lo, hi) float32 draws of ``shape``.

    Args:
        lo: Lower bound.
        hi: Upper bound (``lo == hi`` gives the constant).
        shape: Output shape, e.g. ``(B,)``.
        generator: Source of randomness, on ``device``.
        device: Where the draws live.
    """
    return lo + (hi - lo) * rand(shape, generator, device)


def bernoulli(p: float, shape: Sequence[int], generator: torch.Generator,
              device: torch.device) -> Tensor:
    """Boolean mask of ``shape``, each entry True with probability ``p``.

    ``p == 0`` draws nothing (so a disabled transform costs nothing), ``p == 1`` still draws
    so the random stream does not depend on whether a probability is exactly one.
    """
    if p <= 0:
        return torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    return rand(shape, generator, device) < p


def around_one(lo: float, hi: float, shape: Sequence[int], generator: torch.Generator,
               device: torch.device) -> Tensor:
    """Factors that shrink or grow with equal odds: U(lo, 1) or U(1, hi), each half the time.

    nnU-Net's ``BGContrast`` sampler; with (0.7, 1.5) a plain uniform would make the
    "brighter" gamma side 2.7 times as likely as the "darker" one. A range that does not
    straddle 1 falls back to U(lo, hi).

    Args:
        lo: Smallest factor.
        hi: Largest factor.
        shape: Output shape.
        generator: Source of randomness.
        device: Where the draws live.
    """
    below = rand(shape, generator, device) < 0.5
    u = rand(shape, generator, device)
    if not lo < 1.0 < hi:
        return lo + (hi - lo) * u
    a = torch.where(below, torch.full_like(u, lo), torch.ones_like(u))
    b = torch.where(below, torch.ones_like(u), torch.full_like(u, hi))
    return a + (b - a) * u


def on_subset(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Replace the rows of ``x`` where ``mask`` is True by ``fn(x[idx], idx)``, in place.

    Working on the selected rows only is what keeps a p=0.1 transform at a tenth of the cost;
    writing in place avoids one full copy of the batch per transform. ``x`` must therefore be
    a tensor the caller owns (the `Augmenter` copies its inputs once).

    Args:
        x: Tensor whose first dimension matches ``mask``; modified and returned.
        mask: Boolean ``(N,)`` mask of rows to transform.
        fn: Maps the selected rows (a copy) and their indices to new rows of the same shape.
    """
    if sync_free(x):
        # On the GPU `nonzero` would stall the host once per transform; transforming every
        # row and blending by the mask keeps the CPU queueing ahead of the GPU instead.
        everything = torch.arange(x.shape[0], device=x.device)
        out = fn(x.index_select(0, everything), everything)
        return x.copy_(torch.where(_per_row(mask, x).bool(), out, x))
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))


# None: sync-free (blend) mode on CUDA, subset mode on the CPU. Tests force either.
SYNC_FREE: "bool | None" = None


def sync_free(x: Tensor) -> bool:
    """Whether transforms blend full-batch results instead of selecting rows (no host sync)."""
    return x.is_cuda if SYNC_FREE is None else SYNC_FREE


def _spatial(x: Tensor) -> Tuple[int, ...]:
    return tuple(range(2, x.ndim))


def _per_row(v: Tensor, x: Tensor) -> Tensor:
    """Reshape ``(N,)`` or ``(N, C)`` parameters to broadcast against ``x`` (N, C, *S)."""
    return v.reshape(*v.shape, *([1] * (x.ndim - v.ndim))).to(x.dtype)


def _mean_std(x: Tensor, dims: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
    """Per-row mean and (unbiased) std over ``dims``; two plain passes, ~2x faster than
    ``torch.std``'s Welford kernel on the CPU and exact enough for z-scored images."""
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    n = math.prod(x.shape[i] for i in dims)
    return mean, ((d * d).sum(dim=dims, keepdim=True) / max(n - 1, 1)).sqrt()


def _rows(x: Tensor) -> Tensor:
    """View ``(B, C, *S)`` as ``(B*C, 1, *S)`` so per-channel choices become per-row ones."""
    return x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])


def _per_channel(draw: Callable[[Tuple[int, ...]], Tensor], b: int, c: int, shared: bool,
                 tail: Tuple[int, ...] = ()) -> Tensor:
    """A ``(b, c, *tail)`` draw: one per sample and channel, or one per sample for every channel.

    ``shared`` is for channels that are one acquisition's neighbouring slices (2.5D): the
    scanner gives them one brightness, contrast and resolution. Unshared, the draw has the
    same shape (and consumes the generator) exactly as before.
    """
    if not shared:
        return draw((b, c, *tail))
    return draw((b, 1, *tail)).expand(b, c, *tail)


# --------------------------------------------------------------------------- transforms
def gaussian_noise(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
                   shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    """Additive Gaussian noise with a per-sample standard deviation U(std[0], std[1]).

    Args:
        x: Image batch ``(B, C, *S)``.
        cfg: ``{"p", "std"}``.
        g: Generator.
    """
    b, dev = x.shape[0], x.device
    apply = bernoulli(cfg["p"], (b,), g, dev)
    if cfg["p"] <= 0:
        return x, apply
    sigma = uniform(*cfg["std"], (b,), g, dev)

    def add(sub: Tensor, idx: Tensor) -> Tensor:
        noise = torch.randn(sub.shape, generator=g, device=dev, dtype=torch.float32).to(sub.dtype)
        return sub + noise * _per_row(sigma[idx], sub)

    return on_subset(x, apply, add), apply


def _gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1D Gaussian kernels ``(N, 2r+1)``, one per sigma."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    w = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return w / w.sum(dim=1, keepdim=True)


def _blur_axis(rows: Tensor, kernels: Tensor, axis: int) -> Tensor:
    """Separable blur step along spatial ``axis`` of ``(N, 1, *S)`` rows, one kernel per row.

    The rows become the channels of a single grouped convolution (groups=N), which applies a
    different kernel to every row in one call.
    """
    n, nd = rows.shape[0], rows.ndim - 2
    size, k = rows.shape[2 + axis], kernels.shape[1]
    r = k // 2
    pad = [0] * (2 * nd)
    pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = r
    # Reflect keeps edge intensities (no dark rim as with zero padding); it needs r < size.
    mode = "reflect" if r < size else "replicate"
    padded = F.pad(rows.reshape(1, n, *rows.shape[2:]), pad, mode=mode)
    shape = [n, 1] + [1] * nd
    shape[2 + axis] = k
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return conv(padded, kernels.to(rows.dtype).reshape(shape), groups=n).reshape(rows.shape)


def gaussian_blur(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
                  shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    """Gaussian blur, sigma U(sigma[0], sigma[1]) drawn per sample, channel and axis.

    A selected sample blurs each channel with probability ``p_per_channel`` (nnU-Net 0.5).
    The kernel radius is ``ceil(3 * sigma[1])`` for all rows so they share one grouped conv.

    Args:
        x: Image batch ``(B, C, *S)``.
        cfg: ``{"p", "sigma", "p_per_channel"}``.
        g: Generator.
    """
    b, c, nd, dev = x.shape[0], x.shape[1], x.ndim - 2, x.device
    apply = bernoulli(cfg["p"], (b,), g, dev)
    if cfg["p"] <= 0:
        return x, apply
    channel = _per_channel(lambda sh: bernoulli(cfg["p_per_channel"], sh, g, dev), b, c, shared_channels)
    sigma = _per_channel(lambda sh: uniform(*cfg["sigma"], sh, g, dev), b, c, shared_channels, (nd,))
    sigma = sigma.reshape(b * c, nd).clamp_min(1e-3)
    radius = max(1, math.ceil(3.0 * cfg["sigma"][1]))

    def blur(rows: Tensor, idx: Tensor) -> Tensor:
        s = sigma[idx]
        for axis in range(nd):
            rows = _blur_axis(rows, _gaussian_kernels(s[:, axis], radius), axis)
        return rows

    mask = (apply[:, None] & channel).reshape(-1)
    return on_subset(_rows(x), mask, blur).reshape(x.shape), apply


def brightness(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
               shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    """Multiplicative brightness, one factor per sample and channel (nnU-Net ``BGContrast``).

    Args:
        x: Image batch ``(B, C, *S)``.
        cfg: ``{"p", "range"}``.
        g: Generator.
    """
    b, c, dev = x.shape[0], x.shape[1], x.device
    apply = bernoulli(cfg["p"], (b,), g, dev)
    if cfg["p"] <= 0:
        return x, apply
    factor = _per_channel(lambda sh: around_one(*cfg["range"], sh, g, dev), b, c, shared_channels)
    return on_subset(x, apply, lambda sub, idx: sub * _per_row(factor[idx], sub)), apply


def contrast(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
             shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    """Contrast around the per-channel mean; ``preserve_range`` clips to the original min/max.

    Args:
        x: Image batch ``(B, C, *S)``.
        cfg: ``{"p", "range", "preserve_range"}``.
        g: Generator.
    """
    b, c, dev = x.shape[0], x.shape[1], x.device
    apply = bernoulli(cfg["p"], (b,), g, dev)
    if cfg["p"] <= 0:
        return x, apply
    factor = _per_channel(lambda sh: around_one(*cfg["range"], sh, g, dev), b, c, shared_channels)

    def stretch(sub: Tensor, idx: Tensor) -> Tensor:
        dims = _spatial(sub)
        mean = sub.mean(dim=dims, keepdim=True)
        out = (sub - mean) * _per_row(factor[idx], sub) + mean
        if cfg["preserve_range"]:
            out = torch.clamp(out, sub.amin(dim=dims, keepdim=True), sub.amax(dim=dims, keepdim=True))
        return out

    return on_subset(x, apply, stretch), apply


def _lowres_indices(size: int, n: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Source pixels and weights of "nearest-exact down to n, linear back up to size".

    Both steps are separable and pick from the original pixels, so the pair collapses to
    ``out[i] = (1 - w) * x[src0[i]] + w * x[src1[i]]`` per axis -- a gather, which handles a
    different low-resolution size in every row at once (``interpolate`` needs one size per
    call). The index formulas are torch's ``nearest-exact`` and ``align_corners=False``
    linear ones.
    """
    i = torch.arange(size, device=n.device, dtype=torch.float32)[None, :]
    nf = n.to(torch.float32)[:, None]
    u = ((i + 0.5) * nf / size - 0.5).clamp_min(0.0)
    k0 = torch.minimum(torch.floor(u), nf - 1)
    w = u - k0
    k1 = torch.minimum(k0 + 1, nf - 1)

    def source(k: Tensor) -> Tensor:
        return torch.floor((k + 0.5) * size / nf).clamp(max=size - 1).long()

    return source(k0), source(k1), w


def simulate_lowres(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
                    shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    """Low-resolution simulation: nearest downsampling by zoom U(zoom) then linear upsampling.

    The zoom is drawn per sample and channel and shared by the axes (nnU-Net
    ``synchronize_axes=True``). In 3D the slice axis is left alone unless ``slice_axis`` is
    set, as nnU-Net does for anisotropic data.

    Args:
        x: Image batch ``(B, C, *S)``.
        cfg: ``{"p", "zoom", "p_per_channel", "slice_axis"}``.
        g: Generator.
    """
    b, c, nd, dev = x.shape[0], x.shape[1], x.ndim - 2, x.device
    apply = bernoulli(cfg["p"], (b,), g, dev)
    if cfg["p"] <= 0:
        return x, apply
    channel = _per_channel(lambda sh: bernoulli(cfg["p_per_channel"], sh, g, dev), b, c, shared_channels)
    zoom = _per_channel(lambda sh: uniform(*cfg["zoom"], sh, g, dev), b, c, shared_channels).reshape(b * c)
    axes = range(nd) if (nd == 2 or cfg["slice_axis"]) else range(1, nd)

    def degrade(rows: Tensor, idx: Tensor) -> Tensor:
        out = rows
        for axis in axes:
            size = rows.shape[2 + axis]
            n = torch.round(size * zoom[idx]).clamp(1, size)
            src0, src1, w = _lowres_indices(size, n)
            view = [rows.shape[0]] + [1] * (nd + 1)
            view[2 + axis] = size
            full = out.shape
            a = out.gather(2 + axis, src0.reshape(view).expand(full))
            z = out.gather(2 + axis, src1.reshape(view).expand(full))
            wv = w.reshape(view).to(out.dtype)
            out = a + wv * (z - a)
        return out

    mask = (apply[:, None] & channel).reshape(-1)
    return on_subset(_rows(x), mask, degrade).reshape(x.shape), apply


def _gamma(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator, invert: bool,
           shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    b, c, dev = x.shape[0], x.shape[1], x.device
    apply = bernoulli(cfg["p"], (b,), g, dev)
    if cfg["p"] <= 0:
        return x, apply
    gamma = _per_channel(lambda sh: around_one(*cfg["gamma"], sh, g, dev), b, c, shared_channels)

    def correct(sub: Tensor, idx: Tensor) -> Tensor:
        dims = _spatial(sub)
        y = -sub if invert else sub
        mean, std = _mean_std(y, dims)
        lo = y.amin(dim=dims, keepdim=True)
        rng = y.amax(dim=dims, keepdim=True) - lo
        # Gamma needs [0, 1]: map the channel's own range there and back.
        y = ((y - lo) / rng.clamp_min(1e-7)).pow(_per_row(gamma[idx], sub)) * rng + lo
        if cfg["retain_stats"]:
            # The network sees z-scored inputs; keep mean/std so gamma only changes the shape.
            mean_now, std_now = _mean_std(y, dims)
            y = (y - mean_now) / std_now.clamp_min(1e-7) * std + mean
        return -y if invert else y

    return on_subset(x, apply, correct), apply


def gamma(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
          shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    """Gamma correction ``x' = x ** gamma`` on the channel's [min, max] range.

    Args:
        x: Image batch ``(B, C, *S)``.
        cfg: ``{"p", "gamma", "retain_stats"}``.
        g: Generator.
    """
    return _gamma(x, cfg, g, invert=False, shared_channels=shared_channels)


def inverted_gamma(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
                   shared_channels: bool = False) -> Tuple[Tensor, Tensor]:
    """Gamma on the negated image (stretches the bright end instead of the dark end).

    Args:
        x: Image batch ``(B, C, *S)``.
        cfg: ``{"p", "gamma", "retain_stats"}``.
        g: Generator.
    """
    return _gamma(x, cfg, g, invert=True, shared_channels=shared_channels)


# nnU-Net v2 order: the blur acts on the noise, the gammas come last.
INTENSITY_TRANSFORMS: Dict[str, Transform] = {
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "brightness": brightness,
    "contrast": contrast,
    "lowres": simulate_lowres,
    "inverted_gamma": inverted_gamma,
    "gamma": gamma,
}


def augment_intensity(x: Tensor, params: Mapping[str, Mapping[str, Any]], g: torch.Generator,
                      info: Dict[str, Tensor], shared_channels: bool = False) -> Tensor:
    """Run every intensity transform in nnU-Net's order.

    Args:
        x: Image batch ``(B, C, *S)``, floating point.
        params: Resolved parameters by transform name (see ``presets.resolve_params``).
        g: Generator on ``x.device``.
        info: Receives each transform's ``(B,)`` "applied" mask under its name.
        shared_channels: One draw per sample for all its channels (neighbouring slices,
            2.5D) instead of one per channel (nnU-Net's modalities).
    """
    for name, fn in INTENSITY_TRANSFORMS.items():
        x, info[name] = fn(x, params[name], g, shared_channels=shared_channels)
    return x
