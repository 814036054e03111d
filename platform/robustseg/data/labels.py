"""Label conventions: every source declares how its label values map to canonical ones.

Canonical cardiac labels follow CMRxMotion: 0 background, 1 LV, 2 MYO, 3 RV. ACDC stores
1 RV / 2 MYO / 3 LV, M&Ms and CMRxMotion store 1 LV / 2 MYO / 3 RV. Lung CT: 0 background,
1 infection (binary) or 1 ground-glass opacity / 2 consolidation (multi-class).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping

import numpy as np

from robustseg.errors import DataError, UnknownNameError

CARDIAC_NAMES: Dict[int, str] = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
LUNG_BINARY_NAMES: Dict[int, str] = {0: "background", 1: "infection"}
LUNG_MULTICLASS_NAMES: Dict[int, str] = {0: "background", 1: "ground_glass", 2: "consolidation"}

# Canonical cardiac label values, for code that must name a structure.
LV, MYO, RV = 1, 2, 3


@dataclass(frozen=True)
class LabelConvention:
    """How one source's stored label values map onto a canonical label set.

    Attributes:
        name: Convention name recorded with every case ("acdc", "mnms", ...).
        task: Canonical label set this maps into ("cardiac", "lung_binary", "lung_multiclass").
        mapping: Stored value -> canonical value. Stored values outside it are an error.
    """

    name: str
    task: str
    mapping: Mapping[int, int] = field(default_factory=dict)

    @property
    def class_names(self) -> Dict[int, str]:
        """Canonical class index -> structure name for this convention's task."""
        return TASK_CLASS_NAMES[self.task]

    def to_canonical(self, label: np.ndarray, where: object) -> np.ndarray:
        """Map stored label values to canonical ones.

        Args:
            label: Integer-valued label array (float arrays holding integers are accepted,
                as M&Ms NIfTI files store labels as float64).
            where: The file the label came from, named in errors.

        Returns:
            uint8 array of canonical labels, same shape.

        Raises:
            DataError: non-integer values or values the convention does not know.
        """
        arr = np.asarray(label)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                raise DataError(where, "label contains NaN or infinite values")
            rounded = np.rint(arr)
            if not np.array_equal(rounded, arr):
                raise DataError(where, "label contains non-integer values")
            arr = rounded.astype(np.int64)
        values = label_values(arr)
        unknown = [int(v) for v in values if int(v) not in self.mapping]
        if unknown:
            raise DataError(
                where,
                f"unknown label values {unknown} for the {self.name!r} convention "
                f"(expected {sorted(self.mapping)})",
            )
        lut = np.zeros(max(max(self.mapping), int(values.max(initial=0))) + 1, dtype=np.uint8)
        for src, dst in self.mapping.items():
            lut[src] = dst
        return lut[arr.astype(np.int64)]


def label_values(label: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer label array.

    ``np.bincount`` is used for non-negative values: ``np.unique`` sorts the whole volume and
    was about half of the ACDC read time.
    """
    flat = np.asarray(label).ravel()
    if flat.size == 0:
        return flat[:0].astype(np.int64)
    lo = int(flat.min())
    if lo < 0 or int(flat.max()) > 65535:
        return np.unique(flat).astype(np.int64)
    return np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False)))


TASK_CLASS_NAMES: Dict[str, Dict[int, str]] = {
    "cardiac": CARDIAC_NAMES,
    "lung_binary": LUNG_BINARY_NAMES,
    "lung_multiclass": LUNG_MULTICLASS_NAMES,
}

CONVENTIONS: Dict[str, LabelConvention] = {
    c.name: c
    for c in (
        LabelConvention("canonical_cardiac", "cardiac", {0: 0, 1: 1, 2: 2, 3: 3}),
        LabelConvention("acdc", "cardiac", {0: 0, 1: RV, 2: MYO, 3: LV}),
        LabelConvention("mnms", "cardiac", {0: 0, 1: LV, 2: MYO, 3: RV}),
        LabelConvention("cmrxmotion", "cardiac", {0: 0, 1: LV, 2: MYO, 3: RV}),
        # COVID-SemiSeg infection masks are 0/255 PNGs; 0/1 masks are accepted too.
        LabelConvention("lung_binary", "lung_binary", {0: 0, 1: 1, 255: 1}),
        LabelConvention("lung_multiclass", "lung_multiclass", {0: 0, 1: 1, 2: 2}),
    )
}


def get_convention(name: str) -> LabelConvention:
    """Look up a label convention by name, listing the valid names on failure."""
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise UnknownNameError(f"unknown label convention {name!r}; valid: {sorted(CONVENTIONS)}") from None


def num_classes(task: str) -> int:
    """Number of canonical classes (background included) of a task."""
    return len(TASK_CLASS_NAMES[task])
