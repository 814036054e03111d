"""Cardiac anatomy checks shared by tests (importable: pytest's pythonpath includes tests/)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

from robustseg.data.labels import LV, MYO, RV


def ring_slice(shape: Tuple[int, int] = (32, 28)) -> np.ndarray:
    """A short-axis slice in ACDC values: LV disc (3) inside a MYO ring (2), RV (1) beside."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r = np.hypot(yy - 16, xx - 16)
    sl = np.zeros(shape, np.uint8)
    sl[r < 8] = 2
    sl[r < 5] = 3
    sl[(np.hypot(yy - 16, xx - 4) < 4) & (r >= 8)] = 1
    return sl


def lv_ring_stats(label: np.ndarray) -> Optional[Tuple[bool, float, float]]:
    """Anatomy of canonical labels on mid-ventricular slices.

    Returns (LV centroid inside MYO's bounding box on every slice, mean fraction of a 2-pixel
    ring around the LV that is MYO, largest fraction of that ring that is RV), or None when
    no slice has both LV and MYO. With ACDC/M&Ms conventions swapped, the "LV" is the RV:
    its ring is mostly background (MYO fraction < 0.5 on the real data), so this catches it.
    """
    slices = [z for z in range(label.shape[0]) if (label[z] == LV).sum() > 20 and (label[z] == MYO).sum() > 20]
    if not slices:
        return None
    mid = slices[len(slices) // 4 : max(3 * len(slices) // 4, len(slices) // 4 + 1)]
    inside, myo_frac, rv_frac = True, [], []
    for z in mid:
        lv = label[z] == LV
        cy, cx = ndimage.center_of_mass(lv)
        ys, xs = np.nonzero(label[z] == MYO)
        inside &= bool(ys.min() <= cy <= ys.max() and xs.min() <= cx <= xs.max())
        ring = ndimage.binary_dilation(lv, iterations=2) & ~lv
        myo_frac.append(float((label[z][ring] == MYO).mean()))
        rv_frac.append(float((label[z][ring] == RV).mean()))
    return inside, float(np.mean(myo_frac)), max(rv_frac)


def assert_lv_inside_myo(label: np.ndarray, where: str) -> None:
    """Fail unless canonical LV sits inside the MYO ring with RV outside it."""
    stats = lv_ring_stats(label)
    assert stats is not None, f"{where}: no slice with both LV and MYO"
    inside, myo_frac, rv_frac = stats
    assert inside, f"{where}: LV centroid outside MYO bounding box"
    assert myo_frac > 0.8, f"{where}: only {myo_frac:.2f} of the LV's rim is MYO (convention swapped?)"
    assert rv_frac < 0.1, f"{where}: RV touches the LV ({rv_frac:.2f} of its rim)"
