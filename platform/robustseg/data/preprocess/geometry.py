"""Geometry helpers the preprocessing plans share: in-plane resampling grids, crop/pad
windows, and the exact inverses used to write predictions back in the input's geometry.

Conventions (as in `robustseg.data.cases`): arrays are ``(Z, Y, X)``; ``spacing`` and ``origin``
are SimpleITK ``(x, y, z)``; ``direction`` is a row-major 3x3 tuple, so the world position of
voxel index ``(i, j, k)`` (x, y, z order) is ``origin + D @ (spacing * (i, j, k))``.

The resampled grid. Plans resample in-plane only (the slice axis is never touched) and
centre the new grid on the old one: ``m = round(n * s / t)`` voxels of size ``t`` whose centre
coincides with the centre of the ``n`` old voxels of size ``s``. Its voxel 0 therefore sits
``shift = ((n - 1) * s - (m - 1) * t) / 2`` mm from the old voxel 0 along that index axis, and
the new grid covers the old physical extent to within ``t / 2``.

Which round trips are exact (label -> nearest neighbour -> back with nearest neighbour):

* **up-sampling or equal spacing** (``t <= s`` on both in-plane axes): exact, always. Every
  old voxel centre has a new centre within ``t / 2 < s / 2``, i.e. inside its own old cell,
  and that new voxel took its value from exactly that old voxel. Nearest-neighbour
  resampling is separable on axis-aligned grids, so the 1D argument covers 2D.
* **down-sampling** (``t > s`` on an axis): not exact. ``m < n`` new voxels cannot carry
  ``n`` old ones, so about ``1 - s / t`` of the old indices per axis come back as a
  neighbour's value. For ``t <= 2 s`` every voxel comes back as itself or one of its 8
  in-plane neighbours, so all errors are on label boundaries (structures thinner than ``t``
  can vanish). Measured for 1.0 -> 1.25 mm (tests): Dice > 0.98 for solid blobs 24 px in
  radius, > 0.93 for 6 px thick rings; thinner or smaller structures fare worse.
* crop/pad: exact whenever the crop window removed no foreground (``foreground_voxels_lost``
  in the record is then 0).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from robustseg.errors import DataError

# Spacings within this relative tolerance are "already at target": resampling them would
# only add interpolation noise (M&Ms stores 1.4844001 and 1.4843994 for the same pixel).
SPACING_RTOL = 1e-4

# Slices resampled in parallel (each on one ITK thread).
_MAX_THREADS = 8


@dataclass(frozen=True)
class InplaneGrid:
    """How an in-plane resampling maps the original grid onto the resampled one.

    Attributes:
        in_shape_yx: Original in-plane size.
        in_spacing_xy: Original in-plane spacing (x, y) in mm.
        out_shape_yx: Resampled in-plane size.
        out_spacing_xy: Resampled spacing (x, y).
        shift_xy_mm: Position of resampled voxel 0 relative to original voxel 0, along the
            image's own x and y index axes, in mm.
        applied: False when no resampling happened (the out fields then equal the in fields).
        reason: Why resampling was skipped ("" when applied).
    """

    in_shape_yx: Tuple[int, int]
    in_spacing_xy: Tuple[float, float]
    out_shape_yx: Tuple[int, int]
    out_spacing_xy: Tuple[float, float]
    shift_xy_mm: Tuple[float, float]
    applied: bool
    reason: str = ""

    def to_record(self) -> Dict[str, Any]:
        """JSON-ready form stored under ``record["resample"]``."""
        return {
            "applied": self.applied,
            "reason": self.reason,
            "in_shape_yx": [int(v) for v in self.in_shape_yx],
            "in_spacing_xy": [float(v) for v in self.in_spacing_xy],
            "out_shape_yx": [int(v) for v in self.out_shape_yx],
            "out_spacing_xy": [float(v) for v in self.out_spacing_xy],
            "shift_xy_mm": [float(v) for v in self.shift_xy_mm],
        }

    @classmethod
    def from_record(cls, d: Dict[str, Any]) -> "InplaneGrid":
        """Inverse of `to_record`."""
        return cls(
            in_shape_yx=(int(d["in_shape_yx"][0]), int(d["in_shape_yx"][1])),
            in_spacing_xy=(float(d["in_spacing_xy"][0]), float(d["in_spacing_xy"][1])),
            out_shape_yx=(int(d["out_shape_yx"][0]), int(d["out_shape_yx"][1])),
            out_spacing_xy=(float(d["out_spacing_xy"][0]), float(d["out_spacing_xy"][1])),
            shift_xy_mm=(float(d["shift_xy_mm"][0]), float(d["shift_xy_mm"][1])),
            applied=bool(d["applied"]),
            reason=str(d.get("reason", "")),
        )

    def to_out_index(self, yx: Sequence[float]) -> Tuple[float, float]:
        """Map a continuous original index ``(y, x)`` to the resampled grid."""
        (sx, sy), (tx, ty), (hx, hy) = self.in_spacing_xy, self.out_spacing_xy, self.shift_xy_mm
        return ((yx[0] * sy - hy) / ty, (yx[1] * sx - hx) / tx)


def identity_grid(shape_yx: Sequence[int], spacing_xy: Sequence[float], reason: str) -> InplaneGrid:
    """A grid that keeps the original sampling, recording why.

    Args:
        shape_yx: In-plane size.
        spacing_xy: In-plane spacing (x, y).
        reason: Why resampling is skipped (recorded for the user).

    Returns:
        A grid with ``applied=False``.
    """
    shape = (int(shape_yx[0]), int(shape_yx[1]))
    spacing = (float(spacing_xy[0]), float(spacing_xy[1]))
    return InplaneGrid(shape, spacing, shape, spacing, (0.0, 0.0), False, reason)


def grid_to_spacing(
    shape_yx: Sequence[int], spacing_xy: Sequence[float], target_xy: Sequence[float]
) -> InplaneGrid:
    """The centred grid at ``target_xy`` covering the original extent (see module docstring).

    Args:
        shape_yx: Original in-plane size.
        spacing_xy: Original spacing (x, y) in mm.
        target_xy: Target spacing (x, y) in mm.

    Returns:
        The grid; ``applied=False`` when both axes are already at the target.
    """
    out_n, out_t, shift = [], [], []
    for n, s, t in ((shape_yx[1], spacing_xy[0], target_xy[0]), (shape_yx[0], spacing_xy[1], target_xy[1])):
        if abs(s - t) <= SPACING_RTOL * t:
            m, t = int(n), float(s)
        else:
            m = max(1, int(round(n * s / t)))
        out_n.append(m)
        out_t.append(float(t))
        shift.append(((n - 1) * s - (m - 1) * t) / 2.0)
    if out_n == [shape_yx[1], shape_yx[0]] and all(abs(h) < 1e-12 for h in shift):
        return identity_grid(shape_yx, spacing_xy, "already at the target spacing")
    return InplaneGrid(
        (int(shape_yx[0]), int(shape_yx[1])),
        (float(spacing_xy[0]), float(spacing_xy[1])),
        (out_n[1], out_n[0]),
        (out_t[0], out_t[1]),
        (shift[0], shift[1]),
        True,
    )


def grid_to_shape(shape_yx: Sequence[int], spacing_xy: Sequence[float], out_shape_yx: Sequence[int]) -> InplaneGrid:
    """A resize: the grid of ``out_shape_yx`` voxels spanning exactly the original extent.

    Args:
        shape_yx: Original in-plane size.
        spacing_xy: Original spacing (x, y) (pixels of 1.0 when unknown).
        out_shape_yx: Output size (y, x).

    Returns:
        The grid (``applied=False`` when the size is already right).
    """
    if tuple(int(v) for v in out_shape_yx) == tuple(int(v) for v in shape_yx):
        return identity_grid(shape_yx, spacing_xy, "already at the target size")
    tx = spacing_xy[0] * shape_yx[1] / out_shape_yx[1]
    ty = spacing_xy[1] * shape_yx[0] / out_shape_yx[0]
    # Extents match exactly, so the centred shift reduces to the half-voxel difference.
    return InplaneGrid(
        (int(shape_yx[0]), int(shape_yx[1])),
        (float(spacing_xy[0]), float(spacing_xy[1])),
        (int(out_shape_yx[0]), int(out_shape_yx[1])),
        (float(tx), float(ty)),
        ((tx - spacing_xy[0]) / 2.0, (ty - spacing_xy[1]) / 2.0),
        True,
    )


def resample_inplane(array_zyx: np.ndarray, grid: InplaneGrid, interpolator: int, inverse: bool = False) -> np.ndarray:
    """Resample every slice of ``array_zyx`` from one side of ``grid`` to the other.

    Slices are resampled one by one as 2D images in the grid's own index frame, so the slice
    axis is untouched by construction (a 3D B-spline would also filter across slices) and
    the direction matrix never enters the arithmetic.

    Args:
        array_zyx: ``(Z, Y, X)`` array on the original grid (or on the resampled grid when
            ``inverse``). Its dtype is kept (float32 for images, uint8 for labels).
        grid: The grid from `grid_to_spacing` / `grid_to_shape`.
        interpolator: A SimpleITK interpolator (``sitk.sitkBSpline``, ``sitk.sitkLinear``,
            ``sitk.sitkNearestNeighbor``).
        inverse: Resample from the resampled grid back onto the original one.

    Returns:
        The resampled ``(Z, Y', X')`` array, same dtype.
    """
    if not grid.applied:
        return array_zyx.copy()
    src = (grid.in_spacing_xy, (0.0, 0.0), grid.in_shape_yx)
    dst = (grid.out_spacing_xy, grid.shift_xy_mm, grid.out_shape_yx)
    if inverse:
        src, dst = dst, src
    if tuple(array_zyx.shape[1:]) != tuple(src[2]):
        raise DataError("resample", f"array in-plane shape {array_zyx.shape[1:]} does not match the grid {src[2]}")
    out = np.empty((array_zyx.shape[0],) + tuple(dst[2]), dtype=array_zyx.dtype)

    def one(z: int) -> None:
        f = sitk.ResampleImageFilter()
        f.SetSize((int(dst[2][1]), int(dst[2][0])))
        f.SetOutputSpacing(tuple(dst[0]))
        f.SetOutputOrigin(tuple(dst[1]))
        f.SetInterpolator(interpolator)
        f.SetDefaultPixelValue(0)
        # Output voxels up to half a voxel beyond the input extent copy the edge, not 0.
        f.SetUseNearestNeighborExtrapolator(True)
        # One slice is too small for ITK's own threading to pay; threads over slices do.
        f.SetNumberOfThreads(1)
        img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx[z]))
        img.SetSpacing(tuple(src[0]))
        img.SetOrigin(tuple(src[1]))
        out[z] = sitk.GetArrayFromImage(f.Execute(img))

    workers = min(os.cpu_count() or 1, array_zyx.shape[0], _MAX_THREADS)
    if workers <= 1:
        for z in range(array_zyx.shape[0]):
            one(z)
    else:
        # SimpleITK releases the GIL while a filter runs.
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(array_zyx.shape[0])))
    return out


def crop_start(centre_yx: Sequence[float], size_yx: Sequence[int]) -> Tuple[int, int]:
    """Top-left index of a ``size_yx`` window whose centre is nearest ``centre_yx``.

    The window's geometric centre is ``start + (size - 1) / 2``, so the centre lands within
    half a voxel of it for odd and even sizes alike.
    """
    return tuple(int(math.floor(c - (n - 1) / 2.0 + 0.5)) for c, n in zip(centre_yx, size_yx))  # type: ignore[return-value]


def crop_or_pad(array: np.ndarray, start_yx: Sequence[int], size_yx: Sequence[int], fill: float) -> np.ndarray:
    """The ``size_yx`` window at ``start_yx`` of the last two axes; outside voxels get ``fill``.

    ``start_yx`` may be negative or run past the end: that part is padding.

    Args:
        array: ``(..., Y, X)`` array.
        start_yx: Window origin in ``array``'s index space.
        size_yx: Window size.
        fill: Value of padded voxels.

    Returns:
        ``(..., size_y, size_x)`` array of the same dtype.
    """
    (y0, x0), (ny, nx) = start_yx, size_yx
    h, w = array.shape[-2:]
    out = np.full(array.shape[:-2] + (int(ny), int(nx)), fill, dtype=array.dtype)
    ya, yb = max(y0, 0), min(y0 + ny, h)
    xa, xb = max(x0, 0), min(x0 + nx, w)
    if yb > ya and xb > xa:
        out[..., ya - y0 : yb - y0, xa - x0 : xb - x0] = array[..., ya:yb, xa:xb]
    return out


def uncrop(array: np.ndarray, start_yx: Sequence[int], full_shape_yx: Sequence[int], fill: float) -> np.ndarray:
    """Inverse of `crop_or_pad`: put the window back into a ``full_shape_yx`` array.

    Padding is dropped and the cropped-away part is filled with ``fill``.
    """
    return crop_or_pad(array, (-int(start_yx[0]), -int(start_yx[1])), full_shape_yx, fill)


def foreground_centroid_yx(label_zyx: Optional[np.ndarray]) -> Optional[Tuple[float, float]]:
    """In-plane centroid ``(y, x)`` of all foreground voxels of a volume, or None if empty."""
    if label_zyx is None:
        return None
    _, ys, xs = np.nonzero(label_zyx)
    if ys.size == 0:
        return None
    return (float(ys.mean()), float(xs.mean()))


def bbox_centre_yx(mask_zyx: np.ndarray) -> Optional[Tuple[float, float]]:
    """In-plane centre ``(y, x)`` of the bounding box of a mask, or None if empty."""
    ys = np.flatnonzero(mask_zyx.any(axis=(0, 2)))
    xs = np.flatnonzero(mask_zyx.any(axis=(0, 1)))
    if ys.size == 0:
        return None
    return ((ys[0] + ys[-1]) / 2.0, (xs[0] + xs[-1]) / 2.0)


def shifted_origin(origin: Sequence[float], direction: Sequence[float], offset_xyz_mm: Sequence[float]) -> Tuple[float, float, float]:
    """World origin after moving voxel 0 by ``offset_xyz_mm`` along the image's index axes."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    o = np.asarray(origin, dtype=np.float64) + d @ np.asarray(offset_xyz_mm, dtype=np.float64)
    return (float(o[0]), float(o[1]), float(o[2]))


def to_sitk(array_zyx: np.ndarray, spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> sitk.Image:
    """A 3D ``sitk.Image`` carrying the array and its geometry (SimpleITK order)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetDirection(tuple(float(v) for v in direction))
    return img


def from_sitk(img: sitk.Image) -> Tuple[np.ndarray, Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """``(array_zyx, spacing, origin, direction)`` of a ``sitk.Image``."""
    return sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
