"""The `Case` record every source produces and every plan consumes, and its validation.

Array layout is numpy/SimpleITK order ``(Z, Y, X)``; geometry is SimpleITK order: ``spacing``
and ``origin`` as ``(x, y, z)`` and ``direction`` as a row-major 3x3 tuple. A 2D slice is a
volume with Z = 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np

from robustseg.data.labels import TASK_CLASS_NAMES, label_values
from robustseg.errors import DataError

IDENTITY_DIRECTION: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
MOTION_UNKNOWN = -1


@dataclass
class Case:
    """One image volume (and optional label) with its geometry and provenance.

    Attributes:
        case_id: Unique id within a prepared dataset (e.g. "acdc_patient001_ED").
        subject_id: Grouping key for folds: a subject's phases and motion levels share it.
        image: float32 array ``(Z, Y, X)``.
        label: uint8 canonical labels ``(Z, Y, X)`` or None for unlabelled data.
        spacing: Voxel size in mm ``(x, y, z)``.
        origin: World position of voxel 0 ``(x, y, z)``.
        direction: Row-major 3x3 direction cosines.
        spacing_known: False when the source stores no spacing (ACDC h5): metrics are then
            in pixels and resampling is skipped.
        modality: "MR" or "CT".
        task: Canonical label set ("cardiac", "lung_binary", "lung_multiclass").
        phase: "ED", "ES" or "" when not a cardiac phase.
        motion_level: Respiratory motion level 0-3 (CMRxMotion grading), -1 if unknown.
        dataset: Source dataset name ("acdc", "mnms2", "synthetic", ...).
        source_path: File the image came from (named in errors and kept for provenance).
        meta: Free-form extra provenance (original label convention, original size, ...).
    """

    case_id: str
    subject_id: str
    image: np.ndarray
    label: Optional[np.ndarray] = None
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = IDENTITY_DIRECTION
    spacing_known: bool = True
    modality: str = "MR"
    task: str = "cardiac"
    phase: str = ""
    motion_level: int = MOTION_UNKNOWN
    dataset: str = ""
    source_path: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> Tuple[int, ...]:
        """Array shape ``(Z, Y, X)``."""
        return tuple(self.image.shape)

    @property
    def labelled(self) -> bool:
        """Whether the case carries a label."""
        return self.label is not None

    def with_arrays(self, image: np.ndarray, label: Optional[np.ndarray], **changes: Any) -> "Case":
        """A copy with new arrays (and any other field changes)."""
        return replace(self, image=image, label=label, **changes)

    def geometry(self) -> Dict[str, Any]:
        """Geometry as a JSON-ready dict (recorded in plans and manifests)."""
        return {
            "shape_zyx": [int(s) for s in self.image.shape],
            "spacing": [float(s) for s in self.spacing],
            "origin": [float(o) for o in self.origin],
            "direction": [float(d) for d in self.direction],
            "spacing_known": bool(self.spacing_known),
        }


def validate_case(case: Case) -> Case:
    """Check a case before it is preprocessed, raising on the first problem.

    Checks: 3D array, non-empty, finite, not constant, label shape and values, geometry
    sanity. Every error names the case's source file.

    Returns:
        The same case, with image cast to float32 and label to uint8.

    Raises:
        DataError: naming ``case.source_path`` (or the case id) and the problem.
    """
    where = case.source_path or case.case_id
    img = np.asarray(case.image)
    if img.ndim != 3:
        raise DataError(where, f"image must be 3D (Z, Y, X) after reading, got {img.ndim}D shape {img.shape}")
    if img.size == 0 or min(img.shape) == 0:
        raise DataError(where, f"image is empty (shape {img.shape})")
    if not np.issubdtype(img.dtype, np.number):
        raise DataError(where, f"image has non-numeric dtype {img.dtype}")
    img = img.astype(np.float32, copy=False)
    if not np.all(np.isfinite(img)):
        n_bad = int((~np.isfinite(img)).sum())
        raise DataError(where, f"image contains {n_bad} NaN or infinite values")
    if float(img.max()) == float(img.min()):
        raise DataError(where, f"image is constant (every voxel = {float(img.min())}): empty volume")
    if len(case.spacing) != 3 or any((not np.isfinite(s)) or s <= 0 for s in case.spacing):
        raise DataError(where, f"invalid voxel spacing {tuple(case.spacing)}")
    if len(case.direction) != 9:
        raise DataError(where, f"direction must have 9 entries, got {len(case.direction)}")
    if case.task not in TASK_CLASS_NAMES:
        raise DataError(where, f"unknown task {case.task!r}; valid: {sorted(TASK_CLASS_NAMES)}")
    label = case.label
    if label is not None:
        label = np.asarray(label)
        if label.shape != img.shape:
            raise DataError(where, f"image shape {img.shape} and label shape {label.shape} differ")
        n_classes = len(TASK_CLASS_NAMES[case.task])
        if label.dtype.kind not in "iub":
            raise DataError(where, f"label must hold integers, got dtype {label.dtype}")
        values = label_values(label)
        bad = [int(v) for v in values if v < 0 or v >= n_classes]
        if bad:
            raise DataError(where, f"label values {bad} are not canonical {case.task} labels (0..{n_classes - 1})")
        label = label.astype(np.uint8, copy=False)
    return replace(case, image=img, label=label)


def check_unique_ids(cases: "list[Case]") -> None:
    """Raise if two cases share a case id (the shards would silently overwrite one)."""
    seen: Dict[str, str] = {}
    for c in cases:
        if c.case_id in seen:
            raise DataError(
                c.source_path or c.case_id,
                f"duplicate case id {c.case_id!r} (also produced by {seen[c.case_id]})",
            )
        seen[c.case_id] = c.source_path or c.case_id
