"""Input guards shared by `predict` and the Serve endpoint: is this file a scan at all?

A folder of NIfTI files often holds the ground truth beside the scans (``*_gt.nii.gz``,
``*_seg.nii.gz``), and a mask written by an earlier ``predict`` lands next to its scan.
Segmenting such a label map "works" and produces nonsense, so both entry points ask
`label_map_reason` first and skip (predict) or refuse (serve) unless forced.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

#: File-name stems that mark label maps (before the extension): ``001_SA_ED_gt``, ``case_seg``.
LABEL_NAME = re.compile(r"(?:^|[_\-.])(gt|seg|label|labels|mask|masks)$", re.IGNORECASE)

#: Values a canonical label map may hold (background, LV, MYO, RV; binary lung masks use 0/1).
LABEL_VALUES = (0, 1, 2, 3)

_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".h5", ".hdf5", ".png", ".jpg", ".jpeg")


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


#: How a command-line user overrides the guard (Serve passes its own: ``?force=true``).
CLI_HINT = "pass --force to segment it anyway"


def label_map_reason(name: Optional[str], array: Optional[np.ndarray] = None, *,
                     hint: str = CLI_HINT) -> Optional[str]:
    """Why ``name``/``array`` looks like a label map rather than a scan, or None if it does not.

    Args:
        name: File name (or path) as given by the user; None to check the values only.
        array: The decoded voxels, when already read; None to check the name only.
        hint: How the caller's user overrides the check, appended to the reason.

    Returns:
        A short reason a user can act on (it names the rule that matched), or None.
    """
    if name and LABEL_NAME.search(_stem(name)):
        return f"its name marks a label map ('{_stem(name)}'); {hint}"
    if array is not None and array.size and _only_label_values(array):
        values = sorted(int(v) for v in np.unique(array))
        return f"its voxels hold only the label values {values}, as a segmentation does, not a scan; {hint}"
    return None


def _only_label_values(array: np.ndarray) -> bool:
    """Whether every voxel is one of `LABEL_VALUES` (cheap min/max test first)."""
    if array.dtype.kind not in "biuf":
        return False
    lo, hi = array.min(), array.max()
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > max(LABEL_VALUES) or lo == hi:
        return False
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        return False
    return True
