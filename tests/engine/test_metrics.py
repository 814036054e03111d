"""Dice, HD95 (pixels and anisotropic millimetres), case rows, aggregation and CSV."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import ndimage

from robustseg.data.labels import CARDIAC_NAMES
from robustseg.engine.metrics import aggregate, dice_per_class, evaluate_case, hd95, to_csv


def disk(shape=(40, 40), centre=(20, 20), radius=8.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(yy - centre[0], xx - centre[1]) < radius


def brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Reference: explicit surface point sets and all pairwise distances."""
    def surface_points(m):
        s = m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1))
        return np.argwhere(s) * np.asarray(spacing, float)

    pa, pb = surface_points(a), surface_points(b)
    d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_identical_masks() -> None:
    lab = np.zeros((3, 40, 40), np.uint8)
    lab[1][disk()] = 1
    lab[1][disk(radius=4)] = 2
    assert dice_per_class(lab, lab, [1, 2]) == {1: 1.0, 2: 1.0}
    assert hd95(lab == 1, lab == 1, (10.0, 1.0, 1.0)) == 0.0


def test_disjoint_and_empty_conventions() -> None:
    a, b = np.zeros((1, 20, 20), bool), np.zeros((1, 20, 20), bool)
    a[0, 2:5, 2:5] = True
    b[0, 12:15, 12:15] = True
    assert dice_per_class(a.astype(np.uint8), b.astype(np.uint8), [1]) == {1: 0.0}
    assert 0 < hd95(a, b) < 20
    empty = np.zeros_like(a)
    # Both empty: undefined (NaN, dropped from means); one empty: Dice 0 and HD95 inf.
    assert math.isnan(dice_per_class(empty, empty, [1])[1])
    assert math.isnan(hd95(empty, empty))
    assert dice_per_class(a.astype(np.uint8), empty.astype(np.uint8), [1]) == {1: 0.0}
    assert hd95(a, empty) == math.inf and hd95(empty, a) == math.inf


def test_shifted_bar_exact_hd95_in_pixels_and_mm() -> None:
    a = np.zeros((1, 30, 30), bool)
    a[0, 10:20, 10:12] = True  # two pixels wide: every pixel is surface
    b = np.roll(a, 5, axis=2)  # shifted 5 px in x: distances are exactly 4 or 5 px
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, b, spacing_zyx=(10.0, 0.7, 2.0)) == pytest.approx(10.0)  # x spacing 2 mm


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 2.0), (3.0, 1.25)])
@pytest.mark.parametrize("centre", [(20, 20), (6, 30)])  # the second disk is cut by the border
def test_shifted_disk_matches_brute_force(spacing, centre) -> None:
    gt = disk(centre=centre, radius=9)
    pred = disk(centre=(centre[0] + 2, centre[1] - 3), radius=8)
    ref = brute_hd95(pred, gt, spacing)
    assert hd95(pred[None], gt[None], (5.0,) + spacing) == pytest.approx(ref, abs=1e-6)
    assert hd95(pred, gt, spacing) == pytest.approx(ref, abs=1e-6)


def test_brute_force_in_3d_with_anisotropy() -> None:
    zz, yy, xx = np.mgrid[:8, :24, :24]
    gt = ((zz - 4) * 3) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 < 64
    pred = ((zz - 3) * 3) ** 2 + (yy - 11) ** 2 + (xx - 13) ** 2 < 49
    sp = (3.0, 1.0, 0.8)
    assert hd95(pred, gt, sp) == pytest.approx(brute_hd95(pred, gt, sp), abs=1e-6)


def test_one_slice_shift_counts_the_slice_thickness() -> None:
    gt = np.zeros((6, 20, 20), np.uint8)
    gt[2:4, 5:15, 5:15] = 1  # two slices thick
    pred = np.roll(gt, 1, axis=0)  # one slice off
    row = evaluate_case(pred, gt, spacing_xyz=(1.5, 1.5, 10.0), spacing_known=True, class_names={0: "bg", 1: "LV"})
    assert row["hd95_LV"] == pytest.approx(10.0) and row["hd95_unit"] == "mm"
    assert row["dice_LV"] == pytest.approx(0.5)
    row = evaluate_case(pred, gt, spacing_xyz=(1.5, 1.5, 10.0), spacing_known=False, class_names={1: "LV"})
    assert row["hd95_LV"] == pytest.approx(1.0) and row["hd95_unit"] == "px"
    # Swapping the spacing order (the classic bug) would give 1.5 mm here.
    row = evaluate_case(pred, gt, spacing_xyz=(10.0, 10.0, 1.5), spacing_known=True, class_names={1: "LV"})
    assert row["hd95_LV"] == pytest.approx(1.5)


def test_evaluate_case_row_and_nan_aware_mean() -> None:
    gt = np.zeros((2, 20, 20), np.uint8)
    gt[:, 4:10, 4:10] = 1
    gt[:, 12:16, 12:16] = 2
    pred = gt.copy()
    pred[:, 12:16, 12:14] = 0  # MYO half missed; RV absent from both
    row = evaluate_case(pred, gt, (1.0, 1.0, 5.0), True, CARDIAC_NAMES, meta={"case_id": "c1", "phase": "ED"})
    assert list(row)[:2] == ["case_id", "phase"]
    assert row["dice_LV"] == 1.0 and row["dice_MYO"] == pytest.approx(2 * 16 / 48)
    assert math.isnan(row["dice_RV"]) and math.isnan(row["hd95_RV"])
    assert row["dice_mean"] == pytest.approx((1.0 + 2 * 16 / 48) / 2)
    assert "dice_background" not in row
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(pred[:1], gt, (1, 1, 1), True, CARDIAC_NAMES)


def test_aggregate_groups() -> None:
    rows = [
        {"case_id": "a", "dataset": "acdc", "motion_level": 0, "phase": "ED", "dice_LV": 0.9, "hd95_LV": 2.0, "hd95_unit": "mm"},
        {"case_id": "b", "dataset": "acdc", "motion_level": 2, "phase": "ES", "dice_LV": 0.7, "hd95_LV": 6.0, "hd95_unit": "mm"},
        {"case_id": "c", "dataset": "mnms", "motion_level": 2, "phase": "ED", "dice_LV": float("nan"), "hd95_LV": float("nan"), "hd95_unit": "mm"},
        {"case_id": "d", "dataset": "mnms", "motion_level": 0, "phase": "ES", "dice_LV": 0.5, "hd95_LV": 4.0, "hd95_unit": "mm"},
    ]
    agg = aggregate(rows)
    assert agg["overall"]["n"] == 4 and agg["overall"]["dice_LV"] == pytest.approx(0.7)
    assert agg["overall"]["hd95_unit"] == "mm"
    assert set(agg["motion_level"]) == {0, 2}
    assert agg["motion_level"][2]["dice_LV"] == pytest.approx(0.7) and agg["motion_level"][2]["n"] == 2
    assert agg["motion_level"][0]["dice_LV"] == pytest.approx(0.7)
    assert agg["dataset"]["acdc"]["hd95_LV"] == pytest.approx(4.0)
    assert agg["phase"]["ES"]["dice_LV"] == pytest.approx(0.6)
    assert "motion_level" not in agg["overall"] and "case_id" not in agg["overall"]
    # A group mixing mm and px rows cannot average distances.
    mixed = aggregate(rows + [{"dataset": "acdc_h5", "dice_LV": 0.8, "hd95_LV": 3.0, "hd95_unit": "px"}], by=("dataset",))
    assert mixed["overall"]["hd95_unit"] == "mixed" and math.isnan(mixed["overall"]["hd95_LV"])
    assert mixed["dataset"]["acdc_h5"]["hd95_LV"] == 3.0 and mixed["dataset"]["acdc_h5"]["hd95_unit"] == "px"
    # A missed structure (inf) is a failure that shows in the mean.
    assert aggregate([{"hd95_LV": 1.0}, {"hd95_LV": math.inf}], by=())["overall"]["hd95_LV"] == math.inf


def test_to_csv_roundtrip(tmp_path) -> None:
    rows = [{"case_id": "a", "dice_LV": 0.9}, {"case_id": "b", "dice_LV": float("nan"), "hd95_LV": np.float64(2.5)}]
    path = to_csv(rows, tmp_path / "out" / "metrics.csv")
    with open(path) as fh:
        back = list(csv.DictReader(fh))
    assert list(back[0]) == ["case_id", "dice_LV", "hd95_LV"]
    assert back[0]["hd95_LV"] == "" and back[1]["dice_LV"] == "nan" and float(back[1]["hd95_LV"]) == 2.5
