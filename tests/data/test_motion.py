"""k-space respiratory motion: identity at level 0, growing error, ghosts along phase encoding."""
from __future__ import annotations

import numpy as np
import pytest

from robustseg.data.motion import (
    MOTION_LEVELS,
    motion_amplitude,
    respiratory_trace,
    simulate_respiratory_motion,
)


def _disk_volume(n_slices: int = 6, size: int = 128, radius: int = 14) -> np.ndarray:
    """A bright disk in the middle of an empty field of view, repeated over slices."""
    yy, xx = np.mgrid[:size, :size]
    disk = ((yy - size // 2) ** 2 + (xx - size // 2) ** 2 < radius**2).astype(np.float32) * 100.0
    return np.repeat(disk[None], n_slices, axis=0)


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def test_level_zero_is_identity_and_draws_nothing() -> None:
    img = _disk_volume()
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out = simulate_respiratory_motion(img, 0, rng)
    assert out is img
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_shape_dtype_and_values(dtype: type) -> None:
    img = _disk_volume(3).astype(dtype)
    out = simulate_respiratory_motion(img, 2, np.random.default_rng(1))
    assert out.shape == img.shape
    assert out.dtype == (np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.float32)
    assert np.all(np.isfinite(out)) and out.min() >= 0.0
    assert not np.array_equal(out, img.astype(out.dtype))


def test_two_dimensional_input() -> None:
    img = _disk_volume(1)[0]
    out = simulate_respiratory_motion(img, 1, np.random.default_rng(0))
    assert out.shape == img.shape


def test_deterministic_under_seed() -> None:
    img = _disk_volume(4)
    a = simulate_respiratory_motion(img, 3, np.random.default_rng(7))
    b = simulate_respiratory_motion(img, 3, np.random.default_rng(7))
    c = simulate_respiratory_motion(img, 3, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_error_grows_with_level() -> None:
    img = _disk_volume(12)
    errors = [_rms(simulate_respiratory_motion(img, lvl, np.random.default_rng(3)), img) for lvl in MOTION_LEVELS]
    assert errors[0] == 0.0
    assert errors[0] < errors[1] < errors[2] < errors[3]


def _ghost_energy(diff: np.ndarray, lo: int = 44, hi: int = 84) -> "tuple[float, float]":
    """Difference energy far from the disk along Y (same columns) and along X (same rows)."""
    outside = np.r_[0:lo - 4, hi + 4:diff.shape[-1]]
    along_y = float((diff[:, :, lo:hi][:, outside] ** 2).sum())
    along_x = float((diff[:, lo:hi][:, :, outside] ** 2).sum())
    return along_y, along_x


@pytest.mark.parametrize("phase_axis", [-2, -1])
def test_ghosts_lie_along_the_phase_encoding_axis(phase_axis: int) -> None:
    img = _disk_volume(4)
    diff = simulate_respiratory_motion(img, 3, np.random.default_rng(5), phase_axis=phase_axis) - img
    along_y, along_x = _ghost_energy(diff)
    if phase_axis == -2:
        assert along_y > 20 * along_x
    else:
        assert along_x > 20 * along_y


def test_object_stays_registered_with_the_label() -> None:
    # The trace is centred on the k-space centre, so the object does not drift away from
    # the motion-free label it is paired with.
    img = _disk_volume(6)
    out = simulate_respiratory_motion(img, 3, np.random.default_rng(11))
    yy, xx = np.mgrid[: img.shape[1], : img.shape[2]]
    for z in range(img.shape[0]):
        w = out[z] / out[z].sum()
        assert abs(float((w * yy).sum()) - 63.5) < 2.5
        assert abs(float((w * xx).sum()) - 63.5) < 2.5


def test_bad_arguments_raise() -> None:
    img = _disk_volume(1)
    with pytest.raises(ValueError, match="motion level"):
        simulate_respiratory_motion(img, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="phase_axis"):
        simulate_respiratory_motion(img, 1, np.random.default_rng(0), phase_axis=0)
    with pytest.raises(ValueError, match="motion level"):
        motion_amplitude(-1)


def test_amplitudes_and_traces_grow_with_level() -> None:
    amps = [motion_amplitude(lvl) for lvl in MOTION_LEVELS]
    assert amps[0] == 0.0 and amps == sorted(amps) and len(set(amps)) == 4
    assert np.array_equal(respiratory_trace(64, 0, np.random.default_rng(0), n_traces=3), np.zeros((3, 64)))
    spans = []
    for lvl in (1, 2, 3):
        tr = respiratory_trace(128, lvl, np.random.default_rng(0), n_traces=32)
        assert tr.shape == (32, 128)
        spans.append(float(np.mean(tr.max(axis=1) - tr.min(axis=1))))
    assert spans[0] < spans[1] < spans[2]
