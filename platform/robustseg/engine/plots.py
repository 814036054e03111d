"""Plots a person would rather look at than read: learning curves and validation overlays."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

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


#: Overlay colour of each label value (canonical cardiac labels: 1 LV, 2 MYO, 3 RV), shared by the
#: overlays and their legend so a colour means the same structure in every picture.
LABEL_COLOURS = {1: "#e41a1c", 2: "#4daf4a", 3: "#377eb8", 4: "#984ea3", 5: "#ff7f00", 6: "#ffff33",
                 7: "#a65628", 8: "#f781bf", 9: "#999999"}


def overlay_title(case_id: str = "", phase: Optional[str] = None, dice: Optional[Mapping[str, float]] = None) -> str:
    """``syn0003_ES · ES · Dice LV 0.912, MYO 0.843, RV 0.871``: case, phase and per-structure Dice.

    The phase is left out when unknown; a NaN Dice (structure absent in both) reads ``n/a``.
    """
    parts = [str(case_id)] if case_id else []
    if phase:
        parts.append(str(phase))
    if dice:
        parts.append("Dice " + ", ".join(f"{k} {v:.3f}" if np.isfinite(v) else f"{k} n/a" for k, v in dice.items()))
    return " · ".join(parts)


def overlay_figure(image_zyx: np.ndarray, pred_zyx: np.ndarray, gt_zyx: Optional[np.ndarray], *,
                   class_names: Optional[Mapping[int, str]] = None, title: str = "", n_slices: int = 4) -> Any:
    """The overlay as a matplotlib figure: prediction (and ground truth) on a few foreground slices.

    Each label is drawn in its `LABEL_COLOURS` colour and named in a legend (``class_names``,
    default the canonical cardiac names, LV/MYO/RV); ``title`` is the figure's title (see
    `overlay_title`). The caller closes the figure.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from robustseg.data.labels import CARDIAC_NAMES

    plt = _pyplot()
    names = {int(k): str(v) for k, v in (class_names or CARDIAC_NAMES).items() if int(k) > 0}
    fg = np.flatnonzero((gt_zyx if gt_zyx is not None else pred_zyx).reshape(pred_zyx.shape[0], -1).any(1))
    zs = fg[np.linspace(0, len(fg) - 1, min(n_slices, len(fg))).astype(int)] if len(fg) else [pred_zyx.shape[0] // 2]
    top = max(LABEL_COLOURS)
    cmap = ListedColormap(["#000000"] + [LABEL_COLOURS.get(i, "#999999") for i in range(1, top + 1)])
    layers = [(pred_zyx, "prediction")] + ([(gt_zyx, "ground truth")] if gt_zyx is not None else [])
    fig, axes = plt.subplots(len(layers), len(zs), figsize=(3 * len(zs), 3 * len(layers) + 0.8), squeeze=False)
    for j, z in enumerate(zs):
        for i, (lbl, name) in enumerate(layers):
            ax = axes[i][j]
            ax.imshow(image_zyx[z], cmap="gray")
            ax.imshow(np.ma.masked_where(lbl[z] == 0, lbl[z]), cmap=cmap, vmin=0, vmax=top, alpha=0.45,
                      interpolation="nearest")
            ax.set_title(f"{name} z={z}", fontsize=8)
            ax.axis("off")
    present = sorted({int(v) for lbl, _ in layers for v in np.unique(lbl) if v > 0} | set(names))
    fig.legend(handles=[Patch(color=LABEL_COLOURS.get(v, "#999999"), alpha=0.7, label=names.get(v, f"label {v}"))
                        for v in present], loc="lower center", ncol=max(1, len(present)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def plot_overlay(image_zyx: np.ndarray, pred_zyx: np.ndarray, gt_zyx: Optional[np.ndarray], path: Union[str, Path],
                 title: str = "", n_slices: int = 4, *, class_names: Optional[Mapping[int, str]] = None,
                 case_id: str = "", phase: Optional[str] = None, dice: Optional[Mapping[str, float]] = None) -> Path:
    """Image with prediction (and ground truth) labels on a few slices with foreground, as a PNG.

    Self-explaining: a colour legend naming the structures, and a title with the case, its
    phase and the per-structure Dice (``dice``; computed from ``gt_zyx`` when not given).

    Args:
        image_zyx, pred_zyx, gt_zyx: Image, predicted labels, ground truth (or None), Z x H x W.
        path: PNG to write.
        title: Title (default `overlay_title` of ``case_id``, ``phase`` and the Dice).
        n_slices: Slices shown.
        class_names: Label value -> structure name (default LV/MYO/RV).
        case_id: Case id for the title.
        phase: Cardiac phase (ED, ES) for the title.
        dice: Per-structure Dice for the title.
    """
    if dice is None and gt_zyx is not None:
        from robustseg.data.labels import CARDIAC_NAMES
        from robustseg.engine.metrics import dice_per_class

        names = {int(k): str(v) for k, v in (class_names or CARDIAC_NAMES).items() if int(k) > 0}
        dice = {names[c]: float(d) for c, d in dice_per_class(pred_zyx, gt_zyx, sorted(names)).items()}
    fig = overlay_figure(image_zyx, pred_zyx, gt_zyx, class_names=class_names, n_slices=n_slices,
                         title=title or overlay_title(case_id, phase, dice))
    path = Path(path)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return path
