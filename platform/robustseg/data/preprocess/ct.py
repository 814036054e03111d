"""Plan ``ct``: lung CT preprocessing after the thesis (§3.2, lung window from §2.1.1).

Steps, in order:

1. Clip to the HU window (``hu_window``, the lung window [-1250, 250] by default).
2. Lung mask on the original grid by a classical method (`lung_mask`). The thesis used a
   pretrained network (JoHof/lungmask); a threshold method needs no weights and is
   deterministic, and the mask is only used for statistics, centring and optional masking.
3. Axial resampling to ``target_spacing`` (x, y), z untouched: 3rd-order B-spline for the
   image (then re-clipped to the window, removing overshoot), nearest neighbour for label
   and lung mask. Skipped (and recorded) when spacing is unknown or the target is null.
4. Z-score with mean and std computed over the lung voxels (thesis §3.2.4). An empty lung
   mask falls back to body statistics, then whole-volume statistics, with a warning.
5. Optionally (``mask_outside_lung``) voxels farther than `LUNG_MARGIN_MM` from the lungs
   are set to the pad value. The margin keeps pleural consolidation, which is denser than
   the lung threshold and so lies partly outside a threshold mask.
6. Crop/pad to ``crop_size`` centred on the lung mask's bounding box (a caller's
   ``centre_yx`` wins; body box, then image centre, when no lung is found). The pad value
   is the normalised low end of the HU window, the darkest value an image can hold.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from robustseg.config import CTPlanConfig
from robustseg.data.cases import Case, validate_case
from robustseg.data.preprocess import _common
from robustseg.data.preprocess.geometry import bbox_centre_yx, resample_inplane
from robustseg.registry import PLANS

BODY_THRESHOLD_HU = -500.0
"""Voxels above this are tissue; the largest such component is the body (not the table air)."""

SECOND_LUNG_MIN_RATIO = 0.1
"""A second lung component is kept only if at least this fraction of the largest: when the two
lungs touch (one component) the runner-up is usually bowel gas or the trachea."""

MIN_LUNG_ML = 0.5
"""Low-HU components smaller than this are never lungs (air pockets, noise)."""

LUNG_MARGIN_MM = 10.0
"""Distance from the lung mask kept by ``mask_outside_lung``."""


# 4-connectivity within a slice, none across slices: 2D operations done in one 3D call.
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def _in_plane_border(labels: np.ndarray) -> np.ndarray:
    """Label values found on the in-plane image border of any slice."""
    edges = (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1])
    return np.unique(np.concatenate([e.ravel() for e in edges]))


def fill_holes_per_slice(mask_zyx: np.ndarray) -> np.ndarray:
    """Fill holes of every axial slice (background not connected to the slice border).

    Args:
        mask_zyx: Boolean mask ``(Z, Y, X)``.

    Returns:
        The filled mask (same as ``binary_fill_holes`` slice by slice, in one labelling pass).
    """
    background, n = ndimage.label(~mask_zyx, structure=_INPLANE)
    is_hole = np.ones(n + 1, dtype=bool)
    is_hole[_in_plane_border(background)] = False
    is_hole[0] = True  # label 0 is the mask itself
    return is_hole[background]


def body_mask(hu_zyx: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """The body: largest 3D component above ``threshold_hu``, holes filled slice by slice.

    Holes are filled per axial slice because in 3D the lungs connect to the outside air
    through the trachea whenever the scan includes the neck.

    Args:
        hu_zyx: CT volume in HU, ``(Z, Y, X)``.
        threshold_hu: Tissue threshold.

    Returns:
        Boolean mask, same shape (all False if nothing is above the threshold).
    """
    labels, n = ndimage.label(hu_zyx > threshold_hu)
    if n == 0:
        return np.zeros(hu_zyx.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return fill_holes_per_slice(labels == int(np.argmax(sizes)))


def _lung_components(
    hu_zyx: np.ndarray, spacing: Sequence[float], threshold_hu: float, min_volume_ml: float
) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    body = body_mask(hu_zyx)
    labels, n = ndimage.label((hu_zyx < threshold_hu) & body)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    # Only the in-plane border counts: scans routinely cut the lungs at the top and bottom.
    sizes[_in_plane_border(labels)] = 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    order = [int(i) for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 0 and sizes[i] * voxel_ml >= min_volume_ml]
    if len(order) == 2 and sizes[order[1]] < SECOND_LUNG_MIN_RATIO * sizes[order[0]]:
        order = order[:1]
    mask = np.isin(labels, order) if order else np.zeros(hu_zyx.shape, dtype=bool)
    # Vessels and nodules are above the threshold: fill them per slice, as holes in the lung.
    mask = fill_holes_per_slice(mask)
    voxels = int(mask.sum())
    info = {"components": len(order), "voxels": voxels, "volume_ml": voxels * voxel_ml, "body_voxels": int(body.sum())}
    return mask, body, info


def lung_mask(hu_zyx: np.ndarray, spacing: Sequence[float], threshold_hu: float = -320.0, min_volume_ml: float = MIN_LUNG_ML) -> np.ndarray:
    """Classical lung mask: low-HU components inside the body, not touching the image side.

    Body = largest component above -500 HU with holes filled per slice; lung candidates =
    voxels below ``threshold_hu`` inside it; components touching the in-plane image border
    are dropped; the largest two are kept (the second only if >= 10 % of the first) and
    their holes filled per slice.

    Args:
        hu_zyx: CT volume in HU, ``(Z, Y, X)``.
        spacing: Voxel size ``(x, y, z)`` in mm (for component volumes).
        threshold_hu: Lung threshold (``data.ct.lung_threshold_hu``).
        min_volume_ml: Components smaller than this are never lungs.

    Returns:
        Boolean mask, same shape; all False when no lung is found.
    """
    return _lung_components(np.asarray(hu_zyx), spacing, threshold_hu, min_volume_ml)[0]


def _outside_margin(mask_zyx: np.ndarray, spacing_xy: Sequence[float], margin_mm: float) -> np.ndarray:
    """Voxels farther than ``margin_mm`` (in-plane) from the mask; whole slices without lung."""
    out = np.ones(mask_zyx.shape, dtype=bool)
    for z in range(mask_zyx.shape[0]):
        if mask_zyx[z].any():
            dist = ndimage.distance_transform_edt(~mask_zyx[z], sampling=(spacing_xy[1], spacing_xy[0]))
            out[z] = dist > margin_mm
    return out


@PLANS.register("ct", params=CTPlanConfig)
@_common.invertible
class CTPlan:
    """Lung CT plan; see the module docstring for the steps.

    ``invert_label``, ``invert_probabilities`` and ``to_dict`` come from `_common.invertible`.

    Args:
        params: The ``data.ct`` config section.
    """

    name = "ct"
    version = 1

    def __init__(self, params: Optional[CTPlanConfig] = None) -> None:
        self.params = params if params is not None else CTPlanConfig()

    def preprocess(self, case: Case, centre_yx: Optional[Sequence[float]] = None) -> Tuple[Case, Dict[str, Any]]:
        """Window, lung-mask, resample, normalise within the lungs and crop/pad one CT.

        Args:
            case: A CT case in HU, original geometry.
            centre_yx: Crop centre ``(y, x)`` in the ORIGINAL voxel grid; overrides the lung box.

        Returns:
            ``(preprocessed case, record)``; besides the common keys the record has
            ``intensity`` (hu_window, stats_region, mean, std), ``lung`` (components,
            voxels, volume_ml, body_voxels; original grid) and ``mask_outside_lung``.

        Raises:
            DataError: an invalid or non-CT case (naming its file), or an invalid ``centre_yx``.
        """
        case = _common.require_modality(validate_case(case), "CT", self.name)
        p = self.params
        lo, hi = (float(v) for v in p.hu_window)
        mask, body, lung_info = _lung_components(case.image, case.spacing, p.lung_threshold_hu, MIN_LUNG_ML)
        windowed = case.with_arrays(np.clip(case.image, lo, hi), case.label)
        grid = _common.choose_grid(case, p.target_spacing)
        image_r, label_r = _common.resample_case(windowed, grid)
        np.clip(image_r, lo, hi, out=image_r)
        lung_r = resample_inplane(mask.astype(np.uint8), grid, sitk.sitkNearestNeighbor).astype(bool)

        warnings: List[str] = []
        region, where = lung_r, "lung"
        if not region.any():
            region, where = resample_inplane(body.astype(np.uint8), grid, sitk.sitkNearestNeighbor).astype(bool), "body"
            if not region.any():
                region, where = np.ones(image_r.shape, dtype=bool), "volume"
            warnings.append(f"no lung found (is the image in HU?): z-score statistics computed over the {where}")
        stats = _common.normalisation_stats(image_r[region], "zscore")
        image_n = _common.normalise(image_r, stats)
        pad_value = float((lo - stats["mean"]) / stats["std"])

        applied = bool(p.mask_outside_lung and lung_r.any())
        if applied:
            image_n[_outside_margin(lung_r, grid.out_spacing_xy, LUNG_MARGIN_MM)] = pad_value
        elif p.mask_outside_lung:
            warnings.append("mask_outside_lung requested but no lung found: image left unmasked")

        candidates = [("lung", bbox_centre_yx(mask)), ("body", bbox_centre_yx(body))]
        centre = _common.choose_centre(case, grid, centre_yx, candidates)
        out, record = _common.assemble(case, self, grid, image_n, label_r, centre, p.crop_size, pad_value)
        record["intensity"] = {"hu_window": [lo, hi], "stats_region": where, **stats}
        record["lung"] = lung_info
        record["mask_outside_lung"] = {"applied": applied, "margin_mm": LUNG_MARGIN_MM}
        record["warnings"].extend(warnings)
        return out, record
