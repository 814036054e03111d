"""Prediction from a checkpoint: input file -> plan -> sliding window + TTA -> original grid.

The checkpoint carries the config and the preprocessing plan, so a prediction needs no
other file. Masks are written in the input's geometry (spacing, origin, direction).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from robustseg.config import ExperimentConfig
from robustseg.data.cases import Case, validate_case
from robustseg.data.guards import label_map_reason
from robustseg.data.io import PICTURE_SUFFIXES, picture_case, read_image, read_picture
from robustseg.data.nifti import write_label_like
from robustseg.data.preprocess import Plan, plan_from_dict
from robustseg.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
from robustseg.engine.inference import predict_volume
from robustseg.engine.postprocess import postprocess
from robustseg.errors import DataError, RobustsegError
from robustseg.models import build_model, size_multiple, spatial_dims

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".h5") + PICTURE_SUFFIXES


@dataclass
class Predictor:
    """A model restored from a checkpoint with everything needed to predict."""

    model: torch.nn.Module
    cfg: ExperimentConfig
    plan: Plan
    task: str
    class_names: Dict[int, str]
    patch_size: Tuple[int, ...]
    spatial_dims: int
    device: torch.device
    source: str


def load_predictor(checkpoint: Union[str, Path], device: Optional[torch.device] = None,
                   plan: Optional[Dict[str, Any]] = None) -> Predictor:
    """Rebuild the model and plan stored in ``checkpoint``.

    Args:
        checkpoint: A ``best.pt``/``last.pt`` written by the fit loop.
        device: Inference device (default CUDA if available).
        plan: A plan (e.g. another store's ``plan.json``) that must equal the checkpoint's.

    Raises:
        CheckpointError: unusable checkpoint, weights that do not fit, or a plan mismatch.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    where = str(checkpoint)
    cfg = ExperimentConfig.from_dict(ckpt["config"])
    stored_plan = ckpt.get("plan")
    if not stored_plan:
        raise CheckpointError(f"{where}: no preprocessing plan stored; cannot map predictions to the input grid")
    if plan is not None and dict(plan) != dict(stored_plan):
        raise CheckpointError(f"{where}: the given plan ({plan.get('name')} {plan.get('params')}) differs from the one "
                              f"the model was trained with ({stored_plan.get('name')} {stored_plan.get('params')})")
    if ckpt.get("backbone") != cfg.model.name:
        raise CheckpointError(f"{where}: backbone {ckpt.get('backbone')!r} does not match its config ({cfg.model.name!r})")
    patch = tuple(int(p) for p in ckpt["patch_size"])
    model = build_model(cfg.model, patch, ckpt.get("spacing"))
    load_model_state(model, ckpt["model"], where)
    model.to(device).eval()
    names = {int(k): v for k, v in ckpt.get("class_names", {}).items()}
    return Predictor(model, cfg, plan_from_dict(stored_plan), ckpt.get("task", "cardiac"), names, patch,
                     spatial_dims(cfg.model.name), device, where)


def is_picture(path: Path) -> bool:
    """A 2D picture input (PNG, JPEG, ...), segmented as a one-slice case."""
    return path.name.lower().endswith(PICTURE_SUFFIXES)


def write_picture_mask(label: np.ndarray, path: Path, task: str) -> None:
    """Write a one-slice mask as PNG; binary tasks use 0/255 like the COVID-SemiSeg masks.

    Raises:
        DataError: a multi-slice mask (a picture holds one slice).
    """
    from PIL import Image

    if label.shape[0] != 1:
        raise DataError(path, f"a picture mask needs one slice, got {label.shape[0]}")
    scale = 255 if task.endswith("binary") else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((label[0] * scale).astype(np.uint8)).save(path)


def read_input(path: Union[str, Path], task: str) -> Case:
    """Read one input (NIfTI/MetaImage/NRRD, an ACDC-style h5, or a 2D picture) as an unlabelled case.

    Raises:
        DataError: unreadable file, wrong dimensionality, NaN, empty volume.
    """
    p = Path(path)
    modality = "CT" if task.startswith("lung") else "MR"
    if is_picture(p):  # 2D slices as COVID-SemiSeg ships them (display-windowed JPEG/PNG)
        return validate_case(picture_case(read_picture(p), None, case_id=volume_stem(p), subject_id=volume_stem(p),
                                          modality=modality, task=task, source_path=str(p)))
    if p.suffix == ".h5":
        import h5py

        try:
            with h5py.File(p, "r") as fh:
                image = np.asarray(fh["image"], dtype=np.float32)
        except (OSError, KeyError) as e:
            raise DataError(p, f"unreadable h5 input ({e})") from None
        case = Case(case_id=volume_stem(p), subject_id=volume_stem(p), image=image, spacing_known=False, modality=modality,
                    task=task, source_path=str(p))
    else:
        vol = read_image(p)
        case = Case(case_id=volume_stem(p), subject_id=volume_stem(p), image=vol.array, spacing=vol.spacing, origin=vol.origin,
                    direction=vol.direction, modality=modality, task=task, source_path=str(p))
    return validate_case(case)


def check_modality(case: Case, plan: Plan) -> None:
    """Reject inputs that cannot be the modality the plan expects (MR vs CT in HU)."""
    lo, hi = float(np.percentile(case.image, 1)), float(np.percentile(case.image, 99))
    if plan.name == "cmr" and lo < -500 and hi > 0:
        raise DataError(case.source_path, f"looks like CT in HU (1st percentile {lo:.0f}); this model expects cardiac MR")
    if plan.name == "ct" and lo >= 0:
        raise DataError(case.source_path, f"has no negative values (1st percentile {lo:.1f}): not a CT in HU; "
                        "this model expects CT")


def inference_plan(plan: Plan, case: Case) -> Plan:
    """The plan without its crop: pad only, so the whole field of view is segmented.

    Right for models whose training crops covered the field of view (the ACDC reference at
    256 x 256): the training-size window slides over the whole resampled image, as in
    nnU-Net. A model trained on small heart-centred crops has never seen the periphery and
    must be used with the crop instead (the default), centred by ``centre_yx``.
    """
    params = dataclasses.asdict(plan.params)
    if "crop_size" not in params:
        return plan
    _, h, w = case.image.shape
    target = params.get("target_spacing")
    scale_y = scale_x = 1.0
    if target and case.spacing_known:
        scale_x, scale_y = case.spacing[0] / target[0], case.spacing[1] / target[1]
    need = (int(np.ceil(h * scale_y)) + 2, int(np.ceil(w * scale_x)) + 2)
    params["crop_size"] = [max(int(c), n) for c, n in zip(params["crop_size"], need)]
    return plan_from_dict({"name": plan.name, "version": plan.version, "params": params})


def predict_case(pred: Predictor, case: Case, *, tta: Optional[bool] = None, post: Optional[bool] = None,
                 centre_yx: Optional[Sequence[float]] = None, full_fov: bool = False) -> np.ndarray:
    """Label map of ``case`` on its original grid (uint8, canonical labels).

    Args:
        pred: The restored model and plan.
        case: Input case (original geometry).
        tta: Mirror TTA (default: the model's inference config).
        post: Post-processing (default: the model's inference config).
        centre_yx: Crop centre in original voxels (e.g. a first-stage prediction's heart
            centre); default: the image centre, since an input has no label.
        full_fov: Segment the whole field of view (`inference_plan`) instead of the training
            crop: only for models trained on crops that covered the field of view.
    """
    check_modality(case, pred.plan)
    inf = pred.cfg.inference
    plan = inference_plan(pred.plan, case) if full_fov else pred.plan
    pre, record = plan.preprocess(case, centre_yx=centre_yx)
    image = torch.from_numpy(pre.image).to(pred.device)
    probs = predict_volume(pred.model, image, spatial_dims=pred.spatial_dims, num_classes=pred.cfg.model.num_classes,
                           patch_size=pred.patch_size, overlap=inf.overlap, gaussian=inf.gaussian,
                           tta=inf.tta if tta is None else tta, batch_size=inf.batch_size,
                           divisible_by=size_multiple(pred.model),
                           amp=pred.device.type == "cuda")
    back = plan.invert_probabilities(probs.float().cpu().numpy(), record)
    label = back.argmax(0).astype(np.uint8)
    if inf.postprocess if post is None else post:
        label = postprocess(label, pred.task)
    return label


def list_inputs(path: Union[str, Path]) -> List[Path]:
    """One file, or every volume file in a folder (sorted).

    Raises:
        DataError: missing path or a folder without volumes.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(p, "input not found")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(VOLUME_SUFFIXES))
    if not files:
        raise DataError(p, f"no input volumes ({', '.join(VOLUME_SUFFIXES)}) in this folder")
    return files


def volume_stem(p: Path) -> str:
    """File name without its volume suffix (``case.nii.gz`` -> ``case``)."""
    name = p.name
    for suf in VOLUME_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


class PredictionRows(list):
    """One row per written mask (a plain list of dicts), plus what was not segmented.

    Attributes:
        skipped: ``{"input", "reason"}`` per input skipped as a label map.
        failed: ``{"input", "reason"}`` per input that failed (only when not failing fast).
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped: List[Dict[str, str]] = []
        self.failed: List[Dict[str, str]] = []


#: Per-file errors a batch survives (bad data, unreadable files, a failed forward pass);
#: anything else is a bug and stops the batch.
FILE_ERRORS = (RobustsegError, OSError, ValueError, RuntimeError, MemoryError)


def check_output_dir(path: Union[str, Path]) -> Path:
    """Fail early, naming ``path``, unless the masks can be written into this folder.

    Called before a model is loaded, so a typo costs nothing. The folder itself is not
    created here: a run that fails later leaves no empty folder behind.

    Raises:
        DataError: ``path`` is an existing file, lies under a file, or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DataError(out, "--output is an existing file; it must name a folder for the masks")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(out, f"cannot create the output folder: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "the output folder is not writable" if probe == out else f"cannot create it: {probe} is not writable"
        raise DataError(out, what)
    return out


def predict_files(checkpoint: Union[str, Path], inputs: Union[str, Path], output_dir: Union[str, Path], *,
                  device: Optional[torch.device] = None, tta: Optional[bool] = None,
                  progress: Optional[Any] = None, full_fov: bool = False, force: bool = False,
                  fail_fast: bool = True) -> PredictionRows:
    """Predict every input and write ``<stem>_seg.nii.gz`` masks in the input geometry.

    The output folder and the inputs are checked before the model is loaded.

    Args:
        checkpoint: ``best.pt``/``last.pt`` of a trained model.
        inputs: A volume file or a folder of them.
        output_dir: Where the masks go.
        device: Inference device (default CUDA if available).
        tta: Mirror TTA (default: the model's inference config).
        progress: tqdm-like factory.
        full_fov: As in `predict_case`.
        force: Segment inputs that look like label maps too (see `segment_files`).
        fail_fast: Raise at the first bad input instead of recording it in ``failed``.

    Returns:
        `PredictionRows`: one dict per mask (input, output, voxels per structure, ``empty``),
        with the skipped and failed inputs.
    """
    check_output_dir(output_dir)
    list_inputs(inputs)
    pred = load_predictor(checkpoint, device)
    return segment_files(lambda case: predict_case(pred, case, tta=tta, full_fov=full_fov), pred.task,
                         pred.class_names, inputs, output_dir, progress=progress, force=force, fail_fast=fail_fast)


def segment_files(segment: Callable[[Case], np.ndarray], task: str, class_names: Dict[int, str],
                  inputs: Union[str, Path], output_dir: Union[str, Path], *,
                  progress: Optional[Any] = None, force: bool = False, fail_fast: bool = True) -> PredictionRows:
    """Read every input, segment it with ``segment`` and write ``<stem>_seg.nii.gz`` in its geometry
    (``<stem>_seg.png`` for a picture input, 0/255 for binary tasks).

    Ground-truth label maps often sit beside the scans (and an earlier run's masks beside
    their inputs); segmenting them gives nonsense, so an input whose name marks a label map
    is skipped before it is read, and one whose voxels hold only label values after.

    Args:
        segment: Case (original grid) -> uint8 label map on that grid (a checkpoint or an ensemble).
        task: Canonical label set the inputs are read for (MR or CT).
        class_names: Label value -> structure name, for the voxel counts.
        inputs: A volume file or a folder of them.
        output_dir: Where the masks go.
        progress: tqdm-like factory.
        force: Segment inputs that look like label maps instead of skipping them.
        fail_fast: Raise at the first input that fails; otherwise record it in ``failed`` and
            go on, so one bad file does not cost the masks of all the others.

    Returns:
        `PredictionRows`: one dict per mask (input, output, voxels per structure, ``empty``),
        with the skipped and failed inputs.
    """
    files = list_inputs(inputs)
    out_dir = check_output_dir(output_dir)
    rows = PredictionRows()
    for f in (progress(files, desc="predict", unit="vol") if progress else files):
        try:
            row = _segment_file(segment, task, class_names, f, out_dir, force)
        except FILE_ERRORS as exc:
            if fail_fast:
                raise
            reason = exc.problem if isinstance(exc, DataError) and exc.where == str(f) else str(exc)
            rows.failed.append({"input": str(f), "reason": reason or type(exc).__name__})
            continue
        if isinstance(row, str):
            rows.skipped.append({"input": str(f), "reason": row})
        else:
            rows.append(row)
    return rows


def _segment_file(segment: Callable[[Case], np.ndarray], task: str, class_names: Dict[int, str], f: Path,
                  out_dir: Path, force: bool) -> Union[Dict[str, Any], str]:
    """Segment one input and write its mask: its row, or why it was skipped as a label map."""
    reason = None if force else label_map_reason(f.name)  # by name: not even read
    if reason:
        return reason
    case = read_input(f, task)
    reason = None if force else label_map_reason(None, case.image)
    if reason:
        return reason
    label = segment(case)
    if is_picture(f):
        out = out_dir / f"{volume_stem(f)}_seg.png"
        write_picture_mask(label, out, task)
    else:
        out = out_dir / f"{volume_stem(f)}_seg.nii.gz"
        # The scan's own NIfTI header, so the mask lies exactly in its physical space.
        write_label_like(label, out, f, case.geometry())
    counts = np.bincount(label.ravel(), minlength=len(class_names) or 2)
    return {"input": str(f), "output": str(out), "empty": bool(counts[1:].sum() == 0),
            **{class_names.get(i, str(i)): int(c) for i, c in enumerate(counts) if i > 0}}
