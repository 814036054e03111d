"""The ``slices2d`` plan: resize 2D slices to a fixed size and back."""
from __future__ import annotations

import json

import numpy as np
import pytest

from robustseg.config import DataConfig, Slices2DPlanConfig
from robustseg.data.cases import Case
from robustseg.data.preprocess import build_plan
from robustseg.data.preprocess.slices2d import Slices2DPlan


def grey_slice(h: int, w: int, z: int = 1) -> Case:
    """An 8-bit-like grey CT slice with a bright infection patch labelled 1."""
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    patch = ((yy - 0.45 * h) / (0.12 * h)) ** 2 + ((xx - 0.6 * w) / (0.1 * w)) ** 2 < 1
    img = np.where(body, 90.0, 5.0) + np.where(patch, 80.0, 0.0)
    img = np.clip(img + np.random.default_rng(z).normal(0, 6, (h, w)), 0, 255).round()
    image = np.repeat(img[None].astype(np.float32), z, axis=0) * np.arange(1, z + 1, dtype=np.float32)[:, None, None]
    label = np.repeat(patch[None].astype(np.uint8), z, axis=0)
    return Case("s", "s", image, label, spacing_known=False, modality="CT", task="lung_binary")


def plan(size=(256, 256), normalization: str = "zscore") -> Slices2DPlan:
    return Slices2DPlan(Slices2DPlanConfig(size=list(size), normalization=normalization))


def test_resize_shapes_values_and_record() -> None:
    case = grey_slice(301, 277)
    out, rec = plan().preprocess(case)
    assert out.image.shape == (1, 256, 256) and out.label.shape == (1, 256, 256)
    assert set(np.unique(out.label)) == {0, 1}
    assert rec["resample"]["in_shape_yx"] == [301, 277] and rec["original"]["shape_zyx"] == [1, 301, 277]
    assert out.spacing[0] == pytest.approx(277 / 256) and out.spacing[1] == pytest.approx(301 / 256)
    assert rec["crop"]["start_yx"] == [0, 0] and rec["foreground_voxels_lost"] == 0
    assert json.loads(json.dumps(rec)) == rec


@pytest.mark.parametrize("shape", [(200, 180), (255, 256), (97, 131)])
def test_invert_exact_when_enlarged(shape) -> None:
    case = grey_slice(*shape)
    p = plan()
    out, rec = p.preprocess(case)
    assert np.array_equal(p.invert_label(out.label, rec), case.label)


@pytest.mark.parametrize("shape", [(301, 277), (490, 411)])
def test_invert_after_shrinking_has_the_original_size_and_bounded_error(shape) -> None:
    case = grey_slice(*shape)
    p = plan()
    out, rec = p.preprocess(case)
    back = p.invert_label(out.label, rec)
    assert back.shape == case.shape and back.dtype == np.uint8
    dice = 2 * (back & case.label).sum() / (back.sum() + case.label.sum())
    assert dice > 0.97


def test_per_slice_normalisation() -> None:
    case = grey_slice(120, 140, z=3)  # slices differ in brightness by x1, x2, x3
    out, rec = plan((64, 64)).preprocess(case)
    for s in out.image:
        assert s.mean() == pytest.approx(0.0, abs=1e-4) and s.std() == pytest.approx(1.0, abs=1e-4)
    assert len(rec["intensity"]["per_slice"]) == 3
    out, _ = plan((64, 64), "minmax").preprocess(case)
    for s in out.image:
        assert s.min() == pytest.approx(0.0) and s.max() == pytest.approx(1.0)


def test_unlabelled_and_already_sized() -> None:
    case = grey_slice(64, 64)
    case = case.with_arrays(case.image, None)
    p = build_plan(DataConfig(plan="slices2d", slices2d=Slices2DPlanConfig(size=[64, 64])))
    out, rec = p.preprocess(case)
    assert out.label is None and rec["resample"]["applied"] is False
    np.testing.assert_allclose(out.image[0].mean(), 0.0, atol=1e-5)
    assert p.to_dict()["name"] == "slices2d"
