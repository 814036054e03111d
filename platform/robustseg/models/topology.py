"""nnU-Net-like network topology: stages, kernels and strides from patch size and spacing.

The rule follows nnU-Net's planner (Isensee et al., 2021), re-derived here:

* at every stage, an axis is downsampled (stride 2) only while its feature size stays at least
  ``min_size`` afterwards, and only while its current spacing is less than ``anisotropy``
  (2x) times the finest current spacing among the axes that may still pool. A thick-slice
  cine stack (1.5 mm in-plane, 10 mm slices) therefore pools in-plane first and only pools the
  slice axis once the in-plane spacing has caught up;
* a stage's kernel is 3 along axes whose spacing (at that stage's resolution) is within
  ``anisotropy`` of the finest and 1 along much coarser axes, so early 3D stages on thick
  slices are (1, 3, 3) convolutions that do not mix slices 10 mm apart; once an axis gets a
  3 it keeps it;
* the number of stages is capped by ``max_stages`` (the first stage has stride 1).

Spacing ``None`` means isotropic. Axes are in the patch's order ((H, W) or (D, H, W)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from robustseg.errors import ConfigError

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Topology:
    """Per-stage kernels, strides and feature-map sizes of an encoder.

    Attributes:
        kernels: Convolution kernel size per stage and axis.
        strides: Stride per stage and axis; the first stage has stride 1.
        sizes: Feature-map size per stage and axis (for the patch the topology was derived for).
        spacings: Effective voxel spacing per stage and axis.
    """

    kernels: Tuple[Shape, ...]
    strides: Tuple[Shape, ...]
    sizes: Tuple[Shape, ...]
    spacings: Tuple[Tuple[float, ...], ...]

    @property
    def n_stages(self) -> int:
        """Number of resolution stages (downsamplings + 1)."""
        return len(self.strides)

    @property
    def divisible_by_axes(self) -> Shape:
        """Per-axis input divisibility: the product of the strides along each axis."""
        dims = len(self.strides[0])
        return tuple(math.prod(s[a] for s in self.strides) for a in range(dims))

    @property
    def divisible_by(self) -> int:
        """One integer every axis must be a multiple of (the largest per-axis factor)."""
        return max(self.divisible_by_axes)

    def padded(self, size: Sequence[int]) -> Shape:
        """``size`` rounded up, per axis, to the next valid input size."""
        return tuple(-(-int(s) // d) * d for s, d in zip(size, self.divisible_by_axes))


def derive_topology(
    patch_size: Sequence[int],
    spacing: Optional[Sequence[float]] = None,
    *,
    min_size: int = 4,
    max_stages: int = 8,
    anisotropy: float = 2.0,
) -> Topology:
    """Derive an nnU-Net-like topology for a patch.

    Args:
        patch_size: Training patch size, (H, W) or (D, H, W).
        spacing: Voxel spacing in mm in the same axis order; None: isotropic.
        min_size: Smallest feature size an axis may be downsampled to.
        max_stages: Upper bound on the number of stages (downsamplings + 1).
        anisotropy: An axis pools (and gets a 3-kernel) only while its spacing is less than
            this factor times the finest spacing.

    Returns:
        The topology; ``divisible_by_axes`` tells the sizes the network accepts.

    Raises:
        ConfigError: mismatched lengths, non-positive sizes/spacings or bad limits.
    """
    size = [int(s) for s in patch_size]
    dims = len(size)
    if dims not in (2, 3):
        raise ConfigError(f"patch_size must have 2 or 3 axes, got {tuple(patch_size)}")
    sp = [1.0] * dims if spacing is None else [float(s) for s in spacing]
    if len(sp) != dims:
        raise ConfigError(f"spacing {tuple(spacing or ())} does not match patch_size {tuple(size)} (axes in the same order)")
    if min(size) < 1 or min(sp) <= 0:
        raise ConfigError(f"patch_size and spacing must be positive, got {tuple(size)} and {tuple(sp)}")
    if min_size < 1 or max_stages < 1 or anisotropy <= 1:
        raise ConfigError("min_size and max_stages must be >= 1 and anisotropy > 1")

    def kernel_for(cur_sp: List[float], prev: List[int]) -> List[int]:
        finest = min(cur_sp)
        # Sticky: once an axis is fine enough to convolve along, coarser stages keep doing so.
        return [3 if k == 3 or s / finest < anisotropy else 1 for k, s in zip(prev, cur_sp)]

    kernel = kernel_for(sp, [1] * dims)
    kernels: List[Shape] = [tuple(kernel)]
    strides: List[Shape] = [(1,) * dims]
    sizes: List[Shape] = [tuple(size)]
    spacings: List[Tuple[float, ...]] = [tuple(sp)]
    while len(strides) < max_stages:
        room = [a for a in range(dims) if size[a] >= 2 * min_size]
        if not room:
            break
        finest = min(sp[a] for a in room)
        axes = [a for a in room if sp[a] / finest < anisotropy]
        stride = [2 if a in axes else 1 for a in range(dims)]
        for a in axes:
            size[a] = -(-size[a] // 2)
            sp[a] *= 2.0
        kernel = kernel_for(sp, kernel)
        strides.append(tuple(stride))
        kernels.append(tuple(kernel))
        sizes.append(tuple(size))
        spacings.append(tuple(sp))
    return Topology(tuple(kernels), tuple(strides), tuple(sizes), tuple(spacings))


def check_patch(name: str, patch_size: Sequence[int], divisible_by: Sequence[int]) -> None:
    """Fail early, with the nearest valid patch, when a patch cannot pass through a network.

    Args:
        name: Backbone name for the message.
        patch_size: Training patch size.
        divisible_by: Required per-axis divisibility.

    Raises:
        ConfigError: some axis of the patch is not a multiple of its factor.
    """
    bad = [(p, d) for p, d in zip(patch_size, divisible_by) if int(p) % int(d)]
    if bad:
        fixed = tuple(-(-int(p) // int(d)) * int(d) for p, d in zip(patch_size, divisible_by))
        raise ConfigError(
            f"{name}: patch size {tuple(patch_size)} is not divisible by {tuple(divisible_by)} "
            f"(per axis); use e.g. {fixed} (crop/pad size or inference.patch_size)"
        )


__all__ = ["Topology", "derive_topology", "check_patch"]
