"""Intensity augmentation: each transform against a reference, probabilities, statistics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustseg.augment import build_augmenter
from robustseg.augment.intensity import around_one
from robustseg.config import AugmentConfig

INTENSITY = ["noise", "blur", "brightness", "contrast", "lowres", "inverted_gamma", "gamma"]


def _only(name: str, dims: int = 2, **keys):
    """An augmenter doing just ``name`` on every sample (and every channel)."""
    cfg = {"p": 1.0, **keys}
    if name in ("blur", "lowres"):
        cfg.setdefault("p_per_channel", 1.0)
    return build_augmenter(AugmentConfig(preset="none", params={name: cfg}), dims)


def _smooth_images(b: int = 8, c: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Z-scored, smooth-ish images (low-res noise upsampled) with a bright disk."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.randn(b, c, 8, 8, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = x + 3.0 * (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2)
    return (x - x.mean(dim=(2, 3), keepdim=True)) / x.std(dim=(2, 3), keepdim=True)


def _labels(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :1] > 0.5).to(torch.uint8)


@pytest.mark.parametrize("name", INTENSITY)
def test_each_transform_changes_image_only(name):
    x = _smooth_images()
    y = _labels(x)
    out, lab, info = _only(name)(x, y, torch.Generator().manual_seed(1), return_info=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert lab is y or torch.equal(lab, y)  # intensity transforms never touch labels
    assert info[name].all() and not torch.equal(out, x)


def test_noise_std_within_range():
    x = _smooth_images()
    out, _ = _only("noise", std=[0.0, 0.1])(x, _labels(x), torch.Generator().manual_seed(2))
    std = (out - x).std(dim=(1, 2, 3))
    assert (std < 0.11).all() and (std > 0).all()


def test_brightness_is_a_per_sample_factor_in_range():
    x = _smooth_images() + 5.0  # keep away from zero for the ratio
    out, _ = _only("brightness")(x, _labels(x), torch.Generator().manual_seed(3))
    ratio = out / x
    per_sample = ratio.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-5)
    assert (per_sample >= 0.75 - 1e-6).all() and (per_sample <= 1.25 + 1e-6).all()


def test_contrast_keeps_mean_and_range():
    x = _smooth_images()
    dims = (2, 3)
    out, _ = _only("contrast", preserve_range=False)(x, _labels(x), torch.Generator().manual_seed(4))
    assert torch.allclose(out.mean(dim=dims), x.mean(dim=dims), atol=1e-5)
    factor = out.std(dim=dims) / x.std(dim=dims)
    assert (factor >= 0.75 - 1e-4).all() and (factor <= 1.25 + 1e-4).all()
    kept, _ = _only("contrast")(x, _labels(x), torch.Generator().manual_seed(4))
    assert (kept.amin(dim=dims) >= x.amin(dim=dims) - 1e-6).all()
    assert (kept.amax(dim=dims) <= x.amax(dim=dims) + 1e-6).all()


def test_blur_matches_a_reference_gaussian():
    x = _smooth_images(4) + 0.3 * torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    out, _ = _only("blur", sigma=[1.0, 1.0])(x, _labels(x), torch.Generator().manual_seed(5))
    t = torch.arange(-3, 4, dtype=torch.float32)
    k1 = torch.exp(-0.5 * t ** 2)
    k1 = k1 / k1.sum()
    ref = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), (k1[:, None] * k1[None, :])[None, None])
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("zoom", [0.5, 0.37])
def test_lowres_matches_nearest_down_linear_up_2d(zoom):
    x = _smooth_images(3) + 0.3 * torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    out, _ = _only("lowres", zoom=[zoom, zoom])(x, _labels(x), torch.Generator().manual_seed(6))
    n = round(64 * zoom)
    ref = F.interpolate(F.interpolate(x, size=(n, n), mode="nearest-exact"), size=(64, 64), mode="bilinear",
                        align_corners=False)
    assert torch.allclose(out, ref, atol=1e-5)


def test_lowres_3d_leaves_slice_axis_by_default():
    x = torch.randn(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, 1, 8, 32, 32, dtype=torch.int64)
    out, _ = _only("lowres", dims=3, zoom=[0.5, 0.5])(x, y, torch.Generator().manual_seed(7))
    ref = F.interpolate(F.interpolate(x, size=(8, 16, 16), mode="nearest-exact"), size=(8, 32, 32),
                        mode="trilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("name", ["gamma", "inverted_gamma"])
def test_gamma_retains_mean_and_std(name):
    x = _smooth_images()
    out, _ = _only(name)(x, _labels(x), torch.Generator().manual_seed(8))
    dims = (2, 3)
    assert torch.allclose(out.mean(dim=dims), x.mean(dim=dims), atol=1e-4)
    assert torch.allclose(out.std(dim=dims), x.std(dim=dims), atol=1e-4)


def test_gamma_on_unit_range_is_a_power():
    x = torch.linspace(0, 1, 64).repeat(2, 1, 64, 1)
    out, _ = _only("gamma", gamma=[1.5, 1.5], retain_stats=False)(x, _labels(x), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x ** 1.5, atol=1e-6)


def test_around_one_is_balanced():
    f = around_one(0.7, 1.5, (20000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert f.min() >= 0.7 and f.max() <= 1.5
    assert abs(float((f < 1).float().mean()) - 0.5) < 0.02


def test_intensity_probabilities_are_respected():
    n = 3000
    x = torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(n, 1, 4, 4, dtype=torch.int64)
    aug = build_augmenter(AugmentConfig(preset="nnunet", params={
        "rotation": {"p": 0}, "scaling": {"p": 0}, "mirror": {"p": 0}}), 2)
    out, _, info = aug(x, y, torch.Generator().manual_seed(9), return_info=True)
    for name in INTENSITY:
        p = aug.params[name]["p"]
        frac = float(info[name].float().mean())
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n), (name, frac, p)
    # Blur touches a channel with p * p_per_channel = 0.2 * 0.5, and only chosen samples.
    only_blur = build_augmenter(AugmentConfig(preset="none", params={"blur": {"p": 0.2}}), 2)
    out, _, info = only_blur(x, y, torch.Generator().manual_seed(10), return_info=True)
    changed = (out != x).flatten(2).any(dim=2)
    assert not changed[~info["blur"]].any()
    frac = float(changed.float().mean())
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / (2 * n))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_preserved(dtype):
    x = _smooth_images(4).to(dtype)
    aug = build_augmenter(AugmentConfig(preset="nnunet", params={name: {"p": 1.0} for name in INTENSITY}), 2)
    out, lab = aug(x, _labels(x.float()), torch.Generator().manual_seed(0))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", INTENSITY)
def test_each_transform_in_3d(name):
    x = torch.randn(2, 2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, 1, 8, 16, 16, dtype=torch.uint8)
    out, lab = _only(name, dims=3)(x, y, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, x)
    assert torch.equal(lab, y)


@pytest.mark.parametrize("name", [n for n in INTENSITY if n != "noise"])
def test_slice_channels_share_each_intensity_draw(name):
    """2.5D: the channels are neighbouring slices of one acquisition, so every intensity
    transform must treat three copies of one slice identically (nnU-Net's per-channel draws
    would make them differ); as modalities (the default), the same copies come out different."""
    cfg = {"p": 1.0, "p_per_channel": 0.5} if name in ("blur", "lowres") else {"p": 1.0}
    copies = _smooth_images(b=16).repeat(1, 3, 1, 1)
    y = _labels(copies)
    shared = build_augmenter(AugmentConfig(preset="none", params={name: cfg}), 2, slice_channels=True)
    out, _ = shared(copies, y, torch.Generator().manual_seed(7))
    assert not torch.equal(out, copies)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 2], out[:, 1])
    modalities = build_augmenter(AugmentConfig(preset="none", params={name: cfg}), 2)
    out, _ = modalities(copies, y, torch.Generator().manual_seed(7))
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_slice_channels_leave_single_channel_draws_unchanged():
    """The flag changes nothing for one channel: same draws, bit-identical batches."""
    x = _smooth_images()
    cfg = AugmentConfig(preset="nnunet")
    a, _ = build_augmenter(cfg, 2)(x, _labels(x), torch.Generator().manual_seed(3))
    b, _ = build_augmenter(cfg, 2, slice_channels=True)(x, _labels(x), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
