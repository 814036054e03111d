"""Fold-by-architecture ensembles: the spec, a folder format, and fast two-stage inference.

An ensemble is a list of members (one trained fold model each, any backbone), how their
outputs combine (weighted softmax mean, or weighted majority vote), mirror TTA,
post-processing, and how crops are centred:

* ``centring="two_stage"`` (source paper §2.5): a first stage runs the *locator* members over
  the whole field of view (non-overlapping windows, no TTA: only a centroid is needed),
  takes the centroid of the predicted foreground as the heart centre, and the second stage runs every member on its training crop centred there. Transformer
  members trained on 224 crops thus see the heart where they were trained to see it, without
  a special case in any model.
* ``centring="image"``: crops centred on the image (what a single `robustseg predict` does).

Members that share a preprocessing plan, dimensionality, window and class count form a group
and run together: each window batch goes through every member of the group before the next
batch, and for 2D groups the slices of all volumes in a call (several requests batched by
Serve) are stacked into one batch. Group outputs are inverted to each input's original grid
and combined there, so members with different plans can be mixed.

The folder format (``spec.json`` + ``members/<name>.pt`` slim checkpoints holding weights,
config and plan) is what the MLflow pyfunc model carries as artifacts
(`robustseg.ensemble.registry`); loading it needs torch, numpy, SimpleITK and this package only.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from robustseg.data.cases import Case
from robustseg.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from robustseg.engine.inference import predict_volume
from robustseg.engine.postprocess import postprocess
from robustseg.engine.predict import Predictor, check_modality, inference_plan, load_predictor
from robustseg.engine.precision import inference_amp
from robustseg.models import size_multiple

SPEC_FILE = "spec.json"
MEMBERS_DIR = "members"
COMBINE_MODES = ("mean", "vote")
CENTRING_MODES = ("two_stage", "image")
#: Checkpoint entries an ensemble member keeps (no optimiser, RNG or history).
SLIM_KEYS = ("model", "config", "plan", "backbone", "patch_size", "spacing", "class_names", "task")


@dataclass
class MemberSpec:
    """One member: a trained fold model.

    Attributes:
        name: Unique name, also the file stem (``unet2d_fold0``).
        backbone: Registered backbone.
        fold: Cross-validation fold it held out (-1: not a fold model).
        weight: Relative weight in the combination (> 0).
        run_id: MLflow run that trained it ("" if untracked).
        source: Checkpoint it was taken from (provenance).
        locator: Takes part in the first (centring) stage.
        full_fov: Segment the whole field of view instead of the training crop (for members
            whose training crops covered it).
    """

    name: str
    backbone: str
    fold: int = -1
    weight: float = 1.0
    run_id: str = ""
    source: str = ""
    locator: bool = True
    full_fov: bool = False


@dataclass
class EnsembleSpec:
    """What an ensemble is and how it predicts (stored as ``spec.json``).

    Attributes:
        name: Ensemble name (the registered model name by default).
        task: Canonical label set of every member ("cardiac", "lung_binary", ...).
        class_names: ``{label value: name}``, background included.
        label_convention: Human-readable statement of the output labels.
        combine: "mean" (weighted softmax mean) or "vote" (weighted majority of member labels).
        tta: Mirror TTA.
        postprocess: Task post-processing of the combined labels.
        centring: "two_stage" or "image" (see the module notes).
        members: The members.
        metrics: Validation figures (out-of-fold Dice ...), for the registry and `/v1/model`.
        provenance: Sweep, data manifest URI, git commit ...
    """

    name: str
    task: str
    class_names: Dict[int, str]
    members: List[MemberSpec]
    label_convention: str = ""
    combine: str = "mean"
    tta: bool = True
    postprocess: bool = True
    centring: str = "two_stage"
    metrics: Dict[str, float] = field(default_factory=dict)
    provenance: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.centring not in CENTRING_MODES:
            raise ValueError(f"centring must be one of {CENTRING_MODES}, got {self.centring!r}")
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        for m in self.members:
            if not (math.isfinite(m.weight) and m.weight > 0):
                raise ValueError(f"member {m.name}: weight must be positive, got {m.weight}")
        self.class_names = {int(k): str(v) for k, v in self.class_names.items()}

    @property
    def backbones(self) -> List[str]:
        """The members' backbones, sorted, each once."""
        return sorted({m.backbone for m in self.members})

    @property
    def kind(self) -> str:
        """``"single model"``, ``"fold ensemble"`` (one backbone's folds) or ``"architecture ensemble"``."""
        if len(self.members) == 1:
            return "single model"
        return "fold ensemble" if len(self.backbones) == 1 else "architecture ensemble"

    def composition(self) -> str:
        """What the ensemble is, in words: ``fold ensemble of unet (2 folds)``,
        ``architecture ensemble of unet+unet2d (2 backbones x 2 folds = 4 members)``."""
        folds = len({m.fold for m in self.members})
        if self.kind == "single model":
            return f"single model {self.members[0].backbone}"
        if self.kind == "fold ensemble":
            return f"fold ensemble of {self.backbones[0]} ({folds} folds)"
        return (f"architecture ensemble of {'+'.join(self.backbones)} ({len(self.backbones)} backbones x {folds} folds"
                f" = {len(self.members)} members)")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict (class keys as strings)."""
        d = dataclasses.asdict(self)
        d["class_names"] = {str(k): v for k, v in self.class_names.items()}
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EnsembleSpec":
        """Inverse of `to_dict`; unknown keys fail, naming them."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown ensemble spec keys {extra}; valid: {sorted(known)}")
        d["members"] = [MemberSpec(**m) for m in d.get("members", [])]
        return cls(**d)


def _lcm_axes(multiples: Sequence[Tuple[int, ...]]) -> Tuple[int, ...]:
    out = list(multiples[0])
    for m in multiples[1:]:
        out = [a * b // math.gcd(a, b) for a, b in zip(out, m)]
    return tuple(out)


@dataclass
class _Group:
    """Members run together: same plan, dimensionality, window, classes and FOV mode."""

    predictors: List[Predictor]
    weights: List[float]
    full_fov: bool

    @property
    def first(self) -> Predictor:
        return self.predictors[0]

    def divisible_by(self) -> Tuple[int, ...]:
        return _lcm_axes([tuple(size_multiple(p.model)) for p in self.predictors])


def _stack(images: Sequence[np.ndarray], patch: Sequence[int], divisible_by: Sequence[int]) -> np.ndarray:
    """Slices of several volumes as one ``(sum Z, H, W)`` batch, identical to one call per volume.

    The sliding window pads a batch with its minimum; stacked volumes would share one pad
    value and each volume's answer would depend on its batch mates. Each volume is therefore
    padded here with its own minimum to the size the window would pad it to (centred, as the
    window pads), so no further padding happens and each volume sees what it sees alone.
    """
    if len(images) == 1:
        return images[0]
    size = [max(max(p, s) for s in sizes) for p, sizes in zip(
        [-(-int(p) // d) * d for p, d in zip(patch, divisible_by)], zip(*[im.shape[1:] for im in images]))]
    size = [-(-s // d) * d for s, d in zip(size, divisible_by)]
    out = []
    for im in images:
        before = [(P - s) // 2 for P, s in zip(size, im.shape[1:])]
        pads = [(0, 0)] + [(b, P - s - b) for b, P, s in zip(before, size, im.shape[1:])]
        out.append(np.pad(im, pads, mode="constant", constant_values=float(im.min())))
    return np.concatenate(out)


def _group(predictors: Sequence[Predictor], specs: Sequence[MemberSpec], full_fov: Optional[bool] = None) -> List[_Group]:
    groups: Dict[str, _Group] = {}
    for pred, spec in zip(predictors, specs):
        fov = spec.full_fov if full_fov is None else full_fov
        key = json.dumps([pred.plan.to_dict(), pred.spatial_dims, list(pred.patch_size), pred.cfg.model.num_classes, fov],
                         sort_keys=True)
        g = groups.setdefault(key, _Group([], [], fov))
        g.predictors.append(pred)
        g.weights.append(float(spec.weight))
    return list(groups.values())


class Ensemble:
    """Members resident on one device, predicting together (see the module notes).

    Args:
        spec: The ensemble spec.
        predictors: One restored model per member, in ``spec.members`` order.
        compile: ``torch.compile`` every member (CUDA; a few seconds of warm-up per shape).
    """

    def __init__(self, spec: EnsembleSpec, predictors: Sequence[Predictor], compile: bool = False) -> None:
        if len(predictors) != len(spec.members):
            raise ValueError(f"{len(spec.members)} members in the spec but {len(predictors)} models")
        num_classes = {p.cfg.model.num_classes for p in predictors}
        if len(num_classes) != 1 or {p.task for p in predictors} != {spec.task}:
            raise ValueError(f"members disagree on task/classes: {sorted({p.task for p in predictors})}, {num_classes}")
        self.spec = spec
        self.predictors = list(predictors)
        self.device = self.predictors[0].device
        if compile:
            for p in self.predictors:
                p.model = torch.compile(p.model)
        self.stage2 = _group(self.predictors, spec.members)
        locators = [(p, s) for p, s in zip(self.predictors, spec.members) if s.locator] or list(
            zip(self.predictors, spec.members))
        self.stage1 = _group([p for p, _ in locators], [s for _, s in locators], full_fov=True)

    @property
    def num_classes(self) -> int:
        """Output classes, background included."""
        return self.predictors[0].cfg.model.num_classes

    @property
    def needs_centre(self) -> bool:
        """Whether the second stage has cropped members that a first-stage centre would help."""
        return self.spec.centring == "two_stage" and any(not g.full_fov for g in self.stage2)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, checkpoints: Sequence[Union[str, Path]], *, name: str = "ensemble",
                         members: Optional[Sequence[MemberSpec]] = None, device: Optional[torch.device] = None,
                         compile: bool = False, **spec_kwargs: Any) -> "Ensemble":
        """Build from fit-loop checkpoints (``best.pt``).

        Args:
            checkpoints: One checkpoint per member.
            name: Ensemble name.
            members: Member specs (default: ``<backbone>_<i>``, weight 1, fold from the config).
            device: Inference device (default CUDA if available).
            compile: ``torch.compile`` the members.
            **spec_kwargs: Other `EnsembleSpec` fields (combine, tta, postprocess, centring, ...).
        """
        preds = [load_predictor(c, device) for c in checkpoints]
        if members is None:
            members = [MemberSpec(name=f"{p.cfg.model.name}_{i}", backbone=p.cfg.model.name,
                                  fold=int(p.cfg.data.val_fold if p.cfg.data.val_fold is not None else -1),
                                  source=str(c)) for i, (p, c) in enumerate(zip(preds, checkpoints))]
        first = preds[0]
        spec_kwargs.setdefault("tta", bool(first.cfg.inference.tta))
        spec_kwargs.setdefault("postprocess", bool(first.cfg.inference.postprocess))
        spec_kwargs.setdefault("label_convention", label_convention(first.task, first.class_names))
        spec = EnsembleSpec(name=name, task=first.task, class_names=dict(first.class_names), members=list(members),
                            **spec_kwargs)
        return cls(spec, preds, compile=compile)

    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``spec.json`` and slim member checkpoints to ``folder``."""
        folder = Path(folder)
        (folder / MEMBERS_DIR).mkdir(parents=True, exist_ok=True)
        for spec, pred in zip(self.spec.members, self.predictors):
            ckpt = load_checkpoint(pred.source, map_location="cpu")
            save_checkpoint(folder / MEMBERS_DIR / f"{spec.name}.pt", {k: ckpt[k] for k in SLIM_KEYS if k in ckpt})
        (folder / SPEC_FILE).write_text(json.dumps(self.spec.to_dict(), indent=1))
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path], device: Optional[torch.device] = None, compile: bool = False) -> "Ensemble":
        """Read an ensemble folder written by `save`.

        Raises:
            CheckpointError: missing or unreadable spec or member file.
        """
        folder = Path(folder)
        spec_path = folder / SPEC_FILE
        if not spec_path.is_file():
            raise CheckpointError(f"{spec_path}: no ensemble spec (is {folder} an ensemble folder?)")
        try:
            spec = EnsembleSpec.from_dict(json.loads(spec_path.read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{spec_path}: invalid ensemble spec ({e})") from None
        preds = [load_predictor(folder / MEMBERS_DIR / f"{m.name}.pt", device) for m in spec.members]
        return cls(spec, preds, compile=compile)

    # -- inference ------------------------------------------------------------------------
    def _run_group(self, group: _Group, cases: Sequence[Case], centres: Sequence[Optional[Tuple[float, float]]],
                   vote: bool, coarse: bool = False) -> List[np.ndarray]:
        """Probabilities (or weighted one-hot votes) of a group, on each case's original grid.

        ``coarse``: the locating pass, which only needs a centroid: non-overlapping windows and
        no TTA (a sixteenth of the full sliding window's forwards with 0.5 overlap and 4 flips).
        """
        p0 = group.first
        inf = p0.cfg.inference
        preps = []
        for case, centre in zip(cases, centres):
            plan = inference_plan(p0.plan, case) if group.full_fov else p0.plan
            pre, record = plan.preprocess(case, centre_yx=None if group.full_fov else centre)
            preps.append((plan, pre.image, record))
        kwargs = dict(spatial_dims=p0.spatial_dims, num_classes=self.num_classes, patch_size=p0.patch_size,
                      overlap=0.0 if coarse else inf.overlap, gaussian=inf.gaussian,
                      tta=False if coarse else self.spec.tta, batch_size=inf.batch_size,
                      divisible_by=group.divisible_by(), amp=inference_amp(self.device))
        # 2D members see slices independently: stack every volume of the call into one batch.
        stacks: List[List[int]] = []
        if p0.spatial_dims == 2:
            by_shape: Dict[Tuple[int, int], List[int]] = {}
            for i, (_, img, _) in enumerate(preps):
                by_shape.setdefault(tuple(img.shape[1:]), []).append(i)
            stacks = list(by_shape.values())
        else:
            stacks = [[i] for i in range(len(preps))]
        out: List[Optional[np.ndarray]] = [None] * len(cases)
        for idx in stacks:
            image = torch.from_numpy(_stack([preps[i][1] for i in idx], p0.patch_size, kwargs["divisible_by"])).to(
                self.device)
            if vote:
                probs = torch.zeros((self.num_classes,) + tuple(image.shape), device=self.device)
                for pred, w in zip(group.predictors, group.weights):
                    lab = predict_volume(pred.model, image, **kwargs).argmax(0)
                    probs += w * torch.nn.functional.one_hot(lab, self.num_classes).permute(3, 0, 1, 2).float()
                probs /= sum(group.weights)
            else:
                probs = predict_volume([p.model for p in group.predictors], image, weights=group.weights, **kwargs)
            probs_np = probs.float().cpu().numpy()
            z0 = 0
            for i in idx:
                plan, img, record = preps[i]
                pad = [(P - s) // 2 for P, s in zip(probs_np.shape[2:], img.shape[1:])]
                part = probs_np[:, z0 : z0 + img.shape[0], pad[0] : pad[0] + img.shape[1], pad[1] : pad[1] + img.shape[2]]
                z0 += img.shape[0]
                out[i] = plan.invert_probabilities(part, record)
        return out  # type: ignore[return-value]

    def _combine(self, groups: Sequence[_Group], cases: Sequence[Case],
                 centres: Sequence[Optional[Tuple[float, float]]], vote: bool, coarse: bool = False) -> List[np.ndarray]:
        total = sum(sum(g.weights) for g in groups)
        acc: List[Optional[np.ndarray]] = [None] * len(cases)
        for g in groups:
            w = sum(g.weights) / total
            for i, p in enumerate(self._run_group(g, cases, centres, vote, coarse)):
                acc[i] = w * p if acc[i] is None else acc[i] + w * p
        return acc  # type: ignore[return-value]

    def _labels(self, probs: np.ndarray) -> np.ndarray:
        label = probs.argmax(0).astype(np.uint8)
        return postprocess(label, self.spec.task) if self.spec.postprocess else label

    def locate(self, cases: Sequence[Case]) -> List[Optional[Tuple[float, float]]]:
        """First stage: foreground centroid ``(y, x)`` in each case's original voxels (None if empty)."""
        probs = self._combine(self.stage1, cases, [None] * len(cases), vote=False, coarse=True)
        centres: List[Optional[Tuple[float, float]]] = []
        for p in probs:
            fg = np.nonzero(self._labels(p))
            centres.append((float(fg[1].mean()), float(fg[2].mean())) if fg[0].size else None)
        return centres

    def predict_probabilities(self, cases: Sequence[Case]) -> Tuple[List[np.ndarray], List[Optional[Tuple[float, float]]]]:
        """Combined class probabilities ``(C, Z, Y, X)`` per case on its original grid, and the centres used."""
        for case in cases:
            check_modality(case, self.predictors[0].plan)
        centres = self.locate(cases) if self.needs_centre else [None] * len(cases)
        return self._combine(self.stage2, cases, centres, vote=self.spec.combine == "vote"), centres

    def predict_cases(self, cases: Sequence[Case]) -> List[np.ndarray]:
        """Label maps (uint8, canonical labels) on each case's original grid.

        Raises:
            DataError: an input that cannot be the modality the members expect.
        """
        probs, _ = self.predict_probabilities(cases)
        return [self._labels(p) for p in probs]

    def describe(self) -> Dict[str, Any]:
        """Members, combination and metrics (for `/v1/model` and the CLI)."""
        return {"name": self.spec.name, "task": self.spec.task, "combine": self.spec.combine, "tta": self.spec.tta,
                "centring": self.spec.centring, "postprocess": self.spec.postprocess,
                "class_names": {str(k): v for k, v in self.spec.class_names.items()},
                "label_convention": self.spec.label_convention,
                "members": [dataclasses.asdict(m) for m in self.spec.members],
                "metrics": dict(self.spec.metrics), "provenance": dict(self.spec.provenance)}


def label_convention(task: str, class_names: Dict[int, str]) -> str:
    """One line stating the output labels, e.g. ``cardiac: 0 background, 1 LV, 2 MYO, 3 RV``."""
    return f"{task}: " + ", ".join(f"{k} {v}" for k, v in sorted(class_names.items()))
