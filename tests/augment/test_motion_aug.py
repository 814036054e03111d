"""Torch k-space respiratory motion: identity at level 0, determinism, ghosting along the
phase-encoding axis, severity, agreement with the numpy simulator, and the Augmenter hook."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import robustseg.augment.intensity as intensity
from robustseg.augment import build_augmenter, motion_augment
from robustseg.augment.motion import motion_trace, simulate_motion
from robustseg.config import AugmentConfig
from robustseg.data.motion import motion_amplitude, respiratory_trace, simulate_respiratory_motion
from robustseg.data.synthetic import make_cardiac_dataset
from robustseg.errors import ConfigError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _square(n: int = 8, size: int = 64) -> torch.Tensor:
    """A bright square on a dark background, (n, 1, size, size), non-negative like MR magnitude."""
    x = torch.full((n, 1, size, size), 0.05)
    lo, hi = size * 3 // 8, size * 5 // 8
    x[:, :, lo:hi, lo:hi] = 1.0
    return x


@pytest.fixture(scope="module")
def cardiac() -> np.ndarray:
    """A synthetic short-axis stack (Z, 128, 128), the numpy simulator's usual input."""
    return make_cardiac_dataset(1, seed=0)[0].image.astype(np.float32)


def test_level_zero_and_p_zero_are_identity_and_p_zero_draws_nothing():
    x = torch.randn(4, 1, 32, 48)
    assert torch.equal(simulate_motion(x, 0, _gen(0)), x)
    g = _gen(1)
    before = g.get_state()
    out, level = motion_augment(x, g, p=0.0, return_levels=True)
    assert torch.equal(out, x) and out is not x and not level.any()
    assert torch.equal(g.get_state(), before)  # switching motion off changes no other draw
    assert torch.equal(motion_augment(x, _gen(2), p=1.0, levels=[0]), x)
    mixed = simulate_motion(x, [0, 2, 0, 3], _gen(3))
    assert torch.equal(mixed[[0, 2]], x[[0, 2]]) and not torch.equal(mixed[1], x[1])


@pytest.mark.parametrize("shape", [(6, 1, 32, 40), (3, 1, 4, 32, 32)])
def test_deterministic_per_seed(shape):
    x = torch.rand(shape, generator=_gen(0))
    a = motion_augment(x, _gen(5), p=0.7, levels=[1, 2, 3])
    b = motion_augment(x, _gen(5), p=0.7, levels=[1, 2, 3])
    c = motion_augment(x, _gen(6), p=0.7, levels=[1, 2, 3])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()


@pytest.mark.parametrize("axis", [-2, -1])
def test_ghosts_spread_along_the_phase_encoding_axis(axis):
    x = _square()
    diff = (simulate_motion(x, 3, _gen(0), phase_axis=axis) - x).abs().mean(dim=(0, 1))  # (H, W)
    # Away from the object: same columns, far rows (along Y) vs same rows, far columns (along X).
    along_y = torch.cat([diff[:12, 24:40], diff[52:, 24:40]]).mean()
    along_x = torch.cat([diff[24:40, :12], diff[24:40, 52:]], dim=1).mean()
    along_pe, along_ro = (along_y, along_x) if axis == -2 else (along_x, along_y)
    assert along_pe > 4 * along_ro, (float(along_pe), float(along_ro))
    assert along_pe > 0.01  # visible ghosts, not rounding


def test_severity_grows_with_level():
    x = _square(16)
    change = [float((simulate_motion(x, lv, _gen(1)) - x).abs().mean()) for lv in (0, 1, 2, 3)]
    assert change[0] == 0.0 and change[1] < change[2] < change[3], change


def test_same_amplitude_scale_as_the_numpy_simulator(cardiac):
    for level in (1, 2, 3):
        ptp_np = np.ptp(respiratory_trace(128, level, np.random.default_rng(0), n_traces=400), axis=1).mean()
        tr = motion_trace(128, [level] * 400, _gen(0))
        ptp_torch = float((tr.amax(1) - tr.amin(1)).mean())
        assert ptp_torch == pytest.approx(ptp_np, rel=0.15), level
        assert motion_amplitude(level) <= 1.7 * ptp_torch  # the nominal excursion, with irregular depth
        img = torch.from_numpy(cardiac)[:, None]
        d_np = np.mean([np.abs(simulate_respiratory_motion(cardiac, level, np.random.default_rng(s)) - cardiac).mean()
                        for s in range(4)])
        d_torch = np.mean([float((simulate_motion(img, level, _gen(s)) - img).abs().mean()) for s in range(4)])
        assert d_torch == pytest.approx(d_np, rel=0.25), level
    assert not motion_trace(64, [0, 0], _gen(0)).any()


def test_z_scored_images_stay_normalised():
    img = torch.from_numpy(make_cardiac_dataset(1, seed=1)[0].image.astype(np.float32))[:, None]
    z = (img - img.mean()) / img.std()
    out = simulate_motion(z, 3, _gen(0))
    # Shift to non-negative, magnitude, shift back: never below the image's own minimum.
    assert (out.amin(dim=(-2, -1)) >= z.amin(dim=(-2, -1)) - 1e-4).all()
    assert abs(float(out.mean() - z.mean())) < 0.1 and 0.8 < float(out.std() / z.std()) < 1.2
    assert (simulate_motion(img, 2, _gen(0)) >= -1e-4).all()  # magnitude images stay non-negative


def test_3d_volumes_get_one_trace_per_slice():
    vol = _square(2)[:, :, None].repeat(1, 1, 4, 1, 1)  # (2, 1, 4, 64, 64), identical slices
    out = simulate_motion(vol, [2, 0], _gen(0))
    assert torch.equal(out[1], vol[1])
    slices = out[0, 0]
    assert not torch.allclose(slices[0], slices[1]) and not torch.allclose(slices[2], slices[3])
    assert simulate_motion(vol.half(), 2, _gen(0)).dtype == torch.float16


def test_random_phase_axis_mixes_rows_and_columns_on_non_square_images():
    x = torch.rand(32, 1, 40, 56, generator=_gen(0))
    out = simulate_motion(x, 3, _gen(1), phase_axis="random")
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="phase_axis"):
        simulate_motion(x, 1, _gen(0), phase_axis=0)
    with pytest.raises(ValueError, match="CMRxMotion"):
        simulate_motion(x, 4, _gen(0))
    with pytest.raises(ValueError, match="floating point"):
        motion_augment(x.long(), _gen(0))


def test_blend_mode_matches_subset_mode(monkeypatch):
    x = torch.rand(12, 1, 32, 32, generator=_gen(0))
    monkeypatch.setattr(intensity, "SYNC_FREE", False)
    a, la = motion_augment(x, _gen(4), p=0.5, return_levels=True)
    monkeypatch.setattr(intensity, "SYNC_FREE", True)
    b, lb = motion_augment(x, _gen(4), p=0.5, return_levels=True)
    assert torch.equal(la, lb) and (la > 0).any() and (la == 0).any()
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(a[la == 0], x[la == 0])


def test_augmenter_runs_motion_from_config():
    x, label = _square(6), torch.zeros(6, 1, 64, 64, dtype=torch.long)
    assert build_augmenter(AugmentConfig(), 2).params["motion"] == {"p": 0.0, "levels": [1, 2, 3],
                                                                   "phase_axis": "random"}
    aug = build_augmenter(AugmentConfig(preset="none", params={"motion": {"p": 1.0, "levels": [2]}}), 2)
    out, lab, info = aug(x, label, _gen(7), return_info=True)
    assert info["motion"].all() and torch.equal(lab, label)
    # Motion runs first and every other transform is off: exactly `motion_augment`'s draws.
    assert torch.equal(out, motion_augment(x, _gen(7), p=1.0, levels=[2]))
    with pytest.raises(ConfigError, match=r"augment\.params\.motion\.levels"):
        build_augmenter(AugmentConfig(params={"motion": {"levels": [5]}}), 2)
    with pytest.raises(ConfigError, match=r"augment\.params\.motion\.phase_axis"):
        build_augmenter(AugmentConfig(params={"motion": {"phase_axis": "z"}}), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_runs_on_cuda_like_on_cpu():
    x = _square(4)
    g_cpu, g_gpu = _gen(0), torch.Generator(device="cuda").manual_seed(0)
    out = motion_augment(x.cuda(), g_gpu, p=1.0, levels=[3])
    assert out.is_cuda and torch.isfinite(out).all()
    cpu = motion_augment(x, g_cpu, p=1.0, levels=[3])
    assert float((out.cpu() - x).abs().mean()) == pytest.approx(float((cpu - x).abs().mean()), rel=0.5)


def test_slice_channels_get_their_own_breath_hold():
    """2.5D: three copies of one slice as channels come out of the motion step different (one
    breathing trace per slice, as a cine stack is acquired) but at one level per sample;
    as modalities they share the acquisition and stay identical."""
    params = {"motion": {"p": 1.0, "levels": [3]}}
    copies = torch.randn(4, 1, 48, 48, generator=torch.Generator().manual_seed(0)).repeat(1, 3, 1, 1)
    label = torch.zeros(4, 1, 48, 48, dtype=torch.long)
    cfg = AugmentConfig(preset="none", params=params)
    out, _, info = build_augmenter(cfg, 2, slice_channels=True)(copies, label, torch.Generator().manual_seed(1),
                                                               return_info=True)
    assert info["motion"].all()
    for i in range(4):
        assert not torch.allclose(out[i, 0], out[i, 1]) and not torch.allclose(out[i, 1], out[i, 2])
    shared, _ = build_augmenter(cfg, 2)(copies, label, torch.Generator().manual_seed(1))
    assert torch.equal(shared[:, 0], shared[:, 1]) and torch.equal(shared[:, 1], shared[:, 2])
