"""Label-map guard: names and values that mark a segmentation, and scans that pass."""
import numpy as np
import pytest

from robustseg.data.guards import label_map_reason


@pytest.mark.parametrize("name", ["001_SA_ED_gt.nii.gz", "case_seg.nii", "scans/p1-label.mha", "x_mask.png"])
def test_names_of_label_maps_are_flagged(name):
    reason = label_map_reason(name)
    assert reason is not None and "label map" in reason and "--force" in reason


@pytest.mark.parametrize("name", ["001_SA_ED.nii.gz", "segment_me.nii.gz", "gtx.nii", "P001-1-ED.nii.gz"])
def test_scan_names_pass(name):
    assert label_map_reason(name) is None


def test_integer_volume_of_label_values_is_flagged_whatever_its_dtype():
    lbl = np.zeros((4, 8, 8), np.uint8)
    lbl[1, 2:5, 2:5] = 3
    lbl[2, 3, 3] = 1
    reason = label_map_reason("scan.nii.gz", lbl)
    assert reason is not None and "[0, 1, 3]" in reason
    # M&Ms stores its ground truth as float64: still a label map.
    assert label_map_reason(None, lbl.astype(np.float64)) is not None


def test_real_scans_pass():
    rng = np.random.default_rng(0)
    assert label_map_reason("a.nii.gz", rng.random((4, 8, 8)).astype(np.float32)) is None  # [0,1) floats
    assert label_map_reason("a.nii.gz", rng.integers(0, 4096, (4, 8, 8)).astype(np.int16)) is None
    assert label_map_reason("a.nii.gz", np.zeros((4, 8, 8), np.uint8)) is None  # empty: another check's job
    assert label_map_reason("a.nii.gz", np.full((2, 2), np.nan)) is None
