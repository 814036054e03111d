"""Plan ``slices2d``: size normalisation of 2D slices (e.g. 8-bit COVID-SemiSeg CT slices).

These images carry no HU values and no spacing, so there is nothing physical to resample
to: every slice is resized to ``size`` (bilinear image, nearest label) over exactly its own
extent, and normalised per slice (z-score or min-max). No crop, no clipping. The record
keeps the original size, so `invert_label` resizes back to it with nearest neighbour.

Exactness: the inverse always has the original shape. Its values are exact when the
slice was enlarged (or kept) on both axes; after shrinking (most COVID-SemiSeg slices are
270-490 px, larger than 256) thin structures may be lost, see `geometry`.
Volumes with Z > 1 are accepted and treated slice by slice.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from robustseg.config import Slices2DPlanConfig
from robustseg.data.cases import Case, validate_case
from robustseg.data.preprocess import _common
from robustseg.data.preprocess.geometry import grid_to_shape, resample_inplane
from robustseg.registry import PLANS


@PLANS.register("slices2d", params=Slices2DPlanConfig)
@_common.invertible
class Slices2DPlan:
    """2D slice plan; see the module docstring.

    ``invert_label``, ``invert_probabilities`` and ``to_dict`` come from `_common.invertible`.

    Args:
        params: The ``data.slices2d`` config section.
    """

    name = "slices2d"
    version = 1

    def __init__(self, params: Optional[Slices2DPlanConfig] = None) -> None:
        self.params = params if params is not None else Slices2DPlanConfig()

    def preprocess(self, case: Case, centre_yx: Optional[Sequence[float]] = None) -> Tuple[Case, Dict[str, Any]]:
        """Resize and normalise every slice of one case.

        Args:
            case: The case (usually Z = 1).
            centre_yx: Ignored: the whole slice is kept (accepted for the plan interface).

        Returns:
            ``(preprocessed case, record)``; the record's ``intensity`` holds ``method`` and
            ``per_slice`` statistics, ``resample`` the original and output sizes.

        Raises:
            DataError: invalid input, naming the file.
        """
        p = self.params
        case = validate_case(case)
        grid = grid_to_shape(case.shape[1:], case.spacing[:2], p.size)
        image_r = resample_inplane(case.image, grid, sitk.sitkLinear)
        label_r = None if case.label is None else resample_inplane(case.label, grid, sitk.sitkNearestNeighbor)
        per_slice = [_common.normalisation_stats(s, p.normalization) for s in image_r]
        image_n = np.stack([_common.normalise(s, st) for s, st in zip(image_r, per_slice)])

        # The window is the whole resized slice, so the centre is the image centre.
        centre = _common.choose_centre(case, grid, None, [])
        out, record = _common.assemble(case, self, grid, image_n, label_r, centre, p.size, pad_value=0.0)
        record["intensity"] = {"method": p.normalization, "per_slice": per_slice}
        if any(st.get("degenerate") for st in per_slice):
            record["warnings"].append("a slice is constant: its normalisation scale was set to 1")
        return out, record
