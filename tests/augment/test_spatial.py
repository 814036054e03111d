"""Spatial augmentation: label/image alignment, exact geometry of rotations and flips."""
from __future__ import annotations

import math

import pytest
import torch

from robustseg.augment import build_augmenter
from robustseg.augment.spatial import source_margin
from robustseg.config import AugmentConfig


def _augmenter(params: dict, dims: int = 2):
    return build_augmenter(AugmentConfig(preset="none", params=params), dims)


def _disks(b: int = 8, size: int = 64) -> torch.Tensor:
    """(B, 1, size, size) int64 labels: a disk (1) with an off-centre inner disk (2)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(b, 1, size, size, dtype=torch.int64)
    for i in range(b):
        cy, cx = 22 + 2 * i, 26 + i
        out[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = 1
        out[i, 0][(yy - cy - 3) ** 2 + (xx - cx + 2) ** 2 <= 16] = 2
    return out


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    """(B, nd) centroid of a (B, 1, *S) boolean mask, in pixels, tensor-axis order."""
    nd = mask.ndim - 2
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in mask.shape[2:]], indexing="ij")
    m = mask[:, 0].double()
    total = m.flatten(1).sum(1)
    return torch.stack([(m * g).flatten(1).sum(1) / total for g in grids], dim=1).reshape(-1, nd)


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return inter / union


def test_image_and_label_stay_aligned_through_rotation_scaling_elastic():
    label = _disks()
    image = label.float()  # intensity encodes the label
    aug = _augmenter({"rotation": {"p": 1, "degrees": 40}, "scaling": {"p": 1, "range": [0.8, 1.25]},
                      "elastic": {"p": 1, "max_displacement": [1, 3]}})
    img, lab = aug(image, label, torch.Generator().manual_seed(3))

    assert set(lab.unique().tolist()) <= {0, 1, 2}  # nearest: no new label values
    fg_img, fg_lab = img > 0.5, lab > 0
    assert _iou(fg_img, fg_lab).min() > 0.95
    assert _iou(img > 1.5, lab == 2).min() > 0.8
    moved = (_centroid(fg_lab) - _centroid(label > 0)).norm(dim=1)
    assert moved.max() > 2.0  # the transform did move the shapes...
    assert (_centroid(fg_img) - _centroid(fg_lab)).norm(dim=1).max() < 0.5  # ...identically


def test_fixed_90_degree_rotation_turns_counter_clockwise():
    label = _disks(4)
    aug = _augmenter({"rotation": {"p": 1, "degrees": [90, 90]}})
    img, lab = aug(label.float(), label, torch.Generator().manual_seed(0))
    c = (64 - 1) / 2
    before = _centroid(label == 2) - c
    after = _centroid(lab == 2) - c
    # (row, col) offset (dr, dc) -> (-dc, dr): content right of centre moves to the top.
    expected = torch.stack([-before[:, 1], before[:, 0]], dim=1)
    assert torch.allclose(after, expected, atol=0.5)
    # On this grid a quarter turn maps pixel centres onto pixel centres: it is rot90.
    assert (lab != torch.rot90(label, 1, dims=(2, 3))).float().mean() < 1e-3
    assert torch.allclose(_centroid(img > 1.5), _centroid(lab == 2), atol=0.5)


def test_3d_rotation_is_in_plane_and_keeps_slices():
    label = torch.zeros(2, 1, 8, 32, 32, dtype=torch.uint8)
    label[:, :, 2:6, 6:14, 18:26] = 1
    aug = _augmenter({"rotation": {"p": 1, "degrees": [90, 90]}}, dims=3)
    img, lab = aug(label.float(), label, torch.Generator().manual_seed(0))
    assert img.shape == (2, 1, 8, 32, 32) and lab.dtype == torch.uint8
    assert torch.equal(lab, torch.rot90(label, 1, dims=(3, 4)))
    before, after = _centroid(label > 0), _centroid(lab > 0)
    assert torch.allclose(after[:, 0], before[:, 0])  # slice position untouched


def test_mirror_moves_centroid_to_mirrored_position_exactly():
    label = _disks(4)
    image = label.float() + 0.25
    aug = _augmenter({"mirror": {"p": 1, "axes": [1]}})
    img, lab = aug(image, label, torch.Generator().manual_seed(0))
    assert torch.equal(lab, label.flip(3)) and torch.equal(img, image.flip(3))
    before, after = _centroid(label > 0), _centroid(lab > 0)
    assert torch.allclose(after[:, 1], 63 - before[:, 1], atol=1e-9)
    assert torch.allclose(after[:, 0], before[:, 0], atol=1e-9)


def test_untouched_samples_are_bit_identical_and_info_matches():
    label = _disks(8)
    image = torch.randn(8, 1, 64, 64)
    aug = _augmenter({"rotation": {"p": 0.5, "degrees": 20}})
    img, lab, info = aug(image, label, torch.Generator().manual_seed(5), return_info=True)
    applied = info["rotation"]
    assert 0 < int(applied.sum()) < 8
    assert torch.equal(img[~applied], image[~applied]) and torch.equal(lab[~applied], label[~applied])
    assert not torch.equal(img[applied], image[applied])
    assert aug.last_info is not None and torch.equal(aug.last_info["rotation"], applied)


def test_image_padding_modes():
    image = torch.full((2, 1, 32, 32), -1.0)
    image[:, :, 8:24, 8:24] = 2.0
    label = torch.zeros(2, 1, 32, 32, dtype=torch.int64)
    rot = {"p": 1, "degrees": [45, 45]}
    zeros, _ = _augmenter({"rotation": rot})(image, label, torch.Generator().manual_seed(0))
    low, _ = _augmenter({"rotation": rot, "spatial": {"image_pad": "min"}})(image, label, torch.Generator().manual_seed(0))
    const, _ = _augmenter({"rotation": rot, "spatial": {"image_pad": 5.0}})(image, label, torch.Generator().manual_seed(0))
    assert zeros[0, 0, 0, 0] == 0.0
    assert low[0, 0, 0, 0] == pytest.approx(-1.0) and low.min() >= -1.0 - 1e-5
    assert const[0, 0, 0, 0] == pytest.approx(5.0)
    assert torch.allclose(zeros[:, :, 12:20, 12:20], low[:, :, 12:20, 12:20])


def test_per_sample_probabilities_are_respected():
    n = 2000
    image = torch.randn(n, 1, 8, 8)
    label = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    aug = _augmenter({"rotation": {"p": 0.2}, "scaling": {"p": 0.5}, "mirror": {"p": 0.3}})
    _, _, info = aug(image, label, torch.Generator().manual_seed(11), return_info=True)
    for frac, p in [(info["rotation"].float().mean(), 0.2), (info["scaling"].float().mean(), 0.5),
                    (info["mirror"][:, 0].float().mean(), 0.3), (info["mirror"][:, 1].float().mean(), 0.3)]:
        assert abs(float(frac) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert info["mirror"].shape == (n, 2)
    # Draws are independent: rotation and scaling co-occur at about p1 * p2.
    both = (info["rotation"] & info["scaling"]).float().mean()
    assert abs(float(both) - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)


def test_scaling_above_one_zooms_out():
    label = _disks(2)
    aug = _augmenter({"scaling": {"p": 1, "range": [1.25, 1.25]}})
    _, lab = aug(label.float(), label, torch.Generator().manual_seed(0))
    ratio = (lab > 0).flatten(1).sum(1).double() / (label > 0).flatten(1).sum(1).double()
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / 1.25 ** 2), rtol=0.08)


def test_3d_out_of_plane_rotation_and_elastic_keep_labels():
    label = torch.zeros(2, 1, 8, 32, 32, dtype=torch.int64)
    label[:, :, 2:6, 8:24, 8:24] = 1
    label[:, :, 3:5, 12:20, 12:20] = 3
    aug = _augmenter({"rotation": {"p": 1, "degrees": 20, "out_of_plane_degrees": 10},
                      "elastic": {"p": 1, "max_displacement": [1, 2]}}, dims=3)
    img, lab = aug(label.float(), label, torch.Generator().manual_seed(0))
    assert set(lab.unique().tolist()) <= {0, 1, 3} and not torch.equal(lab, label)
    assert _iou(img > 0.5, lab > 0).min() > 0.9


# ----------------------------------------------------------------- source patches (out_shape)
def _source_augmenter(params: dict, out_shape=(32, 32)):
    return build_augmenter(AugmentConfig(preset="none", params=params), 2, out_shape=out_shape)


def test_a_source_patch_leaves_as_its_centre_window_exactly_when_untransformed():
    label = _disks(4)  # 64 x 64 sources
    image = torch.randn(4, 1, 64, 64)
    img, lab = _source_augmenter({})(image, label, torch.Generator().manual_seed(0))
    assert img.shape == (4, 1, 32, 32) and lab.shape == (4, 1, 32, 32)
    assert torch.equal(img, image[:, :, 16:48, 16:48]) and torch.equal(lab, label[:, :, 16:48, 16:48])
    # An input already at out_shape (or smaller) is augmented at its own shape.
    small = torch.randn(2, 1, 24, 24)
    assert _source_augmenter({})(small, torch.zeros(2, 1, 24, 24, dtype=torch.long),
                                 torch.Generator())[0].shape == (2, 1, 24, 24)


def test_a_rotated_source_patch_is_the_rotated_source_cut_not_a_padded_patch():
    label = _disks(4)
    image = label.float() + 1.0  # no zero anywhere in the source
    aug = _source_augmenter({"rotation": {"p": 1, "degrees": [90, 90]}})
    img, lab = aug(image, label, torch.Generator().manual_seed(0))
    # A quarter turn of the whole source, then the centre window: pixel-exact for labels.
    expected = torch.rot90(label, 1, dims=(2, 3))[:, :, 16:48, 16:48]
    assert (lab != expected).float().mean() < 1e-3
    assert torch.allclose(img, expected.float() + 1.0, atol=1e-4)
    # 45 degrees and a 1.4 zoom-out stay inside a source with `source_margin`'s margin: no padding.
    m = source_margin({"p": 1, "degrees": 45}, {"p": 1, "range": [0.7, 1.4]}, (32, 32))
    assert m == [16, 16]  # 32 * sqrt(2) * 1.4 = 63.4 -> (63.4 - 32) / 2 rounded up
    src = torch.ones(3, 1, 32 + 2 * m[0], 32 + 2 * m[1])
    turned = _source_augmenter({"rotation": {"p": 1, "degrees": [45, 45]}, "scaling": {"p": 1, "range": [1.4, 1.4]}})
    out, _ = turned(src, torch.zeros_like(src, dtype=torch.long), torch.Generator().manual_seed(1))
    assert out.min() > 0.99  # no corner of the turned, zoomed-out patch reaches the padding
    plain, _ = _augmenter({"rotation": {"p": 1, "degrees": [45, 45]}, "scaling": {"p": 1, "range": [1.4, 1.4]}})(
        torch.ones(3, 1, 32, 32), torch.zeros(3, 1, 32, 32, dtype=torch.long), torch.Generator().manual_seed(1))
    assert plain.min() == 0.0  # what the patch-only crop gave: zero corners


def test_source_margin_is_zero_for_transforms_that_are_off():
    assert source_margin({"p": 0.0, "degrees": 180}, {"p": 0.0, "range": [0.7, 1.4]}, (128, 96)) == [0, 0]
    # 3 degrees need 4 px; the source is then grown to a multiple of 16 (136 -> 144) for the FFTs.
    assert source_margin({"p": 0.2, "degrees": 3}, {"p": 0.0, "range": [0.7, 1.4]}, (128, 128)) == [8, 8]
    h, w = source_margin({"p": 0.2, "degrees": 180}, {"p": 0.2, "range": [0.7, 1.4]}, (128, 128))
    exact = math.ceil((128 * math.sqrt(2) * 1.4 - 128) / 2)  # 63: a 254 source
    assert h == w == 64 and h >= exact and (128 + 2 * h) % 16 == 0
    assert source_margin({"p": 1, "degrees": 10}, {"p": 0.0, "range": [1, 1]}, (33, 33)) == [3, 3]  # odd: as is
