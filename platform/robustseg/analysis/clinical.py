"""Clinical indices from cardiac segmentations: volumes, ejection fractions, myocardial mass.

Formulas (SCMR post-processing recommendations, voxel summation):

- volume (mL) = voxel count x voxel volume (mm^3) / 1000, voxel volume = sx * sy * sz;
- stroke volume SV = EDV - ESV; ejection fraction EF (%) = 100 * SV / EDV;
- myocardial mass (g) = 1.05 g/mL x MYO volume at end-diastole.

Voxel summation with the slice thickness (``sz`` as the spacing between slice centres)
matches what clinical tools do on short-axis stacks; it ignores partial volume at the base
and apex, which clinicians handle by contour choice, not a formula.

Unknown spacing (``spacing_known=False``, e.g. ACDC h5 files without geometry): volumes are
returned as voxel counts with ``units = "voxels"``, mass is NaN (grams need millimetres),
and ejection fractions are still computed because they are ratios, provided both phases
share a voxel size (the same acquisition). Nothing is silently reported in mL.

Quality flags (a list of short strings, empty when all is well) mark results a reader should
not trust: a structure that is empty in a phase, a structure split into more than one 3D
component (18-connectivity, as in `robustseg.engine.postprocess`), an EF outside 0-100 %
(ESV larger than EDV) or undefined (EDV zero), and unknown spacing.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Union

import numpy as np
from scipy import ndimage

from robustseg.data.labels import CARDIAC_NAMES, LV, MYO, RV
from robustseg.engine.postprocess import STRUCTURE_3D

MYOCARDIAL_DENSITY_G_PER_ML = 1.05


def _check_spacing(spacing_xyz: Sequence[float]) -> tuple:
    sp = tuple(float(s) for s in spacing_xyz)
    if len(sp) != 3 or any(not math.isfinite(s) or s <= 0 for s in sp):
        raise ValueError(f"spacing must be three positive finite values (x, y, z) in mm, got {tuple(spacing_xyz)}")
    return sp


def structure_volumes_ml(
    label_zyx: np.ndarray,
    spacing_xyz: Sequence[float],
    classes: Union[Iterable[int], Mapping[int, str]],
) -> Dict[int, float]:
    """Volume of each structure in millilitres.

    Args:
        label_zyx: Integer labels ``(Z, Y, X)``.
        spacing_xyz: Voxel size in mm, ``(x, y, z)`` (`Case.spacing`).
        classes: Label values (or a ``{value: name}`` mapping) to measure.

    Returns:
        ``{class: volume_ml}``.

    Raises:
        ValueError: spacing not three positive finite numbers.
    """
    sx, sy, sz = _check_spacing(spacing_xyz)
    counts = np.bincount(np.asarray(label_zyx).ravel().astype(np.intp, copy=False))
    voxel_ml = sx * sy * sz / 1000.0
    return {int(c): float(counts[c] if c < counts.size else 0) * voxel_ml for c in classes}


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=STRUCTURE_3D)[1])


def _ef(edv: float, esv: float) -> float:
    return 100.0 * (edv - esv) / edv if edv > 0 else float("nan")


def cardiac_function(
    ed_label: np.ndarray,
    es_label: np.ndarray,
    spacing_ed: Sequence[float],
    spacing_es: Sequence[float],
    spacing_known: bool = True,
) -> Dict[str, Any]:
    """LV and RV volumes, stroke volumes, ejection fractions and myocardial mass.

    Args:
        ed_label: Canonical cardiac labels (1 LV, 2 MYO, 3 RV) at end-diastole ``(Z, Y, X)``.
        es_label: Canonical labels at end-systole.
        spacing_ed: ED voxel size ``(x, y, z)`` in mm.
        spacing_es: ES voxel size ``(x, y, z)`` in mm.
        spacing_known: False when the spacings are placeholders: volumes are then voxel
            counts, mass is NaN, EF needs equal ED/ES spacings (see the module notes).

    Returns:
        ``lv_edv``, ``lv_esv``, ``lv_sv``, ``lv_ef`` (%), ``rv_edv``, ``rv_esv``, ``rv_sv``,
        ``rv_ef`` (%), ``myo_mass_ed`` (g), ``myo_volume_ed``, ``units`` (``"mL"`` or
        ``"voxels"``, for the volumes) and ``flags`` (list of strings).

    Raises:
        ValueError: invalid spacing, non-3D labels, or, with unknown spacing, ED and ES
            spacings that differ (voxel counts would not be comparable).
    """
    ed, es = np.asarray(ed_label), np.asarray(es_label)
    for name, arr in (("ED", ed), ("ES", es)):
        if arr.ndim != 3:
            raise ValueError(f"{name} label must be (Z, Y, X), got shape {arr.shape}")
    sp_ed, sp_es = _check_spacing(spacing_ed), _check_spacing(spacing_es)
    flags: List[str] = []
    if spacing_known:
        units = "mL"
        vol_ed = structure_volumes_ml(ed, sp_ed, (LV, MYO, RV))
        vol_es = structure_volumes_ml(es, sp_es, (LV, MYO, RV))
    else:
        if not np.allclose(sp_ed, sp_es):
            raise ValueError(
                f"spacing unknown and ED/ES placeholders differ ({sp_ed} vs {sp_es}): voxel counts are not comparable"
            )
        units = "voxels"
        flags.append("spacing unknown: volumes in voxels, no mass")
        vol_ed = structure_volumes_ml(ed, (1000.0, 1.0, 1.0), (LV, MYO, RV))  # 1 voxel = 1 "mL"
        vol_es = structure_volumes_ml(es, (1000.0, 1.0, 1.0), (LV, MYO, RV))

    for phase, arr, vols in (("ED", ed, vol_ed), ("ES", es, vol_es)):
        for c in (LV, MYO, RV):
            name = CARDIAC_NAMES[c]
            if vols[c] == 0:
                flags.append(f"{name} empty at {phase}")
                continue
            n = _components(arr == c)
            if n > 1:
                flags.append(f"{name} has {n} components at {phase}")

    out: Dict[str, Any] = {}
    for key, c in (("lv", LV), ("rv", RV)):
        edv, esv = vol_ed[c], vol_es[c]
        ef = _ef(edv, esv)
        out.update({f"{key}_edv": edv, f"{key}_esv": esv, f"{key}_sv": edv - esv, f"{key}_ef": ef})
        if math.isnan(ef):
            flags.append(f"{key.upper()} EF undefined (EDV is zero)")
        elif not 0.0 <= ef <= 100.0:
            flags.append(f"{key.upper()} EF outside 0-100 % ({ef:.1f})")
    out["myo_volume_ed"] = vol_ed[MYO]
    out["myo_mass_ed"] = MYOCARDIAL_DENSITY_G_PER_ML * vol_ed[MYO] if spacing_known else float("nan")
    out["units"] = units
    out["flags"] = flags
    return out
