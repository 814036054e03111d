"""Plan ``cmr``: cardiac MR preprocessing after the source paper (§2.5, nnU-Net style).

Steps, in order:

1. In-plane resampling to ``target_spacing`` (x, y): 3rd-order B-spline for the image,
   nearest neighbour for the label; the slice axis is untouched (short-axis stacks have
   5-10 mm gaps that no interpolation should invent). Skipped, and recorded as skipped,
   when the source has no spacing (``spacing_known=False``, e.g. ACDC h5) or
   ``target_spacing`` is None.
2. Intensity clipping at ``clip_percentiles``. The percentile values are computed per volume
   on the ORIGINAL voxels (statistics of what was acquired, not of interpolated values) and
   applied after resampling, which also removes B-spline overshoot.
3. Normalisation per volume on the clipped, resampled, uncropped volume: z-score (mean 0,
   std 1) or min-max to [0, 1].
4. Crop/pad in-plane to ``crop_size`` centred on the heart: a caller's ``centre_yx``
   (e.g. a predicted heart centre at inference) wins; else the label foreground centroid
   when ``centre == "label"`` and the label has foreground; else the image centre. The pad
   value is the normalised image minimum (the normalised low clip value), so padding looks
   like the darkest tissue rather than inventing a new intensity.

The record says how much foreground the crop removed (``foreground_voxels_lost``): a
non-zero value means the crop is too small for that heart, and inversion cannot be exact.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from robustseg.config import CMRPlanConfig
from robustseg.data.cases import Case, validate_case
from robustseg.data.preprocess import _common
from robustseg.data.preprocess.geometry import foreground_centroid_yx
from robustseg.registry import PLANS


@PLANS.register("cmr", params=CMRPlanConfig)
@_common.invertible
class CMRPlan:
    """Cardiac MR plan; see the module docstring for the steps.

    ``invert_label``, ``invert_probabilities`` and ``to_dict`` come from `_common.invertible`.

    Args:
        params: The ``data.cmr`` config section.
    """

    name = "cmr"
    version = 1

    def __init__(self, params: Optional[CMRPlanConfig] = None) -> None:
        self.params = params if params is not None else CMRPlanConfig()

    def preprocess(self, case: Case, centre_yx: Optional[Sequence[float]] = None) -> Tuple[Case, Dict[str, Any]]:
        """Resample, clip, normalise and crop/pad one case.

        Args:
            case: The case in its original geometry (labels canonical, or None).
            centre_yx: Heart centre ``(y, x)`` in the ORIGINAL voxel grid; overrides the
                label centroid (used at inference with a predicted centre).

        Returns:
            ``(preprocessed case, record)``: image float32 ``(Z, *crop_size)``, label uint8
            or None, spacing and origin updated; the record (JSON-serialisable) inverts it.

        Raises:
            DataError: invalid input or a non-MR case (naming the file), or an invalid ``centre_yx``.
        """
        p = self.params
        case = _common.require_modality(validate_case(case), "MR", self.name)
        grid = _common.choose_grid(case, p.target_spacing)

        lo, hi = (float(v) for v in np.percentile(case.image, p.clip_percentiles))
        image_r, label_r = _common.resample_case(case, grid)
        np.clip(image_r, lo, hi, out=image_r)
        stats = _common.normalisation_stats(image_r, p.normalization)
        image_n = _common.normalise(image_r, stats)

        heart = foreground_centroid_yx(case.label) if p.centre == "label" else None
        centre = _common.choose_centre(case, grid, centre_yx, [("label", heart)])
        out, record = _common.assemble(
            case, self, grid, image_n, label_r, centre, p.crop_size, pad_value=float(image_n.min())
        )
        record["intensity"] = {
            "clip_percentiles": _common.json_floats(p.clip_percentiles),
            "clip_values": [lo, hi],
            **stats,
        }
        if stats.get("degenerate"):
            record["warnings"].append("image is constant after clipping: normalisation scale set to 1")
        return out, record
