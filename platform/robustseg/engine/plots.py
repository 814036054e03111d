"""Plots a person would rather look at than read: learning curves and validation overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Sequence[Dict[str, Any]], path: Union[str, Path]) -> Path:
    """Loss and validation Dice per epoch as one PNG."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("loss", "ce", "dice_loss"):
        if any(key in h for h in history):
            ax1.plot(epochs, [h.get(key, np.nan) for h in history], label=key)
    ax1.set_xlabel("epoch"), ax1.set_title("training loss"), ax1.legend()
    val_keys = sorted({k for h in history for k in h if k.startswith("val_dice")})
    for key in val_keys:
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, lw=2 if key == "val_dice" else 1, label=key.replace("val_dice_", ""))
    ax2.set_ylim(0, 1), ax2.set_xlabel("epoch"), ax2.set_title("validation Dice")
    if val_keys:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_overlay(image_zyx: np.ndarray, pred_zyx: np.ndarray, gt_zyx: Optional[np.ndarray], path: Union[str, Path],
                 title: str = "", n_slices: int = 4) -> Path:
    """Image with prediction (and ground truth) contours on a few slices with foreground."""
    plt = _pyplot()
    fg = np.flatnonzero((gt_zyx if gt_zyx is not None else pred_zyx).reshape(pred_zyx.shape[0], -1).any(1))
    zs = fg[np.linspace(0, len(fg) - 1, min(n_slices, len(fg))).astype(int)] if len(fg) else [pred_zyx.shape[0] // 2]
    rows = 2 if gt_zyx is not None else 1
    fig, axes = plt.subplots(rows, len(zs), figsize=(3 * len(zs), 3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for j, z in enumerate(zs):
        for i, (lbl, name) in enumerate([(pred_zyx, "prediction")] + ([(gt_zyx, "ground truth")] if gt_zyx is not None else [])):
            ax = axes[i][j]
            ax.imshow(image_zyx[z], cmap="gray")
            masked = np.ma.masked_where(lbl[z] == 0, lbl[z])
            ax.imshow(masked, cmap=cmap, vmin=0, vmax=9, alpha=0.45, interpolation="nearest")
            ax.set_title(f"{name} z={z}", fontsize=8)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
