"""Sliding-window inference, mirror TTA and ensembles on tiny CPU models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustseg.engine.inference import (
    gaussian_importance,
    predict_ensemble,
    predict_volume,
    probabilities_to_labels,
    sliding_window_2d,
    sliding_window_3d,
    window_starts,
)

C = 3


def tiny2d(seed: int = 0, symmetric: bool = False) -> nn.Module:
    """Two 3x3 convs; with symmetric kernels the model commutes with x/y flips."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, C, 3, padding=1))
    if symmetric:
        with torch.no_grad():
            for conv in (m[0], m[2]):
                w = conv.weight
                w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
    return m


def whole_image(model: nn.Module, img: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model.eval()(img[:, None]), 1).permute(1, 0, 2, 3)


class CountCalls(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.items = inner, 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.items += x.shape[0]
        return self.inner(x)


class NeedsMultipleOf8(nn.Module):
    """A pooling encoder-decoder that only accepts sizes divisible by 8."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(8))
        self.dec = nn.Sequential(nn.Upsample(scale_factor=8), nn.Conv2d(4, C, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0, x.shape
        return self.dec(self.enc(x))


class DeepSupervision(nn.Module):
    """Returns [full-resolution, half-resolution] outputs like nnU-Net in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny2d()

    def forward(self, x: torch.Tensor):
        y = self.net(x)
        return [y, y[..., ::2, ::2]]


@pytest.fixture
def img() -> torch.Tensor:
    return torch.randn(4, 24, 20, generator=torch.Generator().manual_seed(1))


def test_window_starts_cover_the_axis() -> None:
    assert window_starts(10, 16, 0.5) == [0]
    s = window_starts(50, 16, 0.5)
    assert s[0] == 0 and s[-1] == 34 and all(b - a <= 8 for a, b in zip(s, s[1:]))
    assert window_starts(32, 16, 0.0) == [0, 16]


def test_gaussian_is_symmetric_positive_and_peaks_at_one() -> None:
    g = gaussian_importance((8, 7))
    assert g.shape == (8, 7) and float(g.max()) == pytest.approx(1.0) and float(g.min()) > 0
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(1))


def test_probabilities_sum_to_one_with_overlapping_windows(img) -> None:
    probs = sliding_window_2d(tiny2d(), img, C, patch_size=(16, 16), overlap=0.5)
    assert probs.shape == (C, 4, 24, 20) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(0), torch.ones(4, 24, 20), atol=1e-5)
    labels = probabilities_to_labels(probs)
    assert labels.shape == (4, 24, 20) and labels.dtype == np.uint8


@pytest.mark.parametrize("patch", [None, (24, 20)])
def test_one_window_equals_a_whole_image_forward(img, patch) -> None:
    model = tiny2d()
    probs = sliding_window_2d(model, img, C, patch_size=patch, gaussian=True)
    assert torch.allclose(probs, whole_image(model, img), atol=1e-5)


def test_overlap_aggregation_is_a_normalised_average() -> None:
    # A 1x1 conv sees no context, so any window layout must reproduce the whole image.
    torch.manual_seed(0)
    model = nn.Conv2d(1, C, 1)
    img = torch.randn(3, 37, 29)
    for gaussian in (True, False):
        probs = sliding_window_2d(model, img, C, patch_size=(16, 12), overlap=0.6, gaussian=gaussian)
        assert torch.allclose(probs, whole_image(model, img), atol=1e-5)


def test_small_image_not_divisible_returns_original_size() -> None:
    img = torch.randn(2, 13, 11)
    probs = sliding_window_2d(NeedsMultipleOf8(), img, C, patch_size=(16, 16), divisible_by=8)
    assert probs.shape == (C, 2, 13, 11)
    assert torch.allclose(probs.sum(0), torch.ones(2, 13, 11), atol=1e-5)
    probs = sliding_window_2d(NeedsMultipleOf8(), img, C, patch_size=None, divisible_by=8)
    assert probs.shape == (C, 2, 13, 11)


def test_tta_of_flip_equivariant_model_equals_no_tta(img) -> None:
    model = tiny2d(symmetric=True)
    kw = dict(spatial_dims=2, num_classes=C, patch_size=(16, 16), overlap=0.5, gaussian=True, batch_size=8, divisible_by=1)
    with_tta = predict_volume(model, img, tta=True, **kw)
    without = predict_volume(model, img, tta=False, **kw)
    assert torch.allclose(with_tta, without, atol=1e-5)


def test_tta_of_non_equivariant_model_differs(img) -> None:
    model = tiny2d(seed=3)
    kw = dict(spatial_dims=2, num_classes=C, patch_size=None, overlap=0.5, gaussian=True, batch_size=8, divisible_by=1)
    with_tta = predict_volume(model, img, tta=True, **kw)
    without = predict_volume(model, img, tta=False, **kw)
    assert float((with_tta - without).abs().max()) > 1e-3
    # By hand: the average of the four mirrored whole-image predictions.
    # Image (Z, Y, X) and output (C, Z, Y, X) share their last two axes.
    ref = whole_image(model, img)
    for d in [(-1,), (-2,), (-2, -1)]:
        ref = ref + whole_image(model, img.flip(d)).flip(d)
    ref = ref / 4
    assert torch.allclose(with_tta, ref, atol=1e-5)


def test_slices_and_flips_share_forward_passes(img) -> None:
    model = CountCalls(tiny2d())
    predict_volume(model, img, spatial_dims=2, num_classes=C, patch_size=None, tta=True, batch_size=32)
    assert model.calls == 1 and model.items == 4 * 4  # 4 slices x 4 mirrorings in one launch
    model = CountCalls(tiny2d())
    predict_volume(model, img, spatial_dims=2, num_classes=C, patch_size=None, tta=True, batch_size=8)
    assert model.calls == 2
    model = CountCalls(tiny2d())  # batch_size below the 4 mirror copies: still respected
    predict_volume(model, img, spatial_dims=2, num_classes=C, patch_size=None, tta=True, batch_size=3)
    assert model.calls == 4 * 2 and model.items == 16


def test_list_output_and_training_mode_restored(img) -> None:
    model = DeepSupervision().train()
    probs = sliding_window_2d(model, img, C, patch_size=(16, 16))
    assert probs.shape == (C, 4, 24, 20)
    assert model.training  # restored for the training loop


def test_result_is_an_ordinary_tensor(img) -> None:
    probs = sliding_window_2d(tiny2d(), img, C)
    probs /= 2  # would raise on an inference-mode tensor
    assert not probs.requires_grad


def test_ensemble_averages_members(img) -> None:
    m1, m2 = tiny2d(1), tiny2d(2)
    kw = dict(spatial_dims=2, num_classes=C, patch_size=(16, 16), overlap=0.5, gaussian=True, tta=True, batch_size=16)
    ens = predict_ensemble([m1, m2], img, **kw)
    ref = (predict_volume(m1, img, **kw) + predict_volume(m2, img, **kw)) / 2
    assert torch.allclose(ens, ref, atol=1e-5)


def test_3d_path_shapes_and_numpy_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, C, 1))
    vol = np.random.default_rng(0).normal(size=(7, 18, 15)).astype(np.float32)
    probs = predict_volume(model, vol, spatial_dims=3, num_classes=C, patch_size=(4, 8, 8), overlap=0.5, tta=True,
                           batch_size=16, divisible_by=4)
    assert probs.shape == (C, 7, 18, 15)
    assert torch.allclose(probs.sum(0), torch.ones(7, 18, 15), atol=1e-5)
    whole = sliding_window_3d(model, vol, C, patch_size=None)
    assert whole.shape == (C, 7, 18, 15)


def test_3d_pointwise_model_is_layout_invariant() -> None:
    torch.manual_seed(0)
    model = nn.Conv3d(1, C, 1)
    vol = torch.randn(9, 12, 10)
    a = sliding_window_3d(model, vol, C, patch_size=(4, 8, 8), overlap=0.25)
    b = sliding_window_3d(model, vol, C, patch_size=None)
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_2d(tiny2d(), torch.randn(2, 8, 8), C, patch_size=(4, 4, 4))
    with pytest.raises(ValueError, match="spatial_dims"):
        predict_volume(tiny2d(), torch.randn(2, 8, 8), spatial_dims=4, num_classes=C)
    with pytest.raises(ValueError, match="classes"):
        sliding_window_2d(tiny2d(), torch.randn(2, 8, 8), C + 1)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        sliding_window_2d(tiny2d(), torch.randn(8, 8), C)


def test_model_on_another_device_is_a_clear_error() -> None:
    model = tiny2d().to("meta")
    with pytest.raises(ValueError, match="model is on meta"):
        sliding_window_2d(model, torch.randn(2, 8, 8), C)


class Bf16Logits(nn.Module):
    """Returns bf16 logits, as a model under CUDA autocast does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(torch.bfloat16)


def test_weighted_ensemble_is_the_normalised_weighted_mean(img) -> None:
    members = [tiny2d(1), tiny2d(2), tiny2d(3)]
    kw = dict(spatial_dims=2, num_classes=C, patch_size=(16, 16), overlap=0.5, gaussian=True, tta=True, batch_size=12)
    singles = [predict_volume(m, img, **kw) for m in members]
    ens = predict_ensemble(members, img, weights=[1.0, 3.0, 0.5], **kw)
    ref = (1.0 * singles[0] + 3.0 * singles[1] + 0.5 * singles[2]) / 4.5
    assert torch.allclose(ens, ref, atol=1e-5)
    assert torch.allclose(ens.sum(0), torch.ones(4, 24, 20), atol=1e-5)


def test_zero_weight_member_is_not_run(img) -> None:
    skipped, used = CountCalls(tiny2d(1)), tiny2d(2)
    kw = dict(spatial_dims=2, num_classes=C, patch_size=None, tta=True, batch_size=8)
    ens = predict_volume([skipped, used], img, weights=[0.0, 2.0], **kw)
    assert skipped.calls == 0
    assert torch.allclose(ens, predict_volume(used, img, **kw), atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        predict_volume([skipped, used], img, weights=[0.0, 0.0], **kw)


@pytest.mark.parametrize("tta", [True, False])
def test_any_batch_size_gives_the_same_result(img, tta) -> None:
    # Chunks that start and end mid-position (several images, several window positions)
    # must be cut and pasted back exactly like one window at a time.
    models = [tiny2d(1), tiny2d(2)]
    kw = dict(spatial_dims=2, num_classes=C, patch_size=(16, 12), overlap=0.5, gaussian=True, tta=tta)
    ref = predict_volume(models, img, batch_size=1, **kw)
    for bs in (3, 5, 7, 13, 64, 1000):
        assert torch.allclose(predict_volume(models, img, batch_size=bs, **kw), ref, atol=1e-6), bs


def test_whole_slice_windows_match_the_by_hand_ensemble(img) -> None:
    # The single-window path skips the Gaussian weight and its normaliser (they cancel).
    m1, m2 = tiny2d(4), tiny2d(5)
    flips = [(), (-1,), (-2,), (-2, -1)]
    ref = sum(whole_image(m, img.flip(d) if d else img).flip(d) if d else whole_image(m, img)
              for m in (m1, m2) for d in flips) / 8
    for gaussian in (True, False):
        probs = predict_volume([m1, m2], img, spatial_dims=2, num_classes=C, patch_size=None, gaussian=gaussian,
                               tta=True, batch_size=5)
        assert torch.allclose(probs, ref, atol=1e-5)


def test_amp_on_cpu_is_bf16_autocast_when_asked(img) -> None:
    # Callers ask for it only where it pays (robustseg.engine.precision); asked, it runs.
    model = tiny2d()
    a = sliding_window_2d(model, img, C, patch_size=(16, 16), tta=True, amp=True)
    b = sliding_window_2d(model, img, C, patch_size=(16, 16), tta=True, amp=False)
    assert a.dtype == torch.float32 and not torch.equal(a, b) and torch.allclose(a, b, atol=5e-2)


def test_bf16_logits_give_float32_probabilities(img) -> None:
    inner = tiny2d()
    probs = sliding_window_2d(Bf16Logits(inner), img, C, patch_size=None, tta=True)
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(0), torch.ones(4, 24, 20), atol=1e-5)
    assert torch.allclose(probs, sliding_window_2d(inner, img, C, patch_size=None, tta=True), atol=2e-2)


def test_3d_ensemble_tta_with_small_batches_matches_the_mean_of_members() -> None:
    # 8 mirror copies per window with batch_size 3: each window's copies span several passes.
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, C, 1)) for _ in range(2)]
    vol = torch.randn(6, 10, 9)
    kw = dict(spatial_dims=3, num_classes=C, patch_size=(4, 8, 8), overlap=0.5, tta=True, batch_size=3)
    ens = predict_ensemble(members, vol, **kw)
    ref = (predict_volume(members[0], vol, **kw) + predict_volume(members[1], vol, **kw)) / 2
    assert torch.allclose(ens, ref, atol=1e-5)
    assert torch.allclose(ens, predict_ensemble(members, vol, **{**kw, "batch_size": 16}), atol=1e-6)
