"""Resampling grids, crop/pad windows and their inverses (robustseg.data.preprocess.geometry)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from robustseg.data.preprocess.geometry import (
    InplaneGrid,
    bbox_centre_yx,
    crop_or_pad,
    crop_start,
    foreground_centroid_yx,
    from_sitk,
    grid_to_shape,
    grid_to_spacing,
    resample_inplane,
    shifted_origin,
    to_sitk,
    uncrop,
)
from robustseg.errors import DataError

NN = sitk.sitkNearestNeighbor


def _blobs(shape_zyx, radius: float, seed: int = 0) -> np.ndarray:
    """Nested ellipses (label 1 around 2) near the middle: smooth shapes."""
    rng = np.random.default_rng(seed)
    z, h, w = shape_zyx
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros(shape_zyx, dtype=np.uint8)
    for k in range(z):
        cy, cx = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w
        out[k][((yy - cy) / radius) ** 2 + ((xx - cx) / (0.8 * radius)) ** 2 < 1] = 1
        out[k][((yy - cy) / (0.5 * radius)) ** 2 + ((xx - cx) / (0.4 * radius)) ** 2 < 1] = 2
    return out


def _round_trip(label: np.ndarray, grid: InplaneGrid) -> np.ndarray:
    return resample_inplane(resample_inplane(label, grid, NN), grid, NN, inverse=True)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_grid_to_spacing_is_centred_and_sized_by_ratio() -> None:
    g = grid_to_spacing((256, 231), (1.484, 1.484), (1.25, 1.25))
    assert g.applied and g.out_spacing_xy == (1.25, 1.25)
    assert g.out_shape_yx == (round(256 * 1.484 / 1.25), round(231 * 1.484 / 1.25))
    # The old and new grids share their centre along each axis.
    for n, m, s, t, h in ((231, g.out_shape_yx[1], 1.484, 1.25, g.shift_xy_mm[0]), (256, g.out_shape_yx[0], 1.484, 1.25, g.shift_xy_mm[1])):
        assert (n - 1) * s / 2 == pytest.approx(h + (m - 1) * t / 2)
    assert InplaneGrid.from_record(g.to_record()) == g


def test_grid_at_target_spacing_is_identity() -> None:
    # M&Ms stores 1.4844002 / 1.4843994 for one pixel size: treated as already at target.
    g = grid_to_spacing((64, 48), (1.4844002, 1.4843994), (1.4844, 1.4844))
    assert not g.applied and "already" in g.reason
    arr = np.arange(2 * 64 * 48, dtype=np.float32).reshape(2, 64, 48)
    assert np.array_equal(resample_inplane(arr, g, sitk.sitkBSpline), arr)


@pytest.mark.parametrize("shape", [(64, 64), (65, 63), (50, 77)])
@pytest.mark.parametrize("spacing,target", [((1.484, 1.484), (1.25, 1.25)), ((1.0, 1.0), (0.7, 0.7)), ((1.5, 1.2), (1.25, 1.0)), ((1.3, 0.9), (1.3, 0.6))])
def test_upsampling_round_trip_is_exact_for_any_label(shape, spacing, target) -> None:
    rng = np.random.default_rng(1)
    # Random labels, not just smooth blobs: exactness does not depend on the shape.
    label = rng.integers(0, 4, size=(3,) + shape).astype(np.uint8)
    g = grid_to_spacing(shape, spacing, target)
    resampled = resample_inplane(label, g, NN)
    assert set(np.unique(resampled)) <= set(np.unique(label))
    assert np.array_equal(_round_trip(label, g), label)


@pytest.mark.parametrize("shape", [(150, 141), (151, 140)])
def test_downsampling_round_trip_is_bounded(shape) -> None:
    """1.0 -> 1.25 mm and back is not exact; the bound depends on how thick structures are."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    label = np.zeros((4,) + shape, np.uint8)
    for k, (cy, cx) in enumerate([(70.3, 66.0), (75.0, 71.6), (64.5, 60.2), (80.9, 73.3)]):
        outer = ((yy - cy) / 24) ** 2 + ((xx - cx) / 19.2) ** 2 < 1  # solid blob, 24 px radius
        inner = ((yy - cy) / 18) ** 2 + ((xx - cx) / 13.2) ** 2 < 1  # leaves a 6 px thick ring
        label[k][outer] = 1
        label[k][inner] = 2
    g = grid_to_spacing(shape, (1.0, 1.0), (1.25, 1.25))
    back = _round_trip(label, g)
    assert not np.array_equal(back, label)  # honest: coarser grids are not invertible
    assert _dice(back > 0, label > 0) > 0.98
    assert _dice(back == 1, label == 1) > 0.93
    # For t <= 2 s every voxel takes the value of itself or one of its 8 neighbours, so all
    # errors sit on label boundaries.
    fp = np.zeros((1, 3, 3), bool)
    fp[0] = True
    for k in (0, 1, 2):
        near_k = ndimage.binary_dilation(label == k, structure=fp)
        assert not np.any((back == k) & ~near_k)


def test_resampling_leaves_the_slice_axis_alone() -> None:
    vol = np.stack([np.full((40, 30), v, np.float32) for v in (0.0, 100.0, -50.0)])
    g = grid_to_spacing((40, 30), (1.5, 1.5), (1.0, 1.0))
    out = resample_inplane(vol, g, sitk.sitkBSpline)
    assert out.shape == (3, 60, 45)
    for k, v in enumerate((0.0, 100.0, -50.0)):
        np.testing.assert_allclose(out[k], v, atol=1e-3)


def test_resample_rejects_a_wrong_shape() -> None:
    g = grid_to_spacing((40, 30), (1.5, 1.5), (1.0, 1.0))
    with pytest.raises(DataError, match="does not match"):
        resample_inplane(np.zeros((1, 41, 30), np.uint8), g, NN)


@pytest.mark.parametrize("shape,out_shape", [((37, 52), (64, 64)), ((64, 64), (96, 80))])
def test_grid_to_shape_resize_up_is_exact(shape, out_shape) -> None:
    g = grid_to_shape(shape, (1.0, 1.0), out_shape)
    assert g.out_shape_yx == out_shape
    assert g.out_spacing_xy[0] * out_shape[1] == pytest.approx(shape[1])
    label = _blobs((1,) + shape, radius=8.0)
    assert np.array_equal(_round_trip(label, g), label)


@pytest.mark.parametrize("size", [7, 8, 64, 65])
@pytest.mark.parametrize("centre", [10.0, 10.5, 33.2, -3.0])
def test_crop_start_centres_within_half_a_voxel(size, centre) -> None:
    (start, _) = crop_start((centre, centre), (size, size))
    assert abs(start + (size - 1) / 2 - centre) <= 0.5


@pytest.mark.parametrize("start", [(-5, 3), (4, -7), (0, 0), (10, 12), (-20, -20)])
def test_crop_or_pad_and_uncrop_are_inverse(start) -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(1, 9, size=(2, 31, 40)).astype(np.uint8)
    size = (33, 36)
    win = crop_or_pad(a, start, size, 0)
    assert win.shape == (2,) + size
    back = uncrop(win, start, a.shape[1:], 0)
    inside = np.zeros(a.shape[1:], bool)
    inside[max(start[0], 0) : start[0] + size[0], max(start[1], 0) : start[1] + size[1]] = True
    assert np.array_equal(back[:, inside], a[:, inside])
    assert not back[:, ~inside].any()
    if start == (-20, -20):
        assert (win[:, :20, :] == 0).all()


def test_centroid_and_bbox_centre() -> None:
    m = np.zeros((3, 20, 30), np.uint8)
    assert foreground_centroid_yx(m) is None and bbox_centre_yx(m) is None
    m[1, 4:9, 10:21] = 2
    assert foreground_centroid_yx(m) == pytest.approx((6.0, 15.0))
    assert bbox_centre_yx(m > 0) == pytest.approx((6.0, 15.0))


def test_shifted_origin_matches_sitk_with_an_oblique_direction() -> None:
    rot = sitk.VersorTransform((0.3, -0.5, 0.8), 0.7).GetMatrix()
    spacing, origin = (1.3, 0.9, 8.0), (10.0, -20.0, 35.5)
    img = to_sitk(np.zeros((4, 5, 6), np.float32), spacing, origin, rot)
    for idx in [(0, 0, 0), (5, 4, 3), (2, 1, 0), (-3, 7, 1)]:
        expected = img.TransformIndexToPhysicalPoint(idx) if min(idx) >= 0 else None
        got = shifted_origin(origin, rot, tuple(i * s for i, s in zip(idx, spacing)))
        if expected is None:
            expected = img.TransformContinuousIndexToPhysicalPoint(tuple(float(i) for i in idx))
        assert got == pytest.approx(expected, abs=1e-9)
    arr, sp, org, d = from_sitk(img)
    assert arr.shape == (4, 5, 6) and sp == pytest.approx(spacing) and org == pytest.approx(origin)
    assert d == pytest.approx(rot)
    assert math.isclose(np.linalg.det(np.reshape(d, (3, 3))), 1.0, abs_tol=1e-9)
