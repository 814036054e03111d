"""Differentiable, bounded image perturbations for adversarial augmentation (AdvChain).

Chen et al., "Enhancing MR image segmentation with realistic adversarial data augmentation",
MedIA 2022 (AdvChain), as used by the seed paper (§2.4). Four transforms, each holding one
*normalised* parameter tensor ``param`` that the inner maximisation steps on:

* `Noise`: additive ``epsilon * param`` with ``||param||_2 <= 1`` per sample (L2 ball).
* `BiasField`: multiplicative ``exp(log_bound * B(param))``, ``B`` a cubic B-spline over a
  control grid with ``|param| <= 1``. B-spline weights are non-negative and sum to one, so
  ``|log bias| <= log_bound`` everywhere; applied above the sample's minimum so it also
  makes sense on z-scored images.
* `Affine`: in-plane rotation, per-axis scale and shift, ``|param| <= 1`` (5 numbers per
  sample). Built in pixel space, so non-square patches are not sheared. In 3D it acts in the
  (H, W) plane of every slice: slices of a cine stack are ~10 mm apart, so through-plane
  resampling would create images no scanner produces.
* `Deformation` (2D only): a stationary velocity field on a coarse control grid, Gaussian-
  smoothed, bilinearly upsampled (both convex, so ``|v| <= magnitude``), integrated by scaling
  and squaring into a diffeomorphism; its inverse integrates ``-v``. 3D leaves it out (the
  regime drops it) rather than faking a through-plane field.

Parameters with an L2 bound step along the L2-normalised gradient, box-bounded ones along
its sign (steepest ascent for each norm, PGD of Madry et al. 2017), by their *own*
``step_size`` in units of the bound, divided by sqrt(iteration + 1) as in AdvChain's solver,
and are projected back onto their set after every step. Every transform is the identity at
``param == 0``. All random draws come from the ``torch.Generator`` passed in.

Geometric warps fill out-of-view pixels with the sample's minimum (images), 0 (predictions,
labels). `AdvChain.valid_weight` weighs each clean-frame pixel by how much of it survived the
forward-then-inverse warp, ramped down near both frames' edges: a network's own zero-padding
effects there are not the perturbation's doing, and a hard in/out mask made the consistency
jump whenever one pixel crossed it, so small ascent steps could *lower* it.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

TRANSFORMS = ("noise", "bias", "affine", "deformation")


def _norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.ndim - 1)))


def _sample_min(x: Tensor) -> Tensor:
    return x.detach().flatten(1).amin(1).view(-1, *([1] * (x.ndim - 1)))


def _resample(x: Tensor, grid: Tensor, mode: str, pad_min: bool) -> Tensor:
    """``grid_sample`` with zeros outside, or the per-sample minimum when ``pad_min``."""
    # Sample in the grid's precision (float32 unless parameters are float64): labels are
    # integers, and half-precision grids misplace pixels.
    v = x.to(grid.dtype)
    if mode == "nearest" or not pad_min:
        return F.grid_sample(v, grid, mode=mode, align_corners=False).to(x.dtype)
    low = _sample_min(v)
    return (F.grid_sample(v - low, grid, mode=mode, align_corners=False) + low).to(x.dtype)


class _Transform:
    """Shared plumbing: the normalised parameter, its step size, ascent rule and projection."""

    name = ""
    spatial = False
    l2_ball = False  # True: ||param||_2 <= 1 per sample; False: |param| <= 1 elementwise

    def __init__(self, step_size: float) -> None:
        if step_size < 0:
            raise ValueError(f"{self.name}: step_size must be >= 0, got {step_size}")
        self.step_size = float(step_size)
        self.param: Optional[Tensor] = None

    def shape_for(self, x_shape: Sequence[int]) -> Tuple[int, ...]:
        """Shape of ``param`` for an input batch of shape ``x_shape``."""
        raise NotImplementedError

    def init(self, x_shape: Sequence[int], generator: Optional[torch.Generator] = None,
             device: Optional[torch.device] = None) -> Tensor:
        """Draw ``param`` at random inside the bounds (``generator=None``: zeros, the identity).

        Args:
            x_shape: Shape of the batch the transform will act on, ``(N, C, *S)``.
            generator: Source of randomness; its device is where ``param`` lives.
            device: Device of the zero parameters when ``generator`` is None.
        """
        shape = self.shape_for(tuple(x_shape))
        if generator is None:
            self.param = torch.zeros(shape, device=device)
        elif self.l2_ball:  # AdvChain starts noise on the sphere: a random direction at full norm
            d = torch.randn(shape, generator=generator, device=generator.device)
            self.param = d / _norm(d)
        else:
            self.param = torch.rand(shape, generator=generator, device=generator.device) * 2 - 1
        return self.param

    def ascend(self, grad: Tensor, iteration: int = 0) -> None:
        """One projected gradient-ascent step with this transform's own step size."""
        direction = grad / _norm(grad) if self.l2_ball else grad.sign()
        with torch.no_grad():
            self.param = self.param.detach() + self.step_size / math.sqrt(iteration + 1) * direction
        self.project()

    def project(self) -> None:
        """Put ``param`` back inside its bounds."""
        with torch.no_grad():
            p = self.param.detach()
            self.param = p * (1.0 / _norm(p)).clamp(max=1.0) if self.l2_ball else p.clamp(-1.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """The perturbed image."""
        raise NotImplementedError

    def warp(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        """Move a prediction/label like ``forward`` moves the image (identity if not spatial)."""
        return y

    def inverse(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        """Warp a prediction on the perturbed image back to the clean image's frame."""
        return y


class Noise(_Transform):
    """Additive noise ``epsilon * param``, ``||param||_2 <= 1`` per sample (AdvChain's AdvNoise)."""

    name, l2_ball = "noise", True

    def __init__(self, epsilon: float, step_size: float) -> None:
        super().__init__(step_size)
        self.epsilon = float(epsilon)

    def shape_for(self, x_shape: Sequence[int]) -> Tuple[int, ...]:
        return tuple(x_shape)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.epsilon * self.param.to(x.dtype)


def bspline_matrix(n_intervals: int, n: int, device: torch.device) -> Tensor:
    """``(n_intervals + 3, n)`` cubic B-spline weights of ``n`` pixel centres on a control grid.

    Control point ``j`` sits at knot ``j - 1`` of ``n_intervals`` equal intervals spanning the
    axis; the weights of every pixel are non-negative and sum to one (partition of unity).
    """
    u = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (n_intervals / n)
    t = (u[None, :] - (torch.arange(n_intervals + 3, device=device, dtype=torch.float32)[:, None] - 1)).abs()
    inner = (4 - 6 * t ** 2 + 3 * t ** 3) / 6
    outer = (2 - t).clamp(min=0) ** 3 / 6
    return torch.where(t < 1, inner, outer)


class BiasField(_Transform):
    """Smooth multiplicative bias field, bounded in log space (AdvChain's AdvBias, 'log' space)."""

    name = "bias"

    def __init__(self, spacing: float, log_bound: float, step_size: float) -> None:
        super().__init__(step_size)
        self.n_intervals = max(1, math.ceil(1.0 / spacing - 1e-6))
        self.log_bound = float(log_bound)

    def shape_for(self, x_shape: Sequence[int]) -> Tuple[int, ...]:
        return (x_shape[0], 1, *([self.n_intervals + 3] * (len(x_shape) - 2)))

    def log_field(self, spatial: Sequence[int]) -> Tensor:
        """``(N, 1, *S)`` log bias: separable B-spline evaluation, one small matmul per axis."""
        f = self.param
        for axis, n in enumerate(spatial):
            m = bspline_matrix(self.n_intervals, n, f.device)
            f = (f.movedim(2 + axis, -1) @ m).movedim(-1, 2 + axis)
        return self.log_bound * f

    def forward(self, x: Tensor) -> Tensor:
        low = _sample_min(x)
        return (x - low) * torch.exp(self.log_field(x.shape[2:])).to(x.dtype) + low


class Affine(_Transform):
    """In-plane rotation, per-axis scale and shift; ``param`` is ``(N, 5)``: angle, 2 scales, 2 shifts."""

    name, spatial = "affine", True

    def __init__(self, degrees: float, scale: float, shift: float, step_size: float) -> None:
        super().__init__(step_size)
        self.degrees, self.scale, self.shift = float(degrees), float(scale), float(shift)

    def shape_for(self, x_shape: Sequence[int]) -> Tuple[int, ...]:
        return (x_shape[0], 5)

    def components(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Angle (degrees, ``(N,)``), scale factors ``(N, 2)`` and shifts (fraction of the extent, ``(N, 2)``) over (H, W)."""
        p = self.param
        return p[:, 0] * self.degrees, 1 + self.scale * p[:, 1:3], self.shift * p[:, 3:5]

    def theta(self, shape: Sequence[int], inverse: bool = False) -> Tensor:
        """``(N, nd, nd + 1)`` matrix for ``F.affine_grid`` (normalised units, grid axis order).

        Output pixel ``p`` (offset from the centre, axis order) samples the input at
        ``R S p + t``: a factor > 1 zooms out, as the random augmentation's ``scaling``.
        """
        nd = len(shape) - 2
        angle, scale, shift = self.components()
        a = angle * (math.pi / 180)
        c, s = torch.cos(a), torch.sin(a)
        hw = torch.tensor([float(n) for n in shape[-2:]], device=a.device)
        # Pixel-space (H, W) block R @ diag(scale), then normalised: M[i, j] = A[i, j] * N_j / N_i.
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        lin2 = rot * scale[:, None, :] * hw[None, None, :] / hw[None, :, None]
        n, dev = a.shape[0], a.device
        lin = lin2
        if nd == 3:  # the slice axis D maps to itself
            top = torch.cat([torch.ones(n, 1, 1, device=dev), torch.zeros(n, 1, 2, device=dev)], 2)
            lin = torch.cat([top, torch.cat([torch.zeros(n, 2, 1, device=dev), lin2], 2)], 1)
        t = torch.cat([torch.zeros(n, nd - 2, device=dev), 2 * shift], 1)
        if inverse:
            lin = torch.linalg.inv(lin)
            t = -(lin @ t[:, :, None])[:, :, 0]
        # grid_sample orders coordinates (x=W, y=H, z=D): reverse both axes.
        return torch.cat([lin.flip(-1).flip(-2), t.flip(-1)[:, :, None]], 2)

    def _apply(self, x: Tensor, inverse: bool, mode: str, pad_min: bool) -> Tensor:
        grid = F.affine_grid(self.theta(x.shape, inverse), list(x.shape), align_corners=False)
        return _resample(x, grid, mode, pad_min)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply(x, False, "bilinear", True)

    def warp(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        return self._apply(y, False, mode, False)

    def inverse(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        return self._apply(y, True, mode, False)


def identity_grid(n: int, shape: Sequence[int], device: torch.device) -> Tensor:
    """``(n, H, W, 2)`` pixel-centre grid in normalised units (align_corners=False)."""
    theta = torch.eye(2, 3, device=device).repeat(n, 1, 1)
    return F.affine_grid(theta, [n, 1, *shape], align_corners=False)


def _gaussian_smooth(v: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian (normalised kernel, replicate border: a convex combination)."""
    if sigma <= 0:
        return v
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, device=v.device, dtype=v.dtype) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = v.shape[1]
    v = F.conv2d(F.pad(v, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(v, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


class Deformation(_Transform):
    """Diffeomorphic deformation: exp of a smooth stationary velocity field (2D only)."""

    name, spatial = "deformation", True

    def __init__(self, spacing: int, sigma: float, magnitude: float, squaring_steps: int, step_size: float) -> None:
        super().__init__(step_size)
        self.spacing, self.sigma, self.magnitude = int(spacing), float(sigma), float(magnitude)
        self.squaring_steps = int(squaring_steps)
        self._cache: Dict[Tuple[float, Tuple[int, ...]], Tuple[Tensor, int, Tensor]] = {}

    def shape_for(self, x_shape: Sequence[int]) -> Tuple[int, ...]:
        if len(x_shape) != 4:
            raise ValueError(f"deformation: 2D batches (N, C, H, W) only, got shape {tuple(x_shape)}")
        return (x_shape[0], 2, *[max(2, n // self.spacing) for n in x_shape[2:]])

    def velocity(self, shape: Sequence[int]) -> Tensor:
        """``(N, H, W, 2)`` velocity in normalised grid units (x=W, y=H), ``|v| <= 2 * magnitude``."""
        v = _gaussian_smooth(self.param, self.sigma)
        v = F.interpolate(v, size=tuple(shape), mode="bilinear", align_corners=True)
        # Channel 0 moves along W, 1 along H; a fraction f of the extent is 2 f normalised units.
        return (2 * self.magnitude) * v.permute(0, 2, 3, 1)

    def displacement(self, shape: Sequence[int], sign: float = 1.0) -> Tensor:
        """Scaling and squaring: ``u <- u + u o (id + u)``, starting from ``sign * v / 2**K``.

        Results are kept (detached) per parameter tensor and in-place version and reused where
        no gradient is needed: one inner step needs each direction twice (the warp, then the
        consistency weight without gradient), and the K resamplings are most of the cost.
        A graph is never reused, so repeated backward passes stay safe.
        """
        key = (sign, tuple(shape))
        hit = self._cache.get(key)
        if not (torch.is_grad_enabled() and self.param.requires_grad):
            if hit is not None and hit[0] is self.param and hit[1] == self.param._version:
                return hit[2]
        u = self._integrate(shape, sign)
        self._cache[key] = (self.param, self.param._version, u.detach())
        return u

    def _integrate(self, shape: Sequence[int], sign: float) -> Tensor:
        v = sign * self.velocity(shape)
        u = v / (2 ** self.squaring_steps)
        base = identity_grid(v.shape[0], shape, v.device)
        for _ in range(self.squaring_steps):
            moved = F.grid_sample(u.permute(0, 3, 1, 2), base + u, mode="bilinear", padding_mode="border",
                                  align_corners=False)
            u = u + moved.permute(0, 2, 3, 1)
        return u

    def _apply(self, x: Tensor, sign: float, mode: str, pad_min: bool) -> Tensor:
        shape = x.shape[2:]
        grid = identity_grid(x.shape[0], shape, x.device) + self.displacement(shape, sign)
        return _resample(x, grid, mode, pad_min)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply(x, 1.0, "bilinear", True)

    def warp(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        return self._apply(y, 1.0, mode, False)

    def inverse(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        return self._apply(y, -1.0, mode, False)


def border_ramp(shape: Sequence[int], margin: float, device: torch.device) -> Tensor:
    """``(1, 1, *shape)``: distance of each pixel centre to the nearest in-plane edge / ``margin``, capped at 1."""
    w = torch.ones(1, 1, *shape, device=device)
    if margin <= 0:
        return w
    for axis in (-2, -1):
        n = shape[axis]
        i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
        ramp = (torch.minimum(i, n - i) / margin).clamp(max=1.0)
        w = w * ramp.view(*([1] * (len(shape) + 2 + axis)), n, *([1] * (-axis - 1)))
    return w


def random_subchain(names: Sequence[str], generator: torch.Generator, n_extra: int = 0) -> Tuple[List[str], List[float]]:
    """A random non-empty subset of ``names`` in random order, plus ``n_extra`` U(0, 1) draws.

    Everything is drawn on the generator's device and read back in one host transfer.
    """
    dev = generator.device
    k = len(names)
    draws = torch.cat([torch.rand(n_extra, generator=generator, device=dev),
                       torch.randperm(k, generator=generator, device=dev).float(),
                       torch.randint(1, k + 1, (1,), generator=generator, device=dev).float()]).tolist()
    extra, perm, length = draws[:n_extra], [int(i) for i in draws[n_extra:n_extra + k]], int(draws[-1])
    return [names[i] for i in perm[:length]], extra


class AdvChain:
    """A family of transforms, the sub-chain currently drawn from it, and its ascent step.

    Args:
        transforms: Name -> transform (the family, in config order).
        preserve_range: Rescale the perturbed image to the clean image's per-sample
            [min, max] (AdvChain's ``if_norm_image``).
    """

    def __init__(self, transforms: Dict[str, _Transform], preserve_range: bool = True) -> None:
        self.family = dict(transforms)
        self.preserve_range = preserve_range
        self.active: List[_Transform] = []

    def select(self, names: Sequence[str], x_shape: Sequence[int], generator: Optional[torch.Generator] = None,
               device: Optional[torch.device] = None) -> None:
        """Make ``names`` (in that order) the active chain and initialise its parameters.

        Args:
            names: Transform names, applied first to last.
            x_shape: Batch shape ``(N, C, *S)``.
            generator: Random initialisation inside the bounds; None gives zeros (identity).
            device: Device of zero parameters when ``generator`` is None.
        """
        unknown = [n for n in names if n not in self.family]
        if unknown:
            raise ValueError(f"advchain: unknown transform(s) {unknown}; this chain has {list(self.family)}")
        self.active = [self.family[n] for n in names]
        for t in self.active:
            t.init(x_shape, generator, device)

    @property
    def names(self) -> List[str]:
        """Names of the active chain, in application order."""
        return [t.name for t in self.active]

    def parameters(self) -> List[Tensor]:
        """The active transforms' parameter tensors."""
        return [t.param for t in self.active]

    def requires_grad_(self, flag: bool = True) -> None:
        """Start (or stop) recording gradients on the active parameters."""
        for t in self.active:
            t.param = t.param.detach().requires_grad_(flag)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the active chain to an image batch."""
        y = x
        for t in self.active:
            y = t.forward(y)
        if self.preserve_range and self.active:
            lo, hi = x.detach().flatten(1).aminmax(dim=1)
            ylo, yhi = y.flatten(1).amin(1), y.flatten(1).amax(1)
            shape = (-1, *([1] * (x.ndim - 1)))
            scale = (hi - lo) / (yhi - ylo).clamp_min(1e-8)
            y = (y - ylo.view(shape)) * scale.view(shape) + lo.view(shape)
        return y

    def warp(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        """Move predictions (bilinear) or labels (``mode="nearest"``) as the chain moves the image."""
        for t in self.active:
            y = t.warp(y, mode)
        return y

    def inverse(self, y: Tensor, mode: str = "bilinear") -> Tensor:
        """Warp predictions on the perturbed image back to the clean frame (reverse order)."""
        for t in reversed(self.active):
            y = t.inverse(y, mode)
        return y

    @property
    def spatial(self) -> bool:
        """Whether the active chain moves pixels."""
        return any(t.spatial for t in self.active)

    def valid_weight(self, like: Tensor, margin: float = 0.0) -> Tensor:
        """``(N, 1, *S)`` weights in [0, 1] of clean-frame pixels for the consistency loss.

        Args:
            like: A batch ``(N, C, *S)`` giving the shape and device.
            margin: Width in pixels of the linear ramp from 0 to 1 at the in-plane edges of
                both the clean and the perturbed frame (0: no ramp).

        Returns:
            ``inverse(warp(1) * ramp) * ramp``: continuous in the parameters (no hard mask), 1
            inside, falling to 0 where a pixel's round trip left the view. No gradient.
        """
        with torch.no_grad():
            ramp = border_ramp(like.shape[2:], margin, like.device).expand(like.shape[0], 1, *like.shape[2:])
            if not self.spatial:
                return ramp.clone()
            # In view after the forward warp, times the perturbed frame's own edge ramp, brought
            # back; then the clean frame's ramp.
            ones = torch.ones_like(ramp)
            return self.inverse(self.warp(ones) * ramp) * ramp

    def ascend(self, grads: Sequence[Tensor], iteration: int = 0) -> None:
        """Step every active transform along its gradient with its own step size, then project."""
        for t, g in zip(self.active, grads):
            t.ascend(g, iteration)

    def project(self) -> None:
        """Project every active parameter onto its bounds."""
        for t in self.active:
            t.project()
