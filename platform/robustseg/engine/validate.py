"""Whole-volume validation during training (not patches): sliding window, argmax, Dice."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from robustseg.config import InferenceConfig
from robustseg.engine.inference import predict_volume
from robustseg.engine.metrics import dice_per_class


def overlay_picks(cases: Sequence[Mapping[str, Any]], n: int) -> List[int]:
    """Indices of the ``n`` cases to draw: the phases in turn (ED, ES, ED, ...), each in case order.

    Validation cases come grouped (a subject's ED volumes, then its ES ones), so the first few
    alone would often show one phase only; cases without a phase count as one more group.
    """
    groups: Dict[Any, List[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(case.get("phase") or None, []).append(i)
    queues = [list(g) for g in groups.values()]
    picks: List[int] = []
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0))
    return picks


def write_validation_artifacts(collected: Sequence[Mapping[str, Any]], cases: Sequence[Mapping[str, Any]],
                               out_dir: Path, n_overlays: int = 4,
                               class_names: Optional[Mapping[int, str]] = None) -> None:
    """``val_cases.csv`` (per-case Dice) and ``overlays/<case>.png`` for a few cases.

    These are what the MLflow tracker uploads as the run's per-case metrics and overlays. The
    overlays take the phases in turn (`overlay_picks`: ES as well as ED when the fold has both)
    and name themselves: colour legend, case id, phase and per-structure Dice in the title.
    """
    from robustseg.engine.metrics import to_csv
    from robustseg.engine.plots import plot_overlay

    to_csv([c["row"] for c in collected], out_dir / "val_cases.csv")
    (out_dir / "overlays").mkdir(exist_ok=True)
    pairs = list(zip(collected, cases))
    for i in overlay_picks([case for _, case in pairs], n_overlays):
        item, case = pairs[i]
        row = item["row"]
        dice = {k[len("dice_"):]: float(v) for k, v in row.items() if k.startswith("dice_") and v is not None}
        plot_overlay(case["image"].float().cpu().numpy(), item["pred"], case["label"].cpu().numpy(),
                     out_dir / "overlays" / f"{case['case_id']}.png", class_names=class_names,
                     case_id=str(case["case_id"]), phase=case.get("phase"), dice=dice or None)


def validate(model: torch.nn.Module, cases: Sequence[Mapping[str, Any]], *, spatial_dims: int, num_classes: int,
             class_names: Mapping[int, str], patch_size: Sequence[int], cfg: InferenceConfig,
             divisible_by: Sequence[int] | int = 1, amp: bool = False, tta: bool = False,
             collect: Optional[List[Dict[str, Any]]] = None) -> Dict[str, float]:
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
        amp: bf16 autocast (as training: `robustseg.engine.precision`).
        tta: Mirror TTA (off during training for speed; on for final evaluation).
        collect: When given, one dict per case is appended: ``row`` (case id, motion level,
            dataset, phase, Dice per structure) and ``pred`` (uint8 labels, Z x H x W).

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
            dices = dice_per_class(pred, gt, list(per_class))
            for c, d in dices.items():
                per_class[c].append(d)
            if collect is not None:
                row = {k: case.get(k) for k in ("case_id", "motion_level", "dataset", "phase")}
                row.update({f"dice_{class_names.get(c, str(c))}": d for c, d in dices.items()})
                collect.append({"row": row, "pred": pred})
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
