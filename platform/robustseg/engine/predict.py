"""Prediction from a checkpoint: input file -> plan -> sliding window + TTA -> original grid.

The checkpoint carries the config and the preprocessing plan, so a prediction needs no
other file. Masks are written in the input's geometry (spacing, origin, direction).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from robustseg.config import ExperimentConfig
from robustseg.data.cases import Case, validate_case
from robustseg.data.guards import label_map_reason
from robustseg.data.io import PICTURE_SUFFIXES, picture_case, read_image, read_picture
from robustseg.data.io import write_label_like
from robustseg.data.preprocess import Plan, plan_from_dict
from robustseg.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
from robustseg.engine.inference import locate_then_segment, predict_volume
from robustseg.engine.postprocess import postprocess
from robustseg.engine.precision import inference_amp
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
    trained_on: str = "crop"

    @property
    def patch_trained(self) -> bool:
        """Trained on windows smaller than the plan's field (`training_field`): predict slides over the whole field."""
        return self.trained_on == "patches"


def training_field(plan: Plan, patch: Sequence[int], dims: int) -> str:
    """How a 2D model saw its data: ``patches`` smaller than the plan's crop, or the whole ``crop``.

    Patch-trained models saw the whole preprocessed field (periphery included), so they can
    slide over any field of view and locate the structure themselves; crop-trained models
    (e.g. 128 x 128 heart crops) only ever saw the crop and need it centred on the heart.
    """
    crop = getattr(plan.params, "crop_size", None)
    if dims != 2 or not crop:
        return "crop"
    return "patches" if any(int(p) < int(c) for p, c in zip(patch, crop)) else "crop"


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
    plan_obj, dims = plan_from_dict(stored_plan), spatial_dims(cfg.model.name)
    return Predictor(model, cfg, plan_obj, ckpt.get("task", "cardiac"), names, patch, dims, device, where,
                     training_field(plan_obj, patch, dims))


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

    Right for models whose training windows were smaller than the field they were cut from
    (`training_field` ``patches``): the training-size window slides over the whole resampled
    image, as in nnU-Net. The crop is exactly the resampled field (padded to the plan's
    size when smaller); 2 voxels of slack are added only when resampling may round the
    centre, because every extra voxel past a multiple of the network's stride costs a row
    of windows.
    """
    from robustseg.data.preprocess._common import choose_grid

    params = dataclasses.asdict(plan.params)
    if "crop_size" not in params:
        return plan
    grid = choose_grid(case, params.get("target_spacing"))
    slack = 2 if grid.applied else 0
    need = [int(n) + slack for n in grid.out_shape_yx]
    params["crop_size"] = [max(int(c), n) for c, n in zip(params["crop_size"], need)]
    return plan_from_dict({"name": plan.name, "version": plan.version, "params": params})


def touches_border(label_zyx: np.ndarray, record: Dict[str, Any]) -> bool:
    """Whether preprocessed-space foreground reaches an edge of the crop that lies inside the
    resampled image (edges in the padding cut nothing): the crop may have cut the structure."""
    fg = label_zyx > 0
    if not fg.any():
        return False
    sy, sx = record["crop"]["start_yx"]
    hy, hx = record["crop"]["size_yx"]
    ry, rx = record["resampled"]["shape_zyx"][1:]
    edges = []
    if sy > 0:
        edges.append(fg[:, 0, :])
    if sy + hy < ry:
        edges.append(fg[:, -1, :])
    if sx > 0:
        edges.append(fg[:, :, 0])
    if sx + hx < rx:
        edges.append(fg[:, :, -1])
    return any(bool(e.any()) for e in edges)


def _centroid_yx(label_zyx: np.ndarray) -> Optional[Tuple[float, float]]:
    idx = np.nonzero(label_zyx > 0)
    return None if not idx[0].size else (float(idx[1].mean()), float(idx[2].mean()))


def predict_case(pred: Predictor, case: Case, *, tta: Optional[bool] = None, post: Optional[bool] = None,
                 centre_yx: Optional[Sequence[float]] = None, full_fov: Optional[bool] = None) -> np.ndarray:
    """Label map of ``case`` on its original grid (uint8, canonical labels).

    The checkpoint says how the model was trained (`Predictor.trained_on`), and the field
    is chosen from it, so the heart is never cut without a flag:

    - ``patches`` (windows smaller than the training field): the whole field of view is
      preprocessed; the model locates the structure with one cheap tiling pass and segments
      a box around it with the full sliding window and TTA (`locate_then_segment`).
    - ``crop`` (trained on the whole crop, e.g. heart-centred crops): the crop is centred on
      ``centre_yx`` (default: the image centre); if the predicted foreground touches the
      crop's edge, it is re-centred on that foreground once, and if it still touches, the
      whole field is segmented instead. Each step warns.

    Args:
        pred: The restored model and plan.
        case: Input case (original geometry).
        tta: Mirror TTA (default: the model's inference config).
        post: Post-processing (default: the model's inference config).
        centre_yx: Crop centre in original voxels (crop-trained models).
        full_fov: True: one sliding window over the whole field of view (no locating pass);
            False: the training crop at ``centre_yx`` as it is; None (default): chosen as above.
    """
    check_modality(case, pred.plan)
    if full_fov is None and pred.patch_trained and pred.spatial_dims == 2:
        label, _ = _predict_field(pred, case, inference_plan(pred.plan, case), centre_yx, tta, locate=True)
    elif full_fov:
        label, _ = _predict_field(pred, case, inference_plan(pred.plan, case), centre_yx, tta)
    else:
        label, record = _predict_field(pred, case, pred.plan, centre_yx, tta)
        if full_fov is None and "crop" in record and record["touches_border"]:
            where = case.source_path or case.case_id
            centre = _centroid_yx(label)
            warnings.warn(f"{where}: the prediction touches the edge of the {record['crop']['size_yx']} crop; "
                          f"re-centring on the predicted structure at {tuple(round(c) for c in centre)}",
                          RuntimeWarning, stacklevel=2)
            label, record = _predict_field(pred, case, pred.plan, centre, tta)
            if record["touches_border"]:
                warnings.warn(f"{where}: still touching the crop's edge; segmenting the whole field of view "
                              "(this model was trained on crops and may be less accurate there)",
                              RuntimeWarning, stacklevel=2)
                label, _ = _predict_field(pred, case, inference_plan(pred.plan, case), None, tta)
    if pred.cfg.inference.postprocess if post is None else post:
        label = postprocess(label, pred.task)
    return label


def _predict_field(pred: Predictor, case: Case, plan: Plan, centre_yx: Optional[Sequence[float]],
                   tta: Optional[bool], locate: bool = False) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Preprocess with ``plan``, predict (two-stage when ``locate``), argmax on the original grid.

    The record gains ``touches_border``: the preprocessed-space prediction reaches an edge
    of the crop that lies inside the image (`touches_border`).
    """
    inf = pred.cfg.inference
    pre, record = plan.preprocess(case, centre_yx=centre_yx)
    image = torch.from_numpy(pre.image).to(pred.device)
    kw = dict(num_classes=pred.cfg.model.num_classes, patch_size=pred.patch_size, overlap=inf.overlap,
              gaussian=inf.gaussian, tta=inf.tta if tta is None else tta, batch_size=inf.batch_size,
              divisible_by=size_multiple(pred.model), amp=inference_amp(pred.device))
    if locate:
        probs, _ = locate_then_segment(pred.model, image, **kw)
    else:
        probs = predict_volume(pred.model, image, spatial_dims=pred.spatial_dims, **kw)
    record["touches_border"] = "crop" in record and touches_border(probs.argmax(0).cpu().numpy(), record)
    back = plan.invert_probabilities(probs.float().cpu().numpy(), record)
    return back.argmax(0).astype(np.uint8), record


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
                  progress: Optional[Any] = None, full_fov: Optional[bool] = None, force: bool = False,
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
