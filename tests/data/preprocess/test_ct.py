"""The ``ct`` plan and its classical lung mask, on a synthetic HU phantom."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pytest
from scipy import ndimage

from robustseg.config import CTPlanConfig, DataConfig
from robustseg.data.cases import Case
from robustseg.data.preprocess import build_plan, lung_mask
from robustseg.data.preprocess.ct import CTPlan, body_mask, fill_holes_per_slice
from robustseg.errors import DataError

SPACING = (0.8, 0.8, 2.5)


def phantom(z: int = 6, h: int = 120, w: int = 110, lungs: bool = True, noise: float = 15.0):
    """Air -1000 around a +40 HU body ellipse holding two -850 HU lung ellipses.

    Returns:
        ``(hu, label, true_lungs)``: a vessel (+50 HU) inside the left lung is a hole the
        mask must fill; a -300 HU lesion in the right lung is the label.
    """
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h / 2, w / 2
    body = ((yy - cy) / (0.42 * h)) ** 2 + ((xx - cx) / (0.42 * w)) ** 2 < 1
    left = ((yy - cy) / (0.25 * h)) ** 2 + ((xx - 0.3 * w) / (0.12 * w)) ** 2 < 1
    right = ((yy - cy) / (0.25 * h)) ** 2 + ((xx - 0.7 * w) / (0.12 * w)) ** 2 < 1
    hu = np.full((z, h, w), -1000.0, np.float32)
    hu[:, body] = 40.0
    true_lungs = np.zeros((z, h, w), bool)
    if lungs:
        hu[:, left | right] = -850.0
        true_lungs[:, left | right] = True
        hu[:, (yy - cy) ** 2 + (xx - 0.3 * w) ** 2 < 9] = 50.0
    label = np.zeros((z, h, w), np.uint8)
    lesion = ((yy - cy - 8) / 6) ** 2 + ((xx - 0.7 * w) / 5) ** 2 < 1
    label[2:4, lesion] = 1
    hu[2:4, lesion] = -300.0
    hu += np.random.default_rng(0).normal(0, noise, hu.shape).astype(np.float32)
    return hu, label, true_lungs


def ct_case(hu: np.ndarray, label: np.ndarray, spacing: Sequence[float] = SPACING) -> Case:
    return Case("ct", "ct", hu, label, spacing=tuple(spacing), modality="CT", task="lung_binary")


def ct(target=(1.0, 1.0), crop=(128, 128), **kw) -> CTPlan:
    return CTPlan(CTPlanConfig(target_spacing=None if target is None else list(target), crop_size=list(crop), **kw))


def test_lung_mask_finds_two_lungs_not_the_outside_air() -> None:
    hu, _, true_lungs = phantom()
    mask = lung_mask(hu, SPACING)
    assert mask.dtype == bool and mask.shape == hu.shape
    assert ndimage.label(mask)[1] == 2
    assert not (mask & ~body_mask(hu)).any()  # nothing outside the body
    assert not mask[:, 0, :].any() and not mask[:, :, 0].any()
    # Vessel hole filled, lesion (inside the lung) included: the mask is the lungs.
    iou = (mask & true_lungs).sum() / (mask | true_lungs).sum()
    assert iou > 0.98


def test_lung_mask_is_empty_without_lungs() -> None:
    hu, _, _ = phantom(lungs=False)
    hu[:, 60:62, 50:52] = -900.0  # a tiny air pocket is not a lung
    assert not lung_mask(hu, SPACING).any()


def test_shapes_spacing_and_lung_record() -> None:
    hu, label, true_lungs = phantom()
    out, rec = ct().preprocess(ct_case(hu, label))
    assert out.image.shape == (6, 128, 128) and out.label.shape == (6, 128, 128)
    assert out.spacing == (1.0, 1.0, 2.5)
    assert rec["resample"]["out_shape_yx"] == [round(120 * 0.8), round(110 * 0.8)]
    assert set(np.unique(out.label)) == {0, 1}
    assert rec["lung"]["components"] == 2
    assert rec["lung"]["volume_ml"] == pytest.approx(true_lungs.sum() * 0.8 * 0.8 * 2.5 / 1000, rel=0.05)
    assert rec["centre"]["source"] == "lung"
    assert json.loads(json.dumps(rec)) == rec


def test_zscore_within_the_lung() -> None:
    hu, label, _ = phantom()
    case = ct_case(hu, label)
    out, rec = ct(target=None, crop=(128, 128)).preprocess(case)
    assert rec["intensity"]["stats_region"] == "lung"
    y0, x0 = rec["crop"]["start_yx"]
    mask = lung_mask(hu, SPACING)
    lung_out = np.zeros(out.image.shape, bool)
    lung_out[:, -y0 : -y0 + 120, -x0 : -x0 + 110] = mask
    vals = out.image[lung_out]
    assert vals.mean() == pytest.approx(0.0, abs=1e-4) and vals.std() == pytest.approx(1.0, abs=1e-4)
    # With resampling the statistics still describe the same lung voxels.
    _, rec_r = ct().preprocess(case)
    assert rec_r["intensity"]["mean"] == pytest.approx(hu[mask].mean(), abs=5.0)


def test_hu_window_clips() -> None:
    hu, label, _ = phantom()
    hu[:, 30:34, 50:54] = 1500.0  # bone-bright spot beyond the lung window
    hu[:, 2, 2] = -3000.0  # padding value of some scanners
    out, rec = ct(target=None, crop=(128, 128)).preprocess(ct_case(hu, label))
    it = rec["intensity"]
    assert out.image.max() == pytest.approx((250.0 - it["mean"]) / it["std"], rel=1e-5)
    assert out.image.min() == pytest.approx((-1250.0 - it["mean"]) / it["std"], rel=1e-5)
    assert rec["crop"]["pad_value"] == pytest.approx(out.image.min())


def test_crop_is_centred_on_the_lungs() -> None:
    hu, label, true_lungs = phantom(h=140, w=130)
    # Move the patient off-centre: the crop must follow the lungs, not the image.
    hu, label, true_lungs = (np.roll(a, (18, -20), axis=(1, 2)) for a in (hu, label, true_lungs))
    out, rec = ct(crop=(80, 72)).preprocess(ct_case(hu, label))
    lungs_out = out.image < (-600.0 - rec["intensity"]["mean"]) / rec["intensity"]["std"]
    ys = np.flatnonzero(lungs_out[:, 10:-10, 10:-10].any(axis=(0, 2))) + 10
    xs = np.flatnonzero(lungs_out.any(axis=(0, 1)))
    assert abs((ys[0] + ys[-1]) / 2 - 39.5) <= 1.5 and abs((xs[0] + xs[-1]) / 2 - 35.5) <= 1.5


def test_centre_override_and_fallback_without_lungs() -> None:
    hu, label, _ = phantom(lungs=False)
    plan = ct()
    _, rec = plan.preprocess(ct_case(hu, label))
    assert rec["intensity"]["stats_region"] == "body" and rec["warnings"]
    assert rec["centre"]["source"] == "body" and rec["lung"]["voxels"] == 0
    _, rec = plan.preprocess(ct_case(hu, label), centre_yx=(30.0, 40.0))
    assert rec["centre"]["source"] == "given"
    assert rec["centre"]["yx_resampled"] == pytest.approx([(30.0 * 0.8 - rec["resample"]["shift_xy_mm"][1]), (40.0 * 0.8 - rec["resample"]["shift_xy_mm"][0])])


def test_mr_case_is_refused() -> None:
    hu, label, _ = phantom()
    case = ct_case(hu, label).with_arrays(hu, label, modality="MR", source_path="x.nii.gz")
    with pytest.raises(DataError, match="x.nii.gz: plan 'ct' expects CT"):
        ct().preprocess(case)


def test_mask_outside_lung() -> None:
    hu, label, _ = phantom()
    out, rec = ct(target=None, crop=(128, 128), mask_outside_lung=True).preprocess(ct_case(hu, label))
    assert rec["mask_outside_lung"]["applied"] is True
    pad = rec["crop"]["pad_value"]
    (y0, x0), mask = rec["crop"]["start_yx"], lung_mask(hu, SPACING)
    lung_out = np.zeros(out.image.shape, bool)
    lung_out[:, -y0 : -y0 + 120, -x0 : -x0 + 110] = mask
    assert (out.image[lung_out] != pad).all()
    dist = np.stack([ndimage.distance_transform_edt(~m, sampling=0.8) for m in lung_out])
    assert (out.image[dist > 10.0] == pad).all()
    assert (out.image[(dist > 0) & (dist < 9.0)] != pad).mean() > 0.99  # the margin is kept


@pytest.mark.parametrize(
    "spacing,target,crop",
    [
        ((1.4, 1.4, 5.0), [1.0, 1.0], (192, 160)),  # up-sampled, padded
        ((1.3, 1.2, 5.0), [1.0, 1.0], (131, 121)),  # anisotropic, odd, cropped
        ((0.8, 0.8, 2.5), None, (87, 89)),  # not resampled, cropped
        ((1.0, 1.0, 1.0), [1.0, 1.0], (100, 101)),  # already at target
    ],
)
def test_invert_label_exact_when_not_downsampled(spacing, target, crop) -> None:
    hu, label, _ = phantom(h=111, w=104)
    plan = build_plan(DataConfig(plan="ct", ct=CTPlanConfig(target_spacing=target, crop_size=list(crop))))
    out, rec = plan.preprocess(ct_case(hu, label, spacing))
    assert rec["resample"]["applied"] == (spacing[0] > 1.0)
    assert rec["foreground_voxels_lost"] == 0
    assert np.array_equal(plan.invert_label(out.label, rec), label)


def test_invert_label_after_downsampling_is_bounded() -> None:
    hu, label, _ = phantom()
    plan = ct()  # 0.8 -> 1.0 mm: coarser, so not exactly invertible
    out, rec = plan.preprocess(ct_case(hu, label))
    back = plan.invert_label(out.label, rec)
    assert back.shape == label.shape
    dice = 2 * (back & label).sum() / (back.sum() + label.sum())
    assert dice > 0.9  # a lesion only ~10 px across


def test_fill_holes_per_slice_matches_scipy_slice_by_slice() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        m = ndimage.binary_opening(rng.random((3, 40, 50)) > 0.45, structure=np.ones((1, 2, 2)))
        expected = np.stack([ndimage.binary_fill_holes(s) for s in m])
        assert np.array_equal(fill_holes_per_slice(m), expected)
