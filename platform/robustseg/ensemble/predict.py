"""Prediction with an ensemble named by a folder or an MLflow model URI (`robustseg predict`, `robustness`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from robustseg.ensemble.model import SPEC_FILE


def is_ensemble_uri(model: str) -> bool:
    """Whether ``--model`` names an ensemble (folder with spec.json, or an MLflow model URI)."""
    return model.startswith(("models:/", "runs:/")) or (Path(model) / SPEC_FILE).is_file()


def predict_with_ensemble(model: str, inputs: str, output: str, *, tracking_uri: Optional[str] = None,
                          device: Any = None, tta: Optional[bool] = None, progress: Any = None,
                          force: bool = False, fail_fast: bool = True) -> List[Dict[str, Any]]:
    """Segment every input with an ensemble; masks as ``<stem>_seg.nii.gz`` in each input's geometry.

    Args:
        model: Ensemble folder or MLflow model URI (``models:/name@alias``, ``runs:/...``).
        inputs: A volume or picture file, or a folder of them.
        output: Folder for the masks.
        tracking_uri: MLflow store that resolves a ``models:/`` or ``runs:/`` URI.
        device: Torch device for the members (None: CUDA when available).
        tta: Override the ensemble's mirror TTA setting (None keeps it).
        progress: tqdm-like factory.
        force: Segment inputs that look like label maps instead of skipping them.
        fail_fast: Raise at the first input that fails instead of recording it and going on.

    Returns:
        `robustseg.engine.predict.PredictionRows`: one row per mask (input, output, ``empty``,
        voxels per structure), with the skipped and failed inputs.
    """
    from robustseg.engine.predict import segment_files
    from robustseg.ensemble.registry import load_ensemble

    ens, _ = load_ensemble(model, tracking_uri, device)
    if tta is not None:
        ens.spec.tta = tta
    return segment_files(lambda case: ens.predict_cases([case])[0], ens.spec.task, ens.spec.class_names, inputs,
                         output, progress=progress, force=force, fail_fast=fail_fast)
