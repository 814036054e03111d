"""The ``cmr`` plan: resampling, clipping, normalisation, heart-centred crop and exact inversion."""
from __future__ import annotations

import json
from typing import Optional, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from robustseg.config import CMRPlanConfig, DataConfig
from robustseg.data.cases import Case
from robustseg.data.preprocess import Plan, build_plan, plan_from_dict
from robustseg.data.preprocess.cmr import CMRPlan
from robustseg.data.preprocess.geometry import to_sitk
from robustseg.errors import ConfigError, DataError

OBLIQUE = tuple(sitk.VersorTransform((0.2, 0.9, -0.4), 0.6).GetMatrix())


def heart_case(
    shape: Tuple[int, int, int] = (6, 150, 140),
    spacing: Sequence[float] = (1.484, 1.484, 8.0),
    heart_yx: Tuple[float, float] = (60.0, 80.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    spacing_known: bool = True,
) -> Case:
    """A short-axis-like stack: LV disk, MYO ring, RV crescent, noisy background."""
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    # Radii in mm, so the heart keeps its physical size whatever the pixel size.
    r = np.hypot((yy - heart_yx[0]) * spacing[1], (xx - heart_yx[1]) * spacing[0])
    rv = np.hypot((yy - heart_yx[0]) * spacing[1], (xx - heart_yx[1]) * spacing[0] + 22.0)
    label = np.zeros(shape, np.uint8)
    for k in range(z):
        s = 1.0 - 0.08 * abs(k - z / 2)  # smaller towards base and apex
        label[k][(rv < 20 * s) & (r >= 22 * s)] = 3
        label[k][r < 22 * s] = 2
        label[k][r < 14 * s] = 1
    rng = np.random.default_rng(0)
    means = np.array([120.0, 600.0, 180.0, 520.0], np.float32)
    image = means[label] + rng.normal(0, 25, shape).astype(np.float32)
    return Case(
        "h", "h", image, label, spacing=tuple(float(v) for v in spacing), origin=tuple(origin),
        direction=tuple(float(v) for v in direction), spacing_known=spacing_known, dataset="test",
    )


def cmr(target: Optional[Sequence[float]] = (1.25, 1.25), crop: Sequence[int] = (256, 256), **kw) -> CMRPlan:
    return CMRPlan(CMRPlanConfig(target_spacing=None if target is None else list(target), crop_size=list(crop), **kw))


def sitk_of(case: Case, array: np.ndarray) -> sitk.Image:
    return to_sitk(array, case.spacing, case.origin, case.direction)


def test_shapes_spacing_and_label_values() -> None:
    case = heart_case()
    out, rec = cmr().preprocess(case)
    assert out.image.shape == (6, 256, 256) and out.image.dtype == np.float32
    assert out.label.shape == (6, 256, 256) and out.label.dtype == np.uint8
    assert out.spacing == (1.25, 1.25, 8.0)
    # 1.484 -> 1.25 mm enlarges the in-plane size by the spacing ratio.
    assert rec["resample"]["out_shape_yx"] == [round(150 * 1.484 / 1.25), round(140 * 1.484 / 1.25)]
    assert set(np.unique(out.label)) == {0, 1, 2, 3}
    assert out.direction == case.direction and out.meta["preprocess"]["plan"] == "cmr"


@pytest.mark.parametrize(
    "shape,spacing,target,crop,known",
    [
        ((6, 150, 140), (1.484, 1.484, 8.0), (1.25, 1.25), (256, 256), True),  # up-sample, pad
        ((5, 151, 139), (1.484, 1.484, 8.0), (1.25, 1.25), (96, 113), True),  # up-sample, crop
        ((5, 151, 139), (1.6, 1.3, 10.0), (1.25, 1.25), (101, 99), True),  # anisotropic, odd
        ((5, 151, 139), (1.484, 1.484, 8.0), None, (97, 81), True),  # no resampling, crop
        ((4, 120, 131), (1.484, 1.484, 8.0), (1.25, 1.25), (160, 150), False),  # spacing unknown
        ((4, 120, 131), (1.25, 1.25, 8.0), (1.25, 1.25), (128, 128), True),  # already at target
    ],
)
def test_invert_label_is_exact(shape, spacing, target, crop, known) -> None:
    case = heart_case(shape, spacing, heart_yx=(shape[1] / 2 + 3.3, shape[2] / 2 - 5.1), spacing_known=known)
    plan = cmr(target, crop)
    out, rec = plan.preprocess(case)
    assert rec["foreground_voxels_lost"] == 0
    back = plan.invert_label(out.label, rec)
    assert back.dtype == np.uint8 and back.shape == case.shape
    assert np.array_equal(back, case.label)


def test_heart_centroid_lands_at_the_crop_centre() -> None:
    out, rec = cmr(crop=(96, 112)).preprocess(heart_case(heart_yx=(55.0, 85.0)))
    assert rec["centre"]["source"] == "label"
    _, ys, xs = np.nonzero(out.label)
    assert abs(ys.mean() - (96 - 1) / 2) <= 1.0 and abs(xs.mean() - (112 - 1) / 2) <= 1.0


def test_world_coordinates_survive_resampling_and_crop() -> None:
    case = heart_case(origin=(-31.5, 104.2, 12.0), direction=OBLIQUE)
    out, _ = cmr(crop=(96, 100)).preprocess(case)
    src, dst = sitk_of(case, case.label), sitk_of(out, out.label)
    rng = np.random.default_rng(3)
    fg = np.argwhere(out.label > 0)
    checked = 0
    for z, y, x in fg[rng.choice(len(fg), 150, replace=False)]:
        ci = src.TransformPhysicalPointToContinuousIndex(dst.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))
        assert ci[2] == pytest.approx(z, abs=1e-6)  # slices stay where they were
        if min(abs(c % 1 - 0.5) for c in ci[:2]) < 1e-6:
            continue  # exact tie between two source voxels
        # Nearest-neighbour resampling: the voxel holds the label found at its world position.
        assert out.label[z, y, x] == case.label[z, int(round(ci[1])), int(round(ci[0]))]
        checked += 1
    assert checked > 100


def test_world_coordinates_without_resampling_are_integer_shifts() -> None:
    case = heart_case(origin=(5.0, -7.5, 3.0), direction=OBLIQUE)
    out, rec = cmr(target=None, crop=(80, 90)).preprocess(case)
    y0, x0 = rec["crop"]["start_yx"]
    src, dst = sitk_of(case, case.image), sitk_of(out, out.image)
    for z, y, x in [(0, 0, 0), (3, 40, 45), (5, 79, 89)]:
        ci = src.TransformPhysicalPointToContinuousIndex(dst.TransformIndexToPhysicalPoint((x, y, z)))
        assert ci == pytest.approx((x + x0, y + y0, z), abs=1e-6)


def test_centre_override_is_honoured() -> None:
    case = heart_case(direction=OBLIQUE)
    given = (70.0, 50.0)
    out, rec = cmr(crop=(64, 64)).preprocess(case, centre_yx=given)
    assert rec["centre"]["source"] == "given" and rec["centre"]["yx_original"] == list(given)
    centre_out = sitk_of(out, out.image).TransformContinuousIndexToPhysicalPoint((31.5, 31.5, 2.0))
    centre_in = sitk_of(case, case.image).TransformContinuousIndexToPhysicalPoint((given[1], given[0], 2.0))
    assert np.linalg.norm(np.subtract(centre_out, centre_in)) <= 0.5 * 1.25 * np.sqrt(2) + 1e-9
    with pytest.raises(DataError, match="centre_yx"):
        cmr().preprocess(case, centre_yx=(float("nan"), 3.0))


def test_bad_input_is_named() -> None:
    case = heart_case()
    case.source_path = "/data/ct_001.nii.gz"
    with pytest.raises(DataError, match="ct_001.nii.gz: plan 'cmr' expects MR"):
        cmr().preprocess(case.with_arrays(case.image, case.label, modality="CT"))
    with pytest.raises(DataError, match="shape"):
        cmr().preprocess(case.with_arrays(case.image, case.label[:, :-1]))


def test_image_centre_when_unlabelled_or_centre_image() -> None:
    case = heart_case()
    for c, plan in ((case.with_arrays(case.image, None), cmr()), (case, cmr(centre="image"))):
        _, rec = plan.preprocess(c)
        assert rec["centre"]["source"] == "image"
        assert rec["centre"]["yx_original"] == [74.5, 69.5]


def test_percentile_clipping_and_zscore() -> None:
    case = heart_case()
    case.image[2, 10:14, 10:14] = 1e5  # a bright artefact the clip must remove
    case.image[3, 100:103, 5:8] = -1e4
    out, rec = cmr(target=None, crop=(200, 200)).preprocess(case)
    lo, hi = np.percentile(case.image, [0.5, 99.5])
    assert rec["intensity"]["clip_values"] == pytest.approx([lo, hi])
    (y0, x0), it = rec["crop"]["start_yx"], rec["intensity"]
    inside = out.image[:, -y0 : -y0 + 150, -x0 : -x0 + 140]  # the padding-free part
    assert inside.mean() == pytest.approx(0.0, abs=1e-4) and inside.std() == pytest.approx(1.0, abs=1e-4)
    assert inside.max() == pytest.approx((hi - it["mean"]) / it["std"], rel=1e-5)
    assert out.image.min() == pytest.approx((lo - it["mean"]) / it["std"], rel=1e-5)
    assert rec["crop"]["pad_value"] == pytest.approx(out.image.min())


def test_minmax_normalisation() -> None:
    out, rec = cmr(normalization="minmax", crop=(300, 300)).preprocess(heart_case())
    assert out.image.min() == pytest.approx(0.0) and out.image.max() == pytest.approx(1.0)
    assert rec["intensity"]["method"] == "minmax" and rec["crop"]["pad_value"] == pytest.approx(0.0)


def test_spacing_unknown_skips_resampling_and_says_so() -> None:
    case = heart_case(spacing=(1.484, 1.484, 8.0), spacing_known=False)
    out, rec = cmr().preprocess(case)
    assert rec["resample"]["applied"] is False and "spacing unknown" in rec["resample"]["reason"]
    assert out.spacing == case.spacing and not out.spacing_known
    _, rec2 = cmr(target=None).preprocess(heart_case())
    assert rec2["resample"]["applied"] is False and "null" in rec2["resample"]["reason"]


def test_lost_foreground_is_recorded() -> None:
    plan = cmr(crop=(24, 24))
    out, rec = plan.preprocess(heart_case())
    assert rec["foreground_voxels_lost"] > 0 and 0 < rec["foreground_fraction_lost"] < 1
    assert rec["warnings"] and "removed" in rec["warnings"][0]
    assert plan.invert_label(out.label, rec).shape == (6, 150, 140)


def test_record_is_json_and_plan_round_trips() -> None:
    plan = build_plan(DataConfig(plan="cmr"))
    assert isinstance(plan, Plan) and plan.name == "cmr"
    out, rec = plan.preprocess(heart_case())
    assert json.loads(json.dumps(rec)) == rec
    assert json.loads(json.dumps(out.meta)) == out.meta
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["version"] == 1 and d["params"]["crop_size"] == [256, 256]
    again = plan_from_dict(d)
    assert again.params == plan.params
    with pytest.raises(ConfigError, match="version"):
        plan_from_dict({**d, "version": 99})
    # A restored plan inverts records the original plan wrote, after they went through JSON.
    assert np.array_equal(again.invert_label(out.label, json.loads(json.dumps(rec))), plan.invert_label(out.label, rec))


def test_invert_probabilities() -> None:
    case = heart_case()
    plan = cmr(crop=(160, 160))
    out, rec = plan.preprocess(case)
    probs = np.eye(4, dtype=np.float32)[out.label].transpose(3, 0, 1, 2)
    back = plan.invert_probabilities(probs, rec)
    assert back.shape == (4,) + case.shape
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)
    # Linear interpolation then argmax: not guaranteed identical to nearest neighbour.
    assert (back.argmax(axis=0) == case.label).mean() > 0.995
    with pytest.raises(DataError, match="does not match"):
        plan.invert_label(out.label[:, :-1], rec)


@pytest.mark.realdata
@pytest.mark.parametrize("crop", [(320, 320), (192, 192)])
def test_mnms_case_round_trip_is_exact(shared_data, crop) -> None:
    folder = shared_data("mnms2_sample")
    img = sitk.ReadImage(str(folder / "001_SA_ED.nii.gz"))
    gt = sitk.ReadImage(str(folder / "001_SA_ED_gt.nii.gz"))
    label = np.rint(sitk.GetArrayFromImage(gt)).astype(np.uint8)  # float64 on disk; M&Ms == canonical
    case = Case(
        "mnms2_001_ED", "001", sitk.GetArrayFromImage(img).astype(np.float32), label,
        spacing=img.GetSpacing(), origin=img.GetOrigin(), direction=img.GetDirection(),
        source_path=str(folder / "001_SA_ED.nii.gz"),
    )
    plan = cmr((1.25, 1.25), crop)
    out, rec = plan.preprocess(case)
    assert out.spacing[:2] == (1.25, 1.25) and out.spacing[2] == pytest.approx(img.GetSpacing()[2])
    assert out.image.shape == (img.GetSize()[2],) + crop
    assert rec["foreground_voxels_lost"] == 0
    assert np.array_equal(plan.invert_label(out.label, rec), label)
    # The preprocessed label sits where the original one was, in world coordinates.
    dst = to_sitk(out.label, out.spacing, out.origin, out.direction)
    z, y, x = (int(v) for v in np.argwhere(out.label == 1).mean(axis=0).round())
    ci = img.TransformPhysicalPointToContinuousIndex(dst.TransformIndexToPhysicalPoint((x, y, z)))
    assert label[z, int(round(ci[1])), int(round(ci[0]))] == out.label[z, y, x] == 1
