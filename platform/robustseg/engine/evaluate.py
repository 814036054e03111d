"""`robustseg evaluate`: predicted masks vs ground truth on the original grid.

Each ``<stem>_seg.nii.gz`` in the prediction folder is paired with a ground-truth file of the
same stem (``<stem>_gt``, ``<stem>-label``, ``<stem>_label``, ``<stem>`` with a volume
suffix, or an ACDC-style ``<stem>.h5``), remapped to canonical labels with the given
convention, checked to lie on the same grid, and scored: Dice and HD95 per structure per
case (CSV), aggregated overall and by motion level / dataset / phase (JSON), with a Dice
box plot.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from robustseg.data.io import check_same_geometry, read_label
from robustseg.data.labels import TASK_CLASS_NAMES, get_convention
from robustseg.engine.metrics import aggregate, evaluate_case, to_csv
from robustseg.errors import DataError

_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
_GT_PATTERNS = ("{s}_gt", "{s}-label", "{s}_label", "{s}_seg", "{s}")


def _stem(name: str, tail: str = "_seg") -> str:
    for suf in _SUFFIXES:
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    return name[: -len(tail)] if name.endswith(tail) else name


def find_ground_truth(gt_dir: Path, stem: str) -> Optional[Path]:
    """The ground-truth file of a case stem in ``gt_dir`` (or None)."""
    for pat in _GT_PATTERNS:
        for suf in _SUFFIXES:
            p = gt_dir / (pat.format(s=stem) + suf)
            if p.is_file():
                return p
    h5 = gt_dir / f"{stem}.h5"
    return h5 if h5.is_file() else None


def _read_gt(path: Path, convention: str) -> Tuple[np.ndarray, Tuple[float, ...], bool, Any]:
    conv = get_convention("acdc" if convention == "auto" and path.suffix == ".h5" else
                          ("canonical_cardiac" if convention == "auto" else convention))
    if path.suffix == ".h5":
        import h5py

        try:
            with h5py.File(path, "r") as fh:
                label = np.asarray(fh["label"])
        except (OSError, KeyError) as e:
            raise DataError(path, f"unreadable ground truth ({e})") from None
        return conv.to_canonical(label, path), (1.0, 1.0, 1.0), False, None
    vol = read_label(path)
    return conv.to_canonical(vol.array, path), vol.spacing, True, vol


def evaluate_folder(pred_dir: Union[str, Path], gt_dir: Union[str, Path], *, convention: str = "auto",
                    task: str = "cardiac", out_dir: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Score every prediction in ``pred_dir`` against ``gt_dir``.

    Returns:
        ``{"rows": [...], "summary": aggregate(...), "csv": path, "json": path, "plot": path}``.

    Raises:
        DataError: no predictions, a prediction without ground truth, or mismatched grids.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = sorted(p for p in pred_dir.iterdir() if p.name.endswith(tuple("_seg" + s for s in _SUFFIXES))) \
        if pred_dir.is_dir() else []
    if not preds:
        raise DataError(pred_dir, "no predicted masks (*_seg.nii.gz) found")
    names = TASK_CLASS_NAMES[task]
    rows: List[Dict[str, Any]] = []
    for p in preds:
        stem = _stem(p.name)
        gt_path = find_ground_truth(gt_dir, stem)
        if gt_path is None:
            raise DataError(p, f"no ground truth for case {stem!r} in {gt_dir} (tried {', '.join(_GT_PATTERNS)})")
        gt, spacing, known, gt_vol = _read_gt(gt_path, convention)
        pred_vol = read_label(p)
        if gt_vol is not None:
            check_same_geometry(pred_vol, gt_vol, p, what=f"prediction and ground truth {gt_path}")
        elif pred_vol.array.shape != gt.shape:
            raise DataError(p, f"prediction shape {pred_vol.array.shape} differs from ground truth {gt_path} {gt.shape}")
        pred = pred_vol.array.astype(np.int64)
        rows.append(evaluate_case(pred, gt, spacing, known, names, meta={"case_id": stem}))
    out = Path(out_dir) if out_dir else pred_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows, by=())
    csv_path = to_csv(rows, out / "metrics.csv")
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=1, default=float))
    plot = _plot_dice(rows, names, out / "dice.png")
    return {"rows": rows, "summary": summary, "csv": csv_path, "json": json_path, "plot": plot}


def _plot_dice(rows: List[Dict[str, Any]], names: Dict[int, str], path: Path) -> Path:
    from robustseg.engine.report import _pyplot

    plt = _pyplot()
    labels = [n for c, n in sorted(names.items()) if c != 0]
    data = [[r[f"dice_{n}"] for r in rows if not np.isnan(r[f"dice_{n}"])] for n in labels]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 3.5))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylim(0, 1), ax.set_ylabel("Dice"), ax.set_title(f"Dice per structure ({len(rows)} cases)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
