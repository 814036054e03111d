"""Pieces every plan shares: intensity normalisation, choosing the crop centre, assembling
the preprocessed case with its inversion record, and inverting that record.

Plans do not inherit from each other; they call these functions.

Record layout (every plan; plan-specific sections are added by the plan):

* ``plan``, ``version``: the plan that made it.
* ``original``: the input geometry (`Case.geometry`: shape_zyx, spacing, origin, direction,
  spacing_known).
* ``resample``: `InplaneGrid.to_record` (applied, reason, in/out shape and spacing, shift).
* ``resampled``: ``shape_zyx`` and world ``origin`` of the resampled, uncropped volume.
* ``crop``: ``start_yx`` (window origin in the resampled grid; negative = padding),
  ``size_yx``, ``pad_value`` of the image.
* ``centre``: ``source`` (given / label / lung / body / image), ``yx_original``,
  ``yx_resampled``.
* ``foreground_voxels``, ``foreground_voxels_lost``, ``foreground_fraction_lost``: label
  voxels (resampled grid) and how many the crop removed; 0 lost => inversion is exact
  whenever the resampling round trip is (see `geometry`).
* ``output``: ``shape_zyx``, ``spacing``, ``origin`` of the preprocessed case.
* ``intensity``: clip values and normalisation statistics.
* ``warnings``: list of strings a caller should show.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import numpy as np
import SimpleITK as sitk

from robustseg.data.cases import Case
from robustseg.data.preprocess.geometry import (
    InplaneGrid,
    crop_or_pad,
    crop_start,
    grid_to_spacing,
    identity_grid,
    resample_inplane,
    shifted_origin,
    uncrop,
)
from robustseg.errors import DataError

T = TypeVar("T")

# Below this the data are constant for practical purposes: dividing would blow up noise.
_MIN_SCALE = 1e-8


def normalisation_stats(values: np.ndarray, method: str) -> Dict[str, Any]:
    """Statistics of ``values`` for z-score or min-max normalisation.

    Args:
        values: The voxels the statistics are computed on (any shape).
        method: "zscore" or "minmax".

    Returns:
        ``{"method", "mean", "std"}`` or ``{"method", "min", "max"}``; a degenerate scale is
        replaced by 1 and flagged with ``"degenerate": True``.
    """
    v = np.asarray(values)
    if method == "zscore":
        # float64 accumulators without a float64 copy of a whole CT volume.
        mean, std = (float(v.mean(dtype=np.float64)), float(v.std(dtype=np.float64))) if v.size else (0.0, 1.0)
        out: Dict[str, Any] = {"method": method, "mean": mean, "std": std}
        if std < _MIN_SCALE:
            out.update(std=1.0, degenerate=True)
        return out
    if method == "minmax":
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        out = {"method": method, "min": lo, "max": hi}
        if hi - lo < _MIN_SCALE:
            out.update(max=lo + 1.0, degenerate=True)
        return out
    raise ValueError(f"unknown normalization {method!r}; valid: zscore, minmax")


def normalise(image: np.ndarray, stats: Dict[str, Any]) -> np.ndarray:
    """Apply `normalisation_stats` output to ``image``; returns float32."""
    if stats["method"] == "zscore":
        return ((image - stats["mean"]) / stats["std"]).astype(np.float32)
    return ((image - stats["min"]) / (stats["max"] - stats["min"])).astype(np.float32)


def require_modality(case: Case, modality: str, plan_name: str) -> Case:
    """Return ``case`` if it has ``modality``, else stop: a plan's intensity steps assume it.

    Raises:
        DataError: naming the case's file, its modality and the plan.
    """
    if case.modality != modality:
        raise DataError(
            case.source_path or case.case_id,
            f"plan {plan_name!r} expects {modality} images, got modality {case.modality!r}",
        )
    return case


def choose_grid(case: Case, target_xy: Optional[Sequence[float]]) -> InplaneGrid:
    """The in-plane grid for ``case``: ``target_xy`` unless spacing is unknown or no target is set."""
    shape_yx, spacing_xy = case.shape[1:], case.spacing[:2]
    if not case.spacing_known:
        return identity_grid(shape_yx, spacing_xy, "spacing unknown (spacing_known=False)")
    if target_xy is None:
        return identity_grid(shape_yx, spacing_xy, "target_spacing is null")
    return grid_to_spacing(shape_yx, spacing_xy, target_xy)


def resample_case(case: Case, grid: InplaneGrid) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resample image (3rd-order B-spline) and label (nearest) onto ``grid``."""
    image = resample_inplane(case.image.astype(np.float32, copy=False), grid, sitk.sitkBSpline)
    label = None if case.label is None else resample_inplane(case.label, grid, sitk.sitkNearestNeighbor)
    return image, label


def choose_centre(
    case: Case, grid: InplaneGrid, given_yx: Optional[Sequence[float]], candidates: Sequence[Tuple[str, Optional[Tuple[float, float]]]]
) -> Dict[str, Any]:
    """Pick the crop centre: the given one, else the first available candidate, else the image centre.

    Args:
        case: The original case (its shape gives the image centre).
        grid: The resampling grid, to map the centre into the resampled grid.
        given_yx: Caller's centre in the ORIGINAL voxel grid (e.g. a predicted heart centre).
        candidates: ``(source_name, centre_yx or None)`` in order of preference, original grid.

    Returns:
        The ``record["centre"]`` dict.
    """
    where = case.source_path or case.case_id
    if given_yx is not None:
        if len(given_yx) != 2 or not all(np.isfinite(float(v)) for v in given_yx):
            raise DataError(where, f"centre_yx must be two finite numbers (y, x), got {given_yx!r}")
        source, yx = "given", (float(given_yx[0]), float(given_yx[1]))
    else:
        source, yx = "image", ((case.shape[1] - 1) / 2.0, (case.shape[2] - 1) / 2.0)
        for name, c in candidates:
            if c is not None:
                source, yx = name, (float(c[0]), float(c[1]))
                break
    ry, rx = grid.to_out_index(yx)
    return {"source": source, "yx_original": [yx[0], yx[1]], "yx_resampled": [float(ry), float(rx)]}


def assemble(
    case: Case,
    plan: Any,
    grid: InplaneGrid,
    image_r: np.ndarray,
    label_r: Optional[np.ndarray],
    centre: Dict[str, Any],
    size_yx: Sequence[int],
    pad_value: float,
) -> Tuple[Case, Dict[str, Any]]:
    """Crop/pad the resampled arrays around ``centre`` and build the output case and base record.

    Args:
        case: The original case.
        plan: The plan (for ``name`` and ``version``).
        grid: The in-plane grid used.
        image_r: Resampled, normalised image ``(Z, Y', X')``.
        label_r: Resampled label or None.
        centre: From `choose_centre` (its ``yx_resampled`` places the window).
        size_yx: Output in-plane size.
        pad_value: Image value of padded voxels.

    Returns:
        ``(preprocessed case, record)``; the plan adds ``intensity`` and its own sections.
    """
    size = (int(size_yx[0]), int(size_yx[1]))
    start = crop_start(centre["yx_resampled"], size)
    image = crop_or_pad(image_r, start, size, pad_value).astype(np.float32, copy=False)
    label, fg, lost = None, 0, 0
    if label_r is not None:
        label = crop_or_pad(label_r, start, size, 0).astype(np.uint8, copy=False)
        fg = int(np.count_nonzero(label_r))
        lost = fg - int(np.count_nonzero(label))
    (tx, ty), (hx, hy) = grid.out_spacing_xy, grid.shift_xy_mm
    spacing = (tx, ty, float(case.spacing[2]))
    origin_r = shifted_origin(case.origin, case.direction, (hx, hy, 0.0))
    origin = shifted_origin(origin_r, case.direction, (start[1] * tx, start[0] * ty, 0.0))
    record: Dict[str, Any] = {
        "plan": plan.name,
        "version": int(plan.version),
        "original": case.geometry(),
        "resample": grid.to_record(),
        "resampled": {"shape_zyx": [int(s) for s in image_r.shape], "origin": list(origin_r)},
        "crop": {"start_yx": [int(start[0]), int(start[1])], "size_yx": list(size), "pad_value": float(pad_value)},
        "centre": centre,
        "foreground_voxels": fg,
        "foreground_voxels_lost": lost,
        "foreground_fraction_lost": float(lost / fg) if fg else 0.0,
        "output": {"shape_zyx": [int(s) for s in image.shape], "spacing": list(spacing), "origin": list(origin)},
        "warnings": [],
    }
    if lost:
        record["warnings"].append(f"crop {list(size)} removed {lost} of {fg} foreground voxels")
    meta = dict(case.meta)
    meta["preprocess"] = {
        "plan": plan.name,
        "version": int(plan.version),
        "original_shape_zyx": record["original"]["shape_zyx"],
        "original_spacing": record["original"]["spacing"],
        "resampled": grid.applied,
    }
    out = case.with_arrays(image, label, spacing=spacing, origin=origin, meta=meta)
    return out, record


def _check_output_shape(array: np.ndarray, record: Dict[str, Any], what: str, channel_first: bool) -> None:
    expected = list(record["output"]["shape_zyx"])
    got = list(array.shape[1:] if channel_first else array.shape)
    if got != expected:
        raise DataError(f"invert_{what}", f"{what} shape {got} does not match the preprocessed shape {expected} in the record")


def invert_label(label_zyx: np.ndarray, record: Dict[str, Any]) -> np.ndarray:
    """Map a label in preprocessed space back onto the original grid.

    Undoes the crop/pad (cropped-away voxels become background), then resamples back with
    nearest neighbour. Exact when the crop lost no foreground and the in-plane spacing was
    kept or up-sampled; bounded (not exact) after down-sampling, see `geometry`.

    Args:
        label_zyx: Integer labels ``(Z, size_y, size_x)`` in preprocessed space.
        record: The record `preprocess` returned for this case.

    Returns:
        uint8 labels with the original shape ``(Z, Y, X)``.
    """
    _check_output_shape(label_zyx, record, "label", channel_first=False)
    grid = InplaneGrid.from_record(record["resample"])
    full = uncrop(np.asarray(label_zyx).astype(np.uint8, copy=False), record["crop"]["start_yx"], grid.out_shape_yx, 0)
    return resample_inplane(full, grid, sitk.sitkNearestNeighbor, inverse=True)


def invert_probabilities(probs_czyx: np.ndarray, record: Dict[str, Any], background: int = 0) -> np.ndarray:
    """Map class probabilities ``(C, Z, size_y, size_x)`` back onto the original grid.

    Voxels the crop removed get probability 1 for ``background``; each channel is then
    resampled linearly (a convex combination, so the channels still sum to 1). The caller
    takes the argmax.

    Args:
        probs_czyx: Probabilities in preprocessed space.
        record: The record `preprocess` returned for this case.
        background: Channel that owns the cropped-away voxels.

    Returns:
        float32 ``(C, Z, Y, X)`` on the original grid.
    """
    _check_output_shape(probs_czyx, record, "probabilities", channel_first=True)
    grid = InplaneGrid.from_record(record["resample"])
    start = record["crop"]["start_yx"]
    out = []
    for c in range(probs_czyx.shape[0]):
        full = uncrop(np.asarray(probs_czyx[c], dtype=np.float32), start, grid.out_shape_yx, 1.0 if c == background else 0.0)
        out.append(resample_inplane(full, grid, sitk.sitkLinear, inverse=True))
    return np.stack(out)


def plan_to_dict(plan: Any) -> Dict[str, Any]:
    """``{"name", "version", "params"}`` of a plan, for ``plan.json``."""
    return {"name": plan.name, "version": int(plan.version), "params": dataclasses.asdict(plan.params)}


def invertible(cls: Type[T]) -> Type[T]:
    """Class decorator giving a plan the methods every plan shares.

    Inversion depends only on the record (which stores the grid and the crop window), so
    ``invert_label``, ``invert_probabilities`` and ``to_dict`` are the functions above; the
    decorator attaches them instead of a base class.
    """
    cls.invert_label = staticmethod(invert_label)  # type: ignore[attr-defined]
    cls.invert_probabilities = staticmethod(invert_probabilities)  # type: ignore[attr-defined]
    cls.to_dict = plan_to_dict  # type: ignore[attr-defined]
    return cls


def json_floats(values: Sequence[float]) -> List[float]:
    """Plain Python floats (numpy scalars are not JSON-serialisable)."""
    return [float(v) for v in values]
