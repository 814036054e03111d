"""Whole-volume validation during training (not patches): sliding window, argmax, Dice."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from robustseg.config import InferenceConfig
from robustseg.engine.inference import predict_volume
from robustseg.engine.metrics import dice_per_class


def validate(model: torch.nn.Module, cases: Sequence[Mapping[str, Any]], *, spatial_dims: int, num_classes: int,
             class_names: Mapping[int, str], patch_size: Sequence[int], cfg: InferenceConfig, divisible_by: Sequence[int] | int = 1,
             amp: bool = False, tta: bool = False) -> Dict[str, float]:
    """Mean per-structure Dice over validation volumes (in preprocessed space).

    Args:
        model: The network (switched to eval for the call, restored after).
        cases: Dicts with ``image`` (Z, H, W) tensor and ``label`` (Z, H, W) on the device.
        spatial_dims: 2 or 3.
        num_classes: Output classes.
        class_names: Class index -> name (background included).
        patch_size: Inference window.
        cfg: Overlap, Gaussian weighting and batch size.
        divisible_by: The backbone's size multiple.
        amp: bf16 autocast on CUDA.
        tta: Mirror TTA (off during training for speed; on for final evaluation).

    Returns:
        ``val_dice`` (mean over foreground structures and cases) and ``val_dice_<name>``.
    """
    was_training = model.training
    model.eval()
    per_class: Dict[int, List[float]] = {c: [] for c in range(1, num_classes)}
    try:
        for case in cases:
            probs = predict_volume(model, case["image"], spatial_dims=spatial_dims, num_classes=num_classes,
                                   patch_size=tuple(patch_size), overlap=cfg.overlap, gaussian=cfg.gaussian, tta=tta,
                                   batch_size=cfg.batch_size, divisible_by=divisible_by, amp=amp)
            pred = probs.argmax(0).to(torch.uint8).cpu().numpy()
            gt = case["label"].cpu().numpy()
            for c, d in dice_per_class(pred, gt, list(per_class)).items():
                per_class[c].append(d)
    finally:
        model.train(was_training)
    out: Dict[str, float] = {}
    means = []
    for c, values in per_class.items():
        m = float(np.nanmean(values)) if values and not np.all(np.isnan(values)) else float("nan")
        out[f"val_dice_{class_names.get(c, str(c))}"] = m
        means.append(m)
    out["val_dice"] = float(np.nanmean(means)) if not np.all(np.isnan(means)) else float("nan")
    return out
