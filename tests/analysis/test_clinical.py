"""Clinical indices on synthetic ellipsoids of known volume."""
from __future__ import annotations

import math

import numpy as np
import pytest

from robustseg.analysis.clinical import cardiac_function, structure_volumes_ml
from robustseg.data.labels import LV, MYO, RV


def ellipsoid(shape_zyx, spacing_xyz, centre_mm_xyz, semi_axes_mm_xyz) -> np.ndarray:
    """Boolean ellipsoid sampled at voxel centres of a (Z, Y, X) grid with (x, y, z) spacing."""
    sx, sy, sz = spacing_xyz
    zz, yy, xx = np.mgrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]].astype(float)
    (cx, cy, cz), (ax, ay, az) = centre_mm_xyz, semi_axes_mm_xyz
    return ((xx * sx - cx) / ax) ** 2 + ((yy * sy - cy) / ay) ** 2 + ((zz * sz - cz) / az) ** 2 <= 1.0


def ellipsoid_ml(semi_axes_mm) -> float:
    return 4.0 / 3.0 * math.pi * np.prod(semi_axes_mm) / 1000.0


SP = (1.0, 1.0, 2.0)  # x, y, z mm
SHAPE = (40, 64, 96)  # z, y, x


def heart_phase(lv_axes, myo_thickness=4.0, rv_axes=(10.0, 14.0, 24.0), spacing=SP, shape=SHAPE) -> np.ndarray:
    """LV ellipsoid in a MYO shell, RV ellipsoid beside them (canonical labels)."""
    centre = (32.0, 32.0, 40.0)
    outer = tuple(a + myo_thickness for a in lv_axes)
    lab = np.zeros(shape, np.uint8)
    lab[ellipsoid(shape, spacing, centre, outer)] = MYO
    lab[ellipsoid(shape, spacing, centre, lv_axes)] = LV
    rv = ellipsoid(shape, spacing, (centre[0] + outer[0] + rv_axes[0] + 2, centre[1], centre[2]), rv_axes)
    lab[rv & (lab == 0)] = RV
    return lab


def test_structure_volumes_match_ellipsoid_volume() -> None:
    axes = (20.0, 15.0, 30.0)
    lab = ellipsoid(SHAPE, SP, (32.0, 32.0, 40.0), axes).astype(np.uint8) * LV
    vols = structure_volumes_ml(lab, SP, {LV: "LV", RV: "RV"})
    assert vols[LV] == pytest.approx(ellipsoid_ml(axes), rel=0.02)
    assert vols[RV] == 0.0
    # The same ellipsoid on a coarser, anisotropic grid gives the same volume.
    sp2 = (1.5, 1.25, 5.0)
    lab2 = ellipsoid((16, 52, 64), sp2, (32.0, 32.0, 40.0), axes).astype(np.uint8)
    assert structure_volumes_ml(lab2, sp2, [1])[1] == pytest.approx(ellipsoid_ml(axes), rel=0.03)
    with pytest.raises(ValueError, match="spacing"):
        structure_volumes_ml(lab, (1.0, 0.0, 2.0), [1])


def test_cardiac_function_formulas() -> None:
    ed = heart_phase(lv_axes=(18.0, 18.0, 30.0))
    es = heart_phase(lv_axes=(12.0, 12.0, 24.0), rv_axes=(7.0, 10.0, 20.0))
    f = cardiac_function(ed, es, SP, SP)
    assert f["units"] == "mL" and f["flags"] == []
    assert f["lv_edv"] == pytest.approx(ellipsoid_ml((18, 18, 30)), rel=0.02)
    assert f["lv_esv"] == pytest.approx(ellipsoid_ml((12, 12, 24)), rel=0.03)
    assert f["lv_sv"] == pytest.approx(f["lv_edv"] - f["lv_esv"])
    assert f["lv_ef"] == pytest.approx(100 * (f["lv_edv"] - f["lv_esv"]) / f["lv_edv"])
    true_ef = 100 * (1 - ellipsoid_ml((12, 12, 24)) / ellipsoid_ml((18, 18, 30)))
    assert f["lv_ef"] == pytest.approx(true_ef, abs=2.0)
    assert f["rv_ef"] == pytest.approx(100 * (f["rv_edv"] - f["rv_esv"]) / f["rv_edv"])
    myo_ml = ellipsoid_ml((22, 22, 34)) - ellipsoid_ml((18, 18, 30))
    assert f["myo_volume_ed"] == pytest.approx(myo_ml, rel=0.05)
    assert f["myo_mass_ed"] == pytest.approx(1.05 * f["myo_volume_ed"])


def test_phases_on_different_grids() -> None:
    sp_es = (1.25, 1.25, 4.0)
    ed = heart_phase(lv_axes=(18.0, 18.0, 30.0))
    es = heart_phase(lv_axes=(18.0, 18.0, 30.0), spacing=sp_es, shape=(20, 52, 78))
    f = cardiac_function(ed, es, SP, sp_es)
    assert f["lv_ef"] == pytest.approx(0.0, abs=3.0)


def test_quality_flags() -> None:
    ed = heart_phase(lv_axes=(18.0, 18.0, 30.0))
    es = heart_phase(lv_axes=(12.0, 12.0, 24.0))
    es[es == RV] = 0  # RV missed at ES
    es[0, 0:3, 0:3] = LV  # a stray LV island at ES
    f = cardiac_function(ed, es, SP, SP)
    assert "RV empty at ES" in f["flags"]
    assert "LV has 2 components at ES" in f["flags"]
    assert f["rv_ef"] == 100.0  # ESV 0: in range, but the empty-RV flag says not to trust it
    # EDV zero: EF undefined (NaN) and flagged.
    h = cardiac_function(np.where(ed == RV, 0, ed).astype(np.uint8), es, SP, SP)
    assert math.isnan(h["rv_ef"]) and "RV empty at ED" in h["flags"]
    assert "RV EF undefined (EDV is zero)" in h["flags"]
    # ESV larger than EDV: a swapped phase pair gives a negative EF.
    g = cardiac_function(es, ed, SP, SP)
    assert g["lv_ef"] < 0 and any(fl.startswith("LV EF outside") for fl in g["flags"])


def test_unknown_spacing_reports_voxels() -> None:
    ed = heart_phase(lv_axes=(18.0, 18.0, 30.0))
    es = heart_phase(lv_axes=(12.0, 12.0, 24.0))
    known = cardiac_function(ed, es, SP, SP)
    f = cardiac_function(ed, es, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), spacing_known=False)
    assert f["units"] == "voxels" and f["lv_edv"] == float((ed == LV).sum())
    assert math.isnan(f["myo_mass_ed"])
    assert f["lv_ef"] == pytest.approx(known["lv_ef"])  # a ratio: valid without millimetres
    assert any("spacing unknown" in fl for fl in f["flags"])
    with pytest.raises(ValueError, match="not comparable"):
        cardiac_function(ed, es, (1.0, 1.0, 1.0), (1.0, 1.0, 2.0), spacing_known=False)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        cardiac_function(ed[0], es, SP, SP)
