"""`robustseg evaluate`: predicted masks vs ground truth on the original grid.

Each ``<stem>_seg.nii.gz`` in the prediction folder is paired with a ground-truth file of the
same stem (``<stem>_gt``, ``<stem>-label``, ``<stem>_label``, ``<stem>`` with a volume
suffix, or an ACDC-style ``<stem>.h5``), remapped to canonical labels with the given
convention, checked to lie on the same grid, and scored: Dice and HD95 per structure per
case (CSV), aggregated overall and by motion level / phase read from the file names (JSON),
with a Dice box plot; ED/ES pairs of a subject also give predicted vs true ventricular
volumes and ejection fractions (``cardiac_function.csv``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from robustseg.data.io import check_same_geometry, read_label
from robustseg.data.labels import TASK_CLASS_NAMES, get_convention
from robustseg.engine.metrics import aggregate, evaluate_case, to_csv
from robustseg.errors import DataError

_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
_PHASE = re.compile(r"(?:^|[_-])(ED|ES)(?=$|[_-])", re.IGNORECASE)
_MOTION = re.compile(r"[_-]m([0-3])(?=$|[_-])")
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


def stem_meta(stem: str) -> Dict[str, Any]:
    """Case id, subject, phase and motion level read from a file stem.

    ``acdc_patient001_ED`` -> phase ED, subject ``acdc_patient001``; ``syn0003_ES_m2`` -> motion
    level 2. Unknown parts are left out (the breakdown then skips them).
    """
    meta: Dict[str, Any] = {"case_id": stem}
    phase = _PHASE.search(stem)
    if phase:
        meta["phase"] = phase.group(1).upper()
        meta["subject"] = (stem[: phase.start()] + "#" + stem[phase.end():]).strip("_-")
    motion = _MOTION.search(stem)
    if motion:
        meta["motion_level"] = int(motion.group(1))
    return meta


def cardiac_function_rows(labels: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """LV/RV volumes and EF from predicted and true ED/ES pairs of the same subject.

    Args:
        labels: case id -> ``{"meta", "pred", "gt", "spacing", "known"}``.

    Returns:
        One row per subject with both phases: predicted and true EDV/ESV/EF and EF errors.
    """
    from robustseg.analysis.clinical import cardiac_function

    pairs: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for item in labels.values():
        m = item["meta"]
        if "phase" in m and "subject" in m:
            pairs.setdefault(m["subject"], {})[m["phase"]] = item
    rows = []
    for subject, phases in sorted(pairs.items()):
        if set(phases) != {"ED", "ES"}:
            continue
        ed, es = phases["ED"], phases["ES"]
        known = ed["known"] and es["known"]
        row: Dict[str, Any] = {"subject": subject.replace("#", "")}
        for who in ("pred", "gt"):
            f = cardiac_function(ed[who], es[who], ed["spacing"], es["spacing"], spacing_known=known)
            for k in ("lv_edv", "lv_esv", "lv_ef", "rv_edv", "rv_esv", "rv_ef", "myo_mass_ed"):
                row[f"{k}_{who}"] = f[k]
            row["units"] = f["units"]
            if who == "pred":
                row["flags"] = "; ".join(f["flags"])
        row["lv_ef_abs_error"] = abs(row["lv_ef_pred"] - row["lv_ef_gt"])
        row["rv_ef_abs_error"] = abs(row["rv_ef_pred"] - row["rv_ef_gt"])
        rows.append(row)
    return rows


def ground_truth_cases(gt_dir: Union[str, Path]) -> Dict[str, Path]:
    """Case stem -> ground-truth file of every labelled case in ``gt_dir``.

    Files named with a label tail (``_gt``, ``-label``, ``_label``, ``_seg``) are the ground
    truth; when there are any, the untailed files beside them are the scans (M&Ms, ACDC NIfTI
    folders) and are not cases. A folder with no tailed file holds labels named like their
    cases. ACDC-style ``.h5`` files hold image and label, so each is a case.
    """
    folder = Path(gt_dir)
    if not folder.is_dir():
        raise DataError(folder, "ground-truth folder not found")
    tails = tuple(pat.format(s="") for pat in _GT_PATTERNS if pat != "{s}")
    tailed, bare = set(), set()
    for f in folder.iterdir():
        if f.name.endswith(".h5"):
            tailed.add(f.name[:-3])
        elif f.name.endswith(_SUFFIXES) and not f.name.startswith("."):
            name = f.name[: -len(next(suf for suf in _SUFFIXES if f.name.endswith(suf)))]
            tail = next((t for t in tails if name.endswith(t)), None)
            (tailed if tail else bare).add(name[: -len(tail)] if tail else name)
    stems = tailed or bare
    return {stem: path for stem in sorted(stems) if (path := find_ground_truth(folder, stem)) is not None}


def evaluate_folder(pred_dir: Union[str, Path], gt_dir: Union[str, Path], *, convention: str = "auto",
                    task: str = "cardiac", out_dir: Optional[Union[str, Path]] = None,
                    allow_missing: bool = False) -> Dict[str, Any]:
    """Score every prediction in ``pred_dir`` against ``gt_dir``.

    Every ground-truth case must have a prediction: scoring only the predicted ones would
    report a mean over a subset as if it were the whole set.

    Args:
        pred_dir: Folder of ``<stem>_seg.nii.gz`` masks.
        gt_dir: Folder of ground truth (see `ground_truth_cases`).
        convention: Ground-truth label convention (``auto``: ACDC for h5, canonical otherwise).
        task: Label set (``cardiac``, ``lung_binary``, ``lung_multiclass``).
        out_dir: Where the CSV/JSON/plot go (default ``pred_dir``).
        allow_missing: Score a ground-truth case without a prediction as an empty mask
            (Dice 0) instead of failing; such rows read ``prediction: missing``.

    Returns:
        ``{"rows", "summary", "csv", "json", "plot", "function", "function_csv", "missing"}``;
        ``summary`` holds ``n_predicted`` and ``n_ground_truth``.

    Raises:
        DataError: no predictions, a prediction without ground truth, a ground-truth case
            without prediction (unless ``allow_missing``), or mismatched grids.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    preds = sorted(p for p in pred_dir.iterdir() if p.name.endswith(tuple("_seg" + s for s in _SUFFIXES))) \
        if pred_dir.is_dir() else []
    if not preds:
        raise DataError(pred_dir, "no predicted masks (*_seg.nii.gz) found")
    by_stem = {_stem(p.name): p for p in preds}
    for stem, p in by_stem.items():
        if find_ground_truth(gt_dir, stem) is None:
            raise DataError(p, f"no ground truth for case {stem!r} in {gt_dir} (tried {', '.join(_GT_PATTERNS)})")
    gt_stems = sorted(set(ground_truth_cases(gt_dir)) | set(by_stem))
    missing = [s for s in gt_stems if s not in by_stem]
    if missing and not allow_missing:
        raise DataError(pred_dir, f"no prediction for {len(missing)} of {len(gt_stems)} ground-truth cases in "
                        f"{gt_dir}: {_names(missing)} (expected <case>_seg.nii.gz); pass --allow-missing to score "
                        "them as empty masks (Dice 0)")
    names = TASK_CLASS_NAMES[task]
    rows: List[Dict[str, Any]] = []
    kept: Dict[str, Dict[str, Any]] = {}
    for stem in gt_stems:
        pred, gt, spacing, known = _pair(by_stem.get(stem), gt_dir, stem, convention)
        meta = dict(stem_meta(stem), prediction="found" if stem in by_stem else "missing")
        rows.append(evaluate_case(pred, gt, spacing, known, names, meta={k: v for k, v in meta.items() if k != "subject"}))
        if task == "cardiac" and stem in by_stem:  # an empty stand-in has no volumes to compare
            kept[stem] = {"meta": meta, "pred": pred, "gt": gt, "spacing": spacing, "known": known}
    out = Path(out_dir) if out_dir else pred_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows, by=("motion_level", "phase"))
    summary.update(n_predicted=len(by_stem), n_ground_truth=len(gt_stems), missing_predictions=missing,
                   missing_scored_as="empty mask (Dice 0)" if missing else None)
    csv_path = to_csv(rows, out / "metrics.csv")
    function = cardiac_function_rows(kept)
    function_csv = to_csv(function, out / "cardiac_function.csv") if function else None
    if function:
        summary["cardiac_function"] = {k: float(np.nanmean([r[k] for r in function]))
                                       for k in ("lv_ef_abs_error", "rv_ef_abs_error")}
    json_path = out / "summary.json"
    json_path.write_text(json.dumps(summary, indent=1, default=float))
    plot = _plot_dice(rows, names, out / "dice.png")
    return {"rows": rows, "summary": summary, "csv": csv_path, "json": json_path, "plot": plot,
            "function": function, "function_csv": function_csv, "missing": missing}


def _pair(pred_path: Optional[Path], gt_dir: Path, stem: str,
          convention: str) -> Tuple[np.ndarray, np.ndarray, Tuple[float, ...], bool]:
    """Prediction and ground truth of one case on one grid; no prediction: an empty mask."""
    gt_path = find_ground_truth(gt_dir, stem)
    assert gt_path is not None  # the stems come from the ground-truth folder or were checked
    gt, spacing, known, gt_vol = _read_gt(gt_path, convention)
    if pred_path is None:
        return np.zeros(gt.shape, np.int64), gt, spacing, known
    pred_vol = read_label(pred_path)
    if gt_vol is not None:
        check_same_geometry(pred_vol, gt_vol, pred_path, what=f"prediction and ground truth {gt_path}")
    elif pred_vol.array.shape != gt.shape:
        raise DataError(pred_path, f"prediction shape {pred_vol.array.shape} differs from ground truth {gt_path} {gt.shape}")
    return pred_vol.array.astype(np.int64), gt, spacing, known


def _names(stems: List[str], limit: int = 20) -> str:
    shown = ", ".join(stems[:limit])
    return shown + (f" and {len(stems) - limit} more" if len(stems) > limit else "")


def _plot_dice(rows: List[Dict[str, Any]], names: Dict[int, str], path: Path) -> Path:
    from robustseg.engine.plots import _pyplot

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
