"""Prediction that never cuts the heart: the checkpoint's training field picks the inference field.

A pixel-wise "model" (bright voxels are LV) makes every path comparable exactly: it gives the
same answer in any window, so the two-stage path must equal one sliding window over the
whole field, and a crop that cuts the structure shows up as missing voxels.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from robustseg.config import ExperimentConfig
from robustseg.data.cases import Case
from robustseg.data.preprocess import plan_from_dict
from robustseg.engine.inference import heart_box, locate_then_segment, sliding_window_2d
from robustseg.engine.predict import Predictor, inference_plan, predict_case, training_field


class Bright(nn.Module):
    """Logits that call a z-scored voxel LV when it is above the mean, background otherwise."""

    def forward(self, x):
        return torch.cat([-10 * x, 10 * x, -100 + 0 * x, -100 + 0 * x], dim=1)


def _case(shape=(4, 160, 150), centre=(40, 110), radius=14) -> Case:
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disk = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius ** 2
    image = np.zeros(shape, np.float32) + 5.0
    image[:, disk] = 100.0
    return Case(case_id="c", subject_id="c", image=image, spacing_known=False, modality="MR", task="cardiac",
                source_path="c.nii.gz"), disk


def _predictor(crop, patch) -> Predictor:
    cfg = ExperimentConfig.from_dict({"inference": {"postprocess": False, "tta": False}})
    plan = plan_from_dict({"name": "cmr", "version": 1, "params": {"target_spacing": None, "crop_size": list(crop),
                                                                     "centre": "image"}})
    return Predictor(Bright(), cfg, plan, "cardiac", {1: "LV"}, tuple(patch), 2, torch.device("cpu"), "test",
                     training_field(plan, patch, 2))


def test_heart_box_covers_the_largest_component_and_one_window():
    lab = torch.zeros((3, 100, 120), dtype=torch.long)
    lab[:, 40:50, 60:70] = 1  # the structure
    lab[1, 2:4, 2:4] = 2  # a small stray blob (< 10 % of the largest): speckle, ignored
    ys, xs = heart_box(lab, (32, 32), margin=4)
    assert (ys.start, ys.stop) == (29, 61) and (xs.start, xs.stop) == (49, 81)  # grown to 32, centred
    ys, xs = heart_box(lab, (32, 32), margin=20)
    assert (ys.start, ys.stop) == (20, 70) and (xs.start, xs.stop) == (40, 90)
    ys, xs = heart_box(lab[:, :64, :], (80, 80), margin=0)  # window taller than the image: all of it
    assert (ys.start, ys.stop) == (0, 64)
    assert heart_box(torch.zeros((2, 10, 10)), (8, 8), 2) is None
    lab[:, 80:88, 100:110] = 3  # a second blob nearly as large: the box keeps both (the heart may be either)
    ys, xs = heart_box(lab, (32, 32), margin=4)
    assert (ys.start, ys.stop) == (36, 92) and (xs.start, xs.stop) == (56, 114)


def test_heart_box_keeps_a_heart_that_motion_split_into_one_piece_per_slice():
    # Severe breathing motion: each slice is its own breath-hold, so the heart's cross-sections
    # shift and no longer touch in 3D; each piece is under a tenth of a false blob elsewhere.
    lab = torch.zeros((6, 200, 200), dtype=torch.long)
    lab[:, 150:180, 150:180] = 1  # a false blob (a ghost, the stomach): 5,400 voxels
    for z in range(6):
        y0 = 40 + (z % 2) * 12  # alternate slices 12 px apart: no 3D contact
        lab[z, y0:y0 + 10, 40:52] = 2  # 120 voxels per slice (2 % of the blob), 720 in the column (13 %)
    ys, xs = heart_box(lab, (32, 32), margin=4)
    assert ys.start <= 36 and xs.start <= 36  # the heart's column is inside the box
    assert ys.stop >= 184 and xs.stop >= 184  # and so is the blob
    # A speck of one slice is still ignored.
    lab[:, 40:62, 40:52] = 0
    lab[2, 10:12, 10:12] = 2
    ys, xs = heart_box(lab, (32, 32), margin=4)
    assert ys.start > 100 and xs.start > 100


def test_two_stage_equals_one_sliding_window_for_a_pixelwise_model():
    case, disk = _case()
    img = torch.from_numpy((case.image - case.image.mean()) / case.image.std())
    full = sliding_window_2d(Bright(), img, 4, patch_size=(32, 32), tta=True)
    two, box = locate_then_segment(Bright(), img, num_classes=4, patch_size=(32, 32), tta=True)
    assert box is not None and torch.equal(two.argmax(0), full.argmax(0))
    assert torch.allclose(two.sum(0), torch.ones_like(two[0]))  # probabilities everywhere
    empty, box = locate_then_segment(Bright(), torch.zeros((2, 40, 40)) - 1, num_classes=4, patch_size=(32, 32))
    assert box is None and bool((empty.argmax(0) == 0).all())


def test_training_field_is_read_from_patch_and_crop():
    assert _predictor((64, 64), (32, 32)).trained_on == "patches"
    assert _predictor((64, 64), (64, 64)).trained_on == "crop"


def test_inference_plan_is_the_exact_field_without_resampling():
    case, _ = _case(shape=(2, 216, 256))
    params = inference_plan(_predictor((128, 128), (64, 64)).plan, case).params
    assert list(params.crop_size) == [216, 256]  # no slack voxel: 256 stays 256, not 258 -> 288 windows


def test_patch_trained_default_finds_an_off_centre_heart():
    case, disk = _case()  # the disk sits 35 px off the image centre, outside a centred 64x64 crop
    pred = _predictor((64, 64), (32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default path must not need a warning
        auto = predict_case(pred, case)
    assert np.array_equal(auto[0] == 1, disk)
    assert np.array_equal(predict_case(pred, case, full_fov=True), auto)
    cut = predict_case(pred, case, full_fov=False)  # the explicit training crop at the image centre
    assert (cut[0] == 1).sum() < disk.sum()


def test_crop_trained_model_recentres_with_a_warning():
    case, disk = _case()
    pred = _predictor((64, 64), (64, 64))
    with pytest.warns(RuntimeWarning, match="touches the edge of the \\[64, 64\\] crop; re-centring"):
        lab = predict_case(pred, case)
    assert np.array_equal(lab[0] == 1, disk)  # whole structure after re-centring


def test_crop_trained_model_falls_back_to_the_whole_field():
    case, disk = _case(radius=40, centre=(80, 75))  # larger than the 64x64 crop: no centre can hold it
    pred = _predictor((64, 64), (64, 64))
    with pytest.warns(RuntimeWarning, match="segmenting the whole field of view"):
        lab = predict_case(pred, case)
    assert np.array_equal(lab[0] == 1, disk)
