"""Post-processing: heart column, RV beside the heart, largest components (slice- and volume-wise), RV removal."""
from __future__ import annotations

import numpy as np
import pytest

from robustseg.data.labels import LV, MYO, RV
from robustseg.engine.postprocess import (
    cardiac_postprocess,
    _components,
    enclosed_lv_component,
    heart_region,
    keep_heart_column,
    keep_largest_per_class,
    keep_rv_beside_heart,
    largest_component,
    paper_cardiac_postprocess,
    postprocess,
    remove_rv_without_lv_myo,
)
from robustseg.errors import UnknownNameError


def heart(z: int = 8, size: int = 32) -> np.ndarray:
    """Canonical short-axis stack: LV disc in a MYO ring with the RV beside it on slices 1-6."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 16, xx - 18)
    sl = np.zeros((size, size), np.uint8)
    sl[r < 8] = MYO
    sl[r < 5] = LV
    sl[(np.hypot(yy - 16, xx - 5) < 4) & (r >= 8)] = RV
    vol = np.zeros((z, size, size), np.uint8)
    vol[1:7] = sl
    return vol


def test_spurious_blob_removed_main_structure_kept() -> None:
    vol = heart()
    noisy = vol.copy()
    noisy[3, 28:31, 28:31] = LV  # an LV island in a corner of one slice
    noisy[5, 1:3, 28:30] = RV  # and an RV island
    out = cardiac_postprocess(noisy)
    np.testing.assert_array_equal(out, vol)
    assert noisy[3, 29, 29] == LV, "input must not be modified"
    assert out.dtype == noisy.dtype


def test_slice_wise_and_volume_wise_passes_differ() -> None:
    main = np.zeros((8, 20, 20), bool)
    main[1:6, 5:11, 5:11] = True
    # (a) a blob alone on a distant slice: the largest on its slice, unconnected in 3D.
    a = main.copy()
    a[7, 2:5, 2:5] = True
    assert largest_component(a, "slice")[7].any()
    assert not largest_component(a, "volume")[7].any()
    # (b) an in-plane island on slice 3 joined to the main body through a bridge on slice 4.
    b = main.copy()
    b[3, 6:8, 14:16] = True
    b[4, 6:8, 11:16] = True
    assert not largest_component(b, "slice")[3, 6, 14]
    assert largest_component(b, "volume")[3, 6, 14]
    lab = b.astype(np.uint8) * LV
    assert keep_largest_per_class(lab, [LV], slice_wise=False, volume_wise=True)[3, 6, 14] == LV
    assert keep_largest_per_class(lab, [LV], slice_wise=True, volume_wise=False)[3, 6, 14] == 0
    # The paper's order (slice then volume) removes both kinds of outlier.
    both = a | b
    both[3, 6:8, 14:16] = True
    out = keep_largest_per_class(both.astype(np.uint8) * LV, [LV])
    assert not out[7].any() and out[3, 6, 14] == 0 and out[4, 6, 14] == LV


def test_connectivity_in_plane_corners_join_across_slices_corners_do_not() -> None:
    m = np.zeros((3, 6, 6), bool)
    m[0, 1, 1] = m[0, 2, 2] = True  # diagonal neighbours in-plane: one component (8-conn)
    assert largest_component(m, "slice").sum() == 2
    v = np.zeros((3, 6, 6), bool)
    v[0, 1:3, 1:3] = True  # 4 voxels
    v[1, 3, 3] = True  # touches the block only at a corner across slices: separate (18-conn)
    assert largest_component(v, "volume").sum() == 4
    v[1, 3, 2] = True  # now shares an edge with the block: joined
    assert largest_component(v, "volume").sum() == 6
    with pytest.raises(ValueError, match="mode"):
        largest_component(v, "both")


def test_rv_removed_only_on_slices_without_lv_and_myo() -> None:
    vol = heart()
    vol[0, 14:18, 2:6] = RV  # basal slice: RV only -> removed
    vol[7, 14:18, 2:6] = RV  # apical slice: RV only -> removed
    vol[6][vol[6] == LV] = 0  # slice 6 keeps MYO and RV -> RV stays
    out = remove_rv_without_lv_myo(vol)
    assert not (out[0] == RV).any() and not (out[7] == RV).any()
    assert (out[6] == RV).any() and (out[1:6] == RV).sum() == (vol[1:6] == RV).sum()
    np.testing.assert_array_equal(out[vol != RV], vol[vol != RV])  # nothing else changes


def test_rv_rule_uses_canonical_labels_not_acdc_order() -> None:
    # Canonical: 1 LV, 3 RV. The paper's public code applied the rule with ACDC numbering
    # (1 RV, 3 LV); under that mistake slice 0 would lose its LV and slice 1 keep its RV.
    vol = np.zeros((2, 10, 10), np.uint8)
    vol[0, 2:6, 2:6] = LV  # a slice with only LV (e.g. LV cavity at the apex): untouched
    vol[1, 2:6, 2:6] = RV  # a slice with only RV: the RV goes
    out = remove_rv_without_lv_myo(vol)
    assert (out[0] == LV).sum() == 16, "LV deleted: label 1 treated as RV (ACDC order)"
    assert not (out[1] == RV).any(), "RV kept on a slice without LV/MYO: label 3 treated as LV"
    assert (remove_rv_without_lv_myo(np.where(vol == RV, MYO, vol)) == MYO).sum() == 16


def test_cardiac_postprocess_runs_both_steps() -> None:
    vol = heart()
    vol[7, 28:31, 1:4] = RV  # a lone RV blob on a slice without ventricles, unconnected
    vol[7, 0:2, 0:2] = 0
    out = postprocess(vol, "cardiac")
    assert not (out[7] == RV).any()
    np.testing.assert_array_equal(out[:7], heart()[:7])


def test_lung_tasks_keep_multifocal_lesions() -> None:
    lab = np.zeros((4, 30, 30), np.uint8)
    lab[1:3, 2:8, 2:8] = 1  # left lung lesion
    lab[1:3, 20:27, 20:27] = 1  # right lung lesion (larger): both are real
    lab[3, 15, 15] = 1  # a single-voxel speck
    np.testing.assert_array_equal(postprocess(lab, "lung_binary"), lab)
    cleaned = postprocess(lab, "lung_binary", min_lesion_voxels=5)
    assert cleaned[3, 15, 15] == 0 and cleaned[1, 3, 3] == 1 and cleaned[1, 21, 21] == 1
    multi = lab.copy()
    multi[2, 4, 4] = 2  # a one-voxel consolidation speck inside the ground glass
    out = postprocess(multi, "lung_multiclass", min_lesion_voxels=5)
    assert out[2, 4, 4] == 0 and out[1, 3, 3] == 1
    with pytest.raises(UnknownNameError, match="cardiac"):
        postprocess(lab, "brain")
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        postprocess(lab[0], "cardiac")


def test_heart_column_keeps_a_motion_shifted_slice_and_drops_a_blob_elsewhere() -> None:
    vol = heart()
    shifted = vol.copy()
    # Slice 6 shifted by breathing: 2 px in-plane, and slice 5 emptied so it no longer joins
    # the stack in 3D. It still lies in the heart's column, so it stays.
    shifted[5] = 0
    shifted[6] = np.roll(vol[6], 2, axis=1)
    shifted[3, 28:31, 0:3] = LV  # an LV blob outside the column: removed
    out = keep_heart_column(shifted, (LV, MYO), margin_px=3)
    np.testing.assert_array_equal(out[6], shifted[6])
    assert not (out[3, 28:31, 0:3] == LV).any()
    # The 3D largest-component rule drops the shifted slice's LV: what this rule is for.
    assert not (keep_largest_per_class(shifted, [LV], slice_wise=False)[6] == LV).any()
    # Elsewhere in the field (the margin does not reach): not in the column.
    assert not (keep_heart_column(shifted, (LV,), margin_px=0)[3] == LV)[28:31, 0:3].any()


def test_a_motion_ghost_with_a_larger_cavity_does_not_take_the_lv_from_the_heart() -> None:
    # Severe motion: the network segments a ghost copy of the heart (cavity in a MYO ring)
    # with a larger LV than the true one, whose myocardium is larger on all slices together.
    vol = heart(size=64)
    ghost = np.zeros_like(vol)
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 50, xx - 48)
    ghost[2:6][:, r < 9] = MYO
    ghost[2:6][:, r < 7] = LV
    noisy = np.where(ghost > 0, ghost, vol)
    assert ((noisy == LV) & (ghost == LV)).sum() > (vol == LV).sum()  # the ghost's cavity is larger
    labelled, sizes = _components(noisy == LV)
    per_structure = keep_heart_column(noisy, (LV, MYO), anchor="enclosed")
    assert not (per_structure[vol == LV] == LV).any()  # the old anchor took the ghost's LV
    out = keep_heart_column(noisy, (LV, MYO))
    np.testing.assert_array_equal(out == LV, vol == LV)
    np.testing.assert_array_equal(out == MYO, vol == MYO)
    region = heart_region(noisy)
    assert region[16, 18] and not region[50, 48]


def test_rv_beside_the_heart_wins_over_a_larger_rv_blob_elsewhere() -> None:
    vol = heart()
    noisy = vol.copy()
    noisy[1:7, 26:32, 24:32] = RV  # a false RV blob (288 voxels) away from the heart: larger than the RV
    assert (noisy == RV).sum() > 2 * (vol == RV).sum()
    out = cardiac_postprocess(noisy)
    np.testing.assert_array_equal(out, vol)
    # The paper's rule keeps the largest RV, i.e. the false one, and drops the true RV.
    paper = paper_cardiac_postprocess(noisy)
    assert (paper[1:7, 26:32, 24:32] == RV).all() and not (paper[vol == RV] == RV).any()
    # With no RV component near the heart, the largest RV component is kept.
    alone = noisy.copy()
    alone[vol == RV] = 0
    np.testing.assert_array_equal(keep_rv_beside_heart(alone), alone)


def test_the_rv_keeps_its_motion_shifted_pieces_in_its_column() -> None:
    vol = heart()
    shifted = vol.copy()
    # Slice 4 loses its RV and slice 5's RV moves 2 px up (a breath-hold of its own): the
    # RV is now two 3D pieces, both beside the heart, both in the RV's column.
    shifted[4][shifted[4] == RV] = 0
    rv5 = shifted[5] == RV
    shifted[5][rv5] = 0
    shifted[5][np.roll(rv5, -2, axis=0) & (shifted[5] == 0)] = RV
    labelled, sizes = _components(shifted == RV)
    assert len(sizes) - 1 == 2
    out = keep_rv_beside_heart(shifted)
    np.testing.assert_array_equal(out == RV, shifted == RV)
    # Keeping the anchor alone (the previous rule) deletes the shifted slice's RV.
    assert not (keep_rv_beside_heart(shifted, column_px=0)[5] == RV).any()


def test_cardiac_postprocess_leaves_a_clean_heart_and_its_input_alone() -> None:
    vol = heart()
    before = vol.copy()
    np.testing.assert_array_equal(cardiac_postprocess(vol), vol)
    np.testing.assert_array_equal(vol, before)
    empty = np.zeros((3, 8, 8), np.uint8)
    np.testing.assert_array_equal(cardiac_postprocess(empty), empty)


def test_lv_anchor_is_the_cavity_the_myocardium_encloses_not_a_larger_blob() -> None:
    vol = heart(size=48)
    noisy = vol.copy()
    # A false LV blob (a bright vessel or the stomach) away from the heart, three times the
    # cavity's size, half wrapped in false MYO: the largest LV component, but not a cavity.
    noisy[1:7, 34:46, 30:42] = LV
    noisy[1:7, 33, 30:42] = MYO
    noisy[1:7, 34:46, 29] = MYO
    assert (noisy == LV).sum() > 2 * (vol == LV).sum()
    lv = noisy == LV
    from robustseg.engine.postprocess import _components

    labelled, sizes = _components(lv)
    anchor = enclosed_lv_component(noisy, labelled, sizes)
    assert labelled[3, 16, 18] == anchor  # the cavity's component
    out = cardiac_postprocess(noisy)
    np.testing.assert_array_equal(out == LV, vol == LV)
    # The largest-component anchor keeps the blob and deletes the true cavity.
    largest = keep_heart_column(noisy, (LV,), anchor="largest")
    assert not (largest[vol == LV] == LV).any() and (largest[3, 40, 36] == LV)
    with pytest.raises(ValueError, match="anchor must be"):
        keep_heart_column(noisy, (LV,), anchor="biggest")
