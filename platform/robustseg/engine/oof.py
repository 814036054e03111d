"""Out-of-fold evaluation of fold models and of their cross-architecture ensembles.

Every validation case of fold k is segmented by each architecture's fold-k model (none of
which saw it in training) and by the weighted softmax mean of every combination of two or
more architectures: each ensemble's out-of-fold estimate, on exactly the cases each single
model is scored on. `select` then picks the best single architecture or combination, as
nnU-Net's ``find_best_configuration`` does: an ensemble with a weak member can be worse
than its best member, and the numbers say so before anything is registered. Evaluation runs in the preprocessing plan's
space, on the shards, as validation during training does; HD95 uses the plan's spacing.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from robustseg.data.manifest import Manifest
from robustseg.data.storage import ObjectStore
from robustseg.engine.data import load_slice_set
from robustseg.engine.inference import predict_volume
from robustseg.engine.metrics import aggregate, evaluate_case
from robustseg.engine.predict import Predictor
from robustseg.engine.precision import inference_amp
from robustseg.models import size_multiple

ENSEMBLE_PREFIX = "ensemble"


def ensemble_name(combo: Sequence[str]) -> str:
    """Row name of an architecture combination: ``ensemble(unet+unet2d)``."""
    return f"{ENSEMBLE_PREFIX}({'+'.join(combo)})"


def metric_key(model: str) -> str:
    """An MLflow-safe form of a row name: ``ensemble(unet+unet2d)`` -> ``ensemble_unet-unet2d``."""
    return model.replace("(", "_").replace("+", "-").replace(")", "")


def combination_of(model: str) -> List[str]:
    """Architectures behind a row name (a single architecture or an `ensemble_name`)."""
    if model.startswith(ENSEMBLE_PREFIX + "("):
        return model[len(ENSEMBLE_PREFIX) + 1 : -1].split("+")
    return [model]


def _probs(pred: Predictor, image: torch.Tensor, tta: bool) -> torch.Tensor:
    inf = pred.cfg.inference
    return predict_volume(pred.model, image, spatial_dims=pred.spatial_dims, num_classes=pred.cfg.model.num_classes,
                          patch_size=pred.patch_size, overlap=inf.overlap, gaussian=inf.gaussian, tta=tta,
                          batch_size=inf.batch_size, divisible_by=size_multiple(pred.model),
                          amp=inference_amp(pred.device))


def oof_evaluate(models: Mapping[str, Mapping[int, Predictor]], store: ObjectStore, manifest: Manifest, *,
                 tta: bool = False, weights: Optional[Mapping[str, float]] = None, max_cases: Optional[int] = None,
                 progress: Optional[Callable[..., Any]] = None) -> List[Dict[str, Any]]:
    """Per-case rows for every architecture and every combination of them, fold by fold.

    Args:
        models: ``{architecture: {fold: predictor}}``; every architecture needs the same folds.
        store: The shard store the models were trained on.
        manifest: Its manifest.
        tta: Mirror TTA.
        weights: Per-architecture ensemble weights (default equal).
        max_cases: Most validation cases per fold (None: all).
        progress: tqdm-like factory over folds.

    Returns:
        Rows of `evaluate_case` with ``model`` (architecture or `ensemble_name`), ``fold``,
        ``case_id``, ``motion_level``, ``dataset`` and ``phase`` columns.
    """
    archs = list(models)
    folds = sorted(next(iter(models.values())))
    for a in archs:
        if sorted(models[a]) != folds:
            raise ValueError(f"architecture {a} has folds {sorted(models[a])}, expected {folds}")
    w = {a: float((weights or {}).get(a, 1.0)) for a in archs}
    combos = [c for r in range(2, len(archs) + 1) for c in itertools.combinations(sorted(archs), r)]
    names = {int(k): v for k, v in manifest.class_names.items()}
    rows: List[Dict[str, Any]] = []
    for k in (progress(folds, desc="out-of-fold", unit="fold") if progress else folds):
        device = models[archs[0]][k].device
        cases = [v for v in load_slice_set(store, manifest, folds=[k], device=device).volumes() if v["has_label"]]
        for case in cases[:max_cases] if max_cases else cases:
            gt = case["label"].cpu().numpy()
            meta = {"fold": k, **{c: case.get(c) for c in ("case_id", "motion_level", "dataset", "phase")}}
            spacing = _plan_spacing(manifest, case)
            probs = {}
            for a in archs:
                probs[a] = _probs(models[a][k], case["image"], tta)
                rows.append({"model": a, **evaluate_case(probs[a].argmax(0).cpu().numpy(), gt, spacing, True, names,
                                                         meta)})
            for combo in combos:  # argmax of the weighted sum = argmax of the weighted mean
                label = sum(w[a] * probs[a] for a in combo).argmax(0).cpu().numpy()
                rows.append({"model": ensemble_name(combo), **evaluate_case(label, gt, spacing, True, names, meta)})
    return rows


def _plan_spacing(manifest: Manifest, case: Mapping[str, Any]) -> Sequence[float]:
    """Voxel size (x, y, z) of the preprocessed grid: the plan's target spacing in-plane."""
    params = (manifest.plan or {}).get("params", {})
    target = params.get("target_spacing")
    sx, sy, sz = case.get("spacing") or (1.0, 1.0, 1.0)
    if target:
        sx, sy = float(target[0]), float(target[1])
    return (sx, sy, sz)


def summarise(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per model: mean Dice/HD95 over all out-of-fold cases, single architectures first."""
    order = list(dict.fromkeys(r["model"] for r in rows))
    out = []
    for m in order:
        # Grouping keys are left out of the overall means (a mean fold number means nothing).
        stats = aggregate([r for r in rows if r["model"] == m], by=("fold", "motion_level"))["overall"]
        out.append({"model": m, **stats})
    return out


def select(summary: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The summary row with the best mean out-of-fold Dice (on a tie, the one with fewer members)."""
    return dict(max(summary, key=lambda r: (float(r["dice_mean"]) if np.isfinite(r["dice_mean"]) else -1.0,
                                            -len(combination_of(r["model"])))))


def plot_comparison(summary: Sequence[Mapping[str, Any]], class_names: Mapping[int, str], path: Path) -> Path:
    """Grouped bars of out-of-fold Dice per structure: each architecture and the ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    structs = [class_names[c] for c in sorted(class_names) if c != 0] + ["mean"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(structs), 3.6))
    width = 0.8 / max(len(summary), 1)
    for i, row in enumerate(summary):
        vals = [float(row.get(f"dice_{s}", np.nan)) for s in structs]
        xs = np.arange(len(structs)) + (i - (len(summary) - 1) / 2) * width
        bars = ax.bar(xs, vals, width, label=row["model"],
                      hatch="//" if row["model"].startswith(ENSEMBLE_PREFIX) else None)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(np.arange(len(structs)), structs)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("out-of-fold Dice")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Ensemble vs single architectures (same out-of-fold cases)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
