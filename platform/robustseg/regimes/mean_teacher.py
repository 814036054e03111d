"""The mean-teacher regime: semi-supervised training with an EMA teacher and pseudo labels.

Thesis (seed 002) §2.3 and Ch. 5.3, after Tarvainen & Valpola 2017 ("Mean teachers are
better role models", the thesis's reference [16]): the student (``ctx.model``, trained by
``ctx.optimizer``) learns from labelled slices, from noisily pseudo-labelled patches (Ch. 5.3.4:
unlabelled patches given the soft mask of their most similar labelled patch in the encoder's
feature space) and from a consistency cost on unlabelled slices, whose targets come from a
teacher whose weights are an exponential moving average (EMA) of the student's.

One step, in order:

1. Labelled batch -> ``ctx.augmenter`` -> optional mixup (``params.mixup``, with probability
   ``ctx.mixup_p``): ``symmetric`` as the supervised regime, or ``asymmetric`` (Li et al.,
   thesis [10]; `robustseg.augment.mixup.asymmetric_mixup_batch`).
2. Unlabelled batch (``next(ctx.unlabelled)``): one shared pass of ``ctx.augmenter`` (same
   geometry for both views, so the two predictions stay voxel-aligned), then two views, each
   with its own draw of the augmenter's intensity transforms and its own clipped Gaussian
   noise (Tarvainen: the student and the teacher see independent noise eta, eta'; UA-MT,
   Yu et al. MICCAI 2019: ``clamp(randn * 0.1, -0.2, 0.2)``). Spatial transforms are not
   drawn per view: they would need the predictions warped back before comparing.
3. Teacher forward on its view without gradients, in the student's train/eval mode
   (Tarvainen: the teacher's own dropout is part of its noise).
4. Student forward on ``[labelled; student view]`` (one forward: DDP-safe); pseudo-labelled
   patches join it when their (padded) size matches, else take a second forward.
5. ``loss = supervised + w(t) * consistency + pseudo_weight * pseudo``, with consistency the
   mean squared difference of the softmax probabilities (over samples, classes and voxels, as
   UA-MT's ``softmax_mse_loss``) and ``w(t) = consistency_weight * sigmoid_rampup(t, rampup_steps)``.
6. Backward, gradient clipping, optimiser step, then the EMA update of the teacher:
   ``teacher = a * teacher + (1 - a) * student`` with ``a = min(1 - 1 / (t + 1), decay)``, ``t``
   the number of optimiser steps taken (1 at the first update), as the reference code's
   ``update_ema_variables`` (github.com/CuriousAI/mean-teacher): early on the teacher is close
   to a plain average of the student's iterates, not stuck near its initial weights. Buffers
   (normalisation statistics) are copied from the student, not averaged.

Pseudo-labelled patches (``params.pseudo_labels``: a ``.pt`` file written by
``robustseg.engine.pseudo_labels``) are padded, not resampled, to the network's size multiple:
they were cut at the training spacing, so resampling would change the apparent size of
lesions. The padding mirrors image and soft mask together (replicating when a patch is too
small to mirror), so the border gets a plausible image with its own label rather than fake
background or an unsupervised hole (`DiceCELoss` has no ignore mask). They are not augmented:
the augmenter's spatial transforms take integer labels only.

The fit loop validates and checkpoints the student (``ctx.model``); the teacher lives in this
regime's state (`MeanTeacher.state_dict`: ``teacher`` weights and the ``step`` counter), so a
resumed run continues the EMA and the ramp-up exactly. `MeanTeacher.teacher` is the module.

Returned parts (detached tensors): ``loss``, the supervised parts (``ce``, ``dice_loss``),
``consistency`` (unweighted), ``consistency_weight`` (w(t) of the step), ``pseudo_loss``
(unweighted; 0 without pseudo labels) and ``ema_decay`` (a of the step).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from robustseg.augment.intensity import augment_intensity
from robustseg.augment.mixup import asymmetric_mixup_batch, mixup_batch
from robustseg.config import ConfigError, doc
from robustseg.engine.averaging import ema_update, make_teacher
from robustseg.engine.checkpoint import CheckpointError, unwrap
from robustseg.engine.losses import to_soft
from robustseg.engine.pseudo_labels_files import load_pseudo_labels
from robustseg.errors import DataError
from robustseg.models import size_multiple
from robustseg.registry import REGIMES
from robustseg.regimes.step import autocast, backward_and_step

log = logging.getLogger(__name__)

_MT = "Tarvainen & Valpola 2017 (github.com/CuriousAI/mean-teacher)"
_UAMT = "UA-MT (Yu et al., MICCAI 2019, github.com/yulequan/UA-MT), the mean-teacher reference for segmentation"
MIXUP_KINDS = ("none", "symmetric", "asymmetric")


@dataclass
class MeanTeacherParams:
    """Parameters of the mean-teacher step (defaults from the papers and code cited)."""

    decay: float = doc(0.99, f"EMA decay of the teacher, used as min(1 - 1/(step + 1), decay). {_MT}: ema_decay=0.99 "
                             f"(0.99 during ramp-up in their TensorFlow code); {_UAMT}: 0.99.")
    decay_after_rampup: Optional[float] = doc(None, f"EMA decay once step >= rampup_steps; null keeps decay. {_MT} "
                                                    "(TensorFlow): 0.999 after ramp-up.")
    consistency_weight: float = doc(0.1, f"Maximum weight of the consistency cost (mean over samples, classes and "
                                         f"voxels of the squared softmax difference). {_UAMT}: consistency=0.1. "
                                         "Tarvainen's classification weights (1-100) sum over classes instead.")
    rampup_steps: int = doc(6000, f"Optimiser steps of the sigmoid ramp-up exp(-5 (1 - t/T)^2) of the consistency "
                                  f"weight (Laine & Aila 2017; {_MT}); 0: full weight from the start. {_UAMT}: 40 "
                                  "ramp-up units of 150 iterations = 6000 steps.")
    noise_std: float = doc(0.1, f"Std of the Gaussian noise added to each unlabelled view (image units). {_UAMT}: 0.1.")
    noise_clip: float = doc(0.2, f"Each noise value is clamped to +-noise_clip; 0: no clamping. {_UAMT}: 0.2.")
    augment_unlabelled: bool = doc(True, "Pass the unlabelled batch once through ctx.augmenter (shared by both views) "
                                         "before the views are drawn; Tarvainen augments every input.")
    view_intensity: bool = doc(True, "Give each view its own draw of the augmenter's intensity transforms (noise, blur, "
                                     "brightness, contrast, low resolution, gamma) on top of the noise; needs the "
                                     "engine's Augmenter.")
    pseudo_labels: Optional[str] = doc(None, "Path of a .pt file of pseudo-labelled patches ({images, soft, similarity, "
                                             "source, meta}; robustseg.engine.pseudo_labels); null: none. Thesis Ch. 5.3.4.")
    pseudo_batch: int = doc(4, "Pseudo-labelled patches drawn (with replacement) per step. The thesis gives no value.")
    pseudo_weight: float = doc(1.0, "Weight of the supervised loss on the pseudo-labelled patches (soft targets). The "
                                    "thesis gives no value (Ch. 5.3.5 is empty); 1 weighs them as a labelled batch.")
    similarity_weighting: bool = doc(False, "Weight each pseudo-labelled patch by its similarity score (normalised over "
                                            "the drawn patches). Thesis Ch. 5.3.4 calls the score 'the weight for this "
                                            "sample' but keeps only scores in [0.87, 0.96], where it changes little.")
    mixup: str = doc("symmetric", "Mixup of the labelled batch, applied with probability augment.mixup: symmetric (as the "
                                  "supervised regime), asymmetric (Li, Kamnitsas & Glocker 2019, thesis [10]: rare classes "
                                  "kept hard) or none (then augment.mixup must be 0).")
    mixup_margin: float = doc(0.2, "Asymmetric mixup: a partner image's rare class is painted over only where the partner's "
                                   "weight exceeds this. Li et al.'s code: mixupbiasmargin=0.2.")
    mixup_rare_classes: Optional[List[int]] = doc(None, "Asymmetric mixup: the under-represented classes; null: every "
                                                        "class but background (Li et al.: the foreground class).")
    grad_clip: float = doc(12.0, "Clip the gradient norm to this value (nnU-Net: 12); 0 disables.")

    validate_teacher: bool = doc(True, f"Validate, select and export the EMA teacher (best.pt holds it); false: the "
                                       f"student. {_MT}: the teacher is usually the more accurate model.")

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"regime.params.{name} {rule}, got {getattr(self, name)!r}")

        if not 0.0 <= self.decay <= 1.0:
            raise bad("decay", "must be in [0, 1]")
        if self.decay_after_rampup is not None and not 0.0 <= self.decay_after_rampup <= 1.0:
            raise bad("decay_after_rampup", "must be in [0, 1] or null")
        for name in ("rampup_steps", "pseudo_batch"):
            v = getattr(self, name)
            low = 1 if name == "pseudo_batch" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(name, f"must be an integer >= {low}")
        for name in ("consistency_weight", "noise_std", "noise_clip", "pseudo_weight", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if self.mixup not in MIXUP_KINDS:
            raise bad("mixup", f"must be one of {list(MIXUP_KINDS)}")
        if not 0.0 <= self.mixup_margin < 1.0:
            raise bad("mixup_margin", "must be in [0, 1)")
        rare = self.mixup_rare_classes
        if rare is not None and (not rare or len(set(rare)) != len(rare)
                                 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in rare)):
            raise bad("mixup_rare_classes", "must be null or a non-empty list of distinct class indices")
        if self.pseudo_labels is not None and not str(self.pseudo_labels).strip():
            raise bad("pseudo_labels", "must be a file path or null")


# --------------------------------------------------------------------------- EMA and ramp-up
def sigmoid_rampup(step: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(step / length, 0, 1)``; 1 when ``length`` is 0.

    Laine & Aila 2017 and Tarvainen & Valpola 2017 ramp the consistency weight up with it:
    ``exp(-5) ~ 0.0067`` at step 0, ``exp(-1.25) ~ 0.29`` half-way, 1 from ``length`` on.
    """
    if length <= 0:
        return 1.0
    t = min(max(float(step), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def ema_decay(step: int, decay: float) -> float:
    """The reference code's effective decay ``min(1 - 1 / (step + 1), decay)`` after ``step`` optimiser steps."""
    return min(1.0 - 1.0 / (step + 1.0), decay)


# --------------------------------------------------------------------------- pseudo labels
@dataclass
class PseudoLabels:
    """Pseudo-labelled patches: ``images`` (N, 1, H, W), ``soft`` (N, K, H, W) masks, ``similarity`` (N,)."""

    images: torch.Tensor
    soft: torch.Tensor
    similarity: torch.Tensor
    source: List[Any]
    meta: Dict[str, Any]


def read_pseudo_labels(path: str, num_classes: int) -> PseudoLabels:
    """Load a pseudo-label file (`robustseg.engine.pseudo_labels.load_pseudo_labels` checks the
    format) and check what this regime adds: the model's class count, finite values.

    Raises:
        DataError: naming the file: missing, unreadable, empty, not in the format, another
            number of classes than the model, or non-finite images or masks.
    """
    data = load_pseudo_labels(path)
    images, soft, sim = data["images"], data["soft"], data["similarity"]
    if soft.shape[1] != num_classes:
        raise DataError(path, f"soft masks have {soft.shape[1]} classes, the model {num_classes} (model.num_classes)")
    for key, t in (("images", images), ("soft", soft), ("similarity", sim)):
        if not bool(torch.isfinite(t).all()):
            raise DataError(path, f"{key} has non-finite values")
    return PseudoLabels(images.float(), soft.float().clamp(0, 1), sim.float(), list(data["source"]), dict(data["meta"]))


def pad_to_multiple(images: torch.Tensor, soft: torch.Tensor, multiple: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad patches (and their soft masks alike) symmetrically up to the next multiple per axis.

    Mirrors the patch where it is large enough (``pad < size``), replicates the edge otherwise.
    """
    pads: List[int] = []
    mirrorable = True
    for size, m in zip(reversed(images.shape[2:]), reversed(tuple(multiple))):  # F.pad wants the last axis first
        extra = (-size) % max(int(m), 1)
        pads += [extra // 2, extra - extra // 2]
        mirrorable = mirrorable and extra - extra // 2 < size
    if not any(pads):
        return images, soft
    mode = "reflect" if mirrorable else "replicate"
    return F.pad(images, pads, mode=mode), F.pad(soft, pads, mode=mode)


# --------------------------------------------------------------------------- the regime
def _first(out: Any) -> torch.Tensor:
    """Full-resolution logits of a model output (deep supervision returns a list, head 0 first)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _split(out: Any, sizes: Sequence[int]) -> List[Any]:
    """Split a batched output (tensor or list of heads) into consecutive chunks of ``sizes``."""
    if isinstance(out, torch.Tensor):
        return list(torch.split(out, list(sizes)))
    per_head = [torch.split(h, list(sizes)) for h in out]
    return [[chunks[i] for chunks in per_head] for i in range(len(sizes))]


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d tensor on ``device`` made by a fill kernel (no host-to-device copy to wait for)."""
    return torch.full((), float(value), device=device)


def softmax_mse(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the student's softmax and the teacher's probabilities (float32)."""
    return ((torch.softmax(student_logits.float(), dim=1) - teacher_probs.float()) ** 2).mean()


@REGIMES.register("mean_teacher", params=MeanTeacherParams, data="semi", source_patches=True)
class MeanTeacher:
    """Mean-teacher semi-supervised training with optional pseudo labels (see the module docstring)."""

    def setup(self, ctx: Any, params: MeanTeacherParams) -> None:
        """Check the data and mixup settings, build the EMA teacher, load the pseudo labels.

        Raises:
            ConfigError: no unlabelled stream (``data="semi"``), mixup settings that contradict
                ``augment.mixup``, rare classes beyond the model's, ``view_intensity`` without
                the engine's Augmenter, or pseudo labels for a 3D model.
            DataError: an invalid pseudo-label file.
        """
        if ctx.unlabelled is None:
            raise ConfigError("regime mean_teacher needs unlabelled data (it is registered with data='semi'): "
                              "ctx.unlabelled is None; train it with `robustseg train` on data with unlabelled slices "
                              "(e.g. data.label_budget)")
        self._check_mixup(ctx, params)
        if params.view_intensity and not isinstance(getattr(ctx.augmenter, "params", None), dict):
            raise ConfigError("regime.params.view_intensity needs the engine's Augmenter (its intensity parameters); "
                              "set view_intensity: false with another augmenter")
        self.ctx, self.params = ctx, params
        self.teacher = make_teacher(ctx.model)
        self.step = 0
        self.pseudo: Optional[PseudoLabels] = None
        if params.pseudo_labels is not None:
            self.pseudo = self._prepare_pseudo(params.pseudo_labels)

    @staticmethod
    def _check_mixup(ctx: Any, params: MeanTeacherParams) -> None:
        if params.mixup == "none" and ctx.mixup_p > 0:
            raise ConfigError(f"regime.params.mixup is none but augment.mixup is {ctx.mixup_p}: set augment.mixup: 0 "
                              "or choose mixup: symmetric or asymmetric")
        if params.mixup == "asymmetric" and ctx.mixup_p <= 0:
            raise ConfigError("regime.params.mixup is asymmetric but augment.mixup is 0: set augment.mixup > 0 "
                              "(the per-batch probability)")
        rare = params.mixup_rare_classes or []
        if any(c >= ctx.num_classes for c in rare):
            raise ConfigError(f"regime.params.mixup_rare_classes {rare} must be class indices below "
                              f"{ctx.num_classes} (model.num_classes)")

    def _prepare_pseudo(self, path: str) -> PseudoLabels:
        multiple = size_multiple(unwrap(self.ctx.model))
        if len(multiple) != 2:
            raise ConfigError("regime.params.pseudo_labels: pseudo-labelled patches are 2D; this model is "
                              f"{len(multiple)}D")
        pl = read_pseudo_labels(path, self.ctx.num_classes)
        images, soft = pad_to_multiple(pl.images, pl.soft, multiple)
        if images.shape[2:] != pl.images.shape[2:]:
            log.info("mean_teacher: pseudo-labelled patches padded from %s to %s (size multiple %s)",
                     tuple(pl.images.shape[2:]), tuple(images.shape[2:]), multiple)
        dev = self.ctx.device
        # Kept on the training device: drawing a batch is then an index, with no host round trip.
        return PseudoLabels(images.to(dev), soft.to(dev), pl.similarity.to(dev), pl.source, pl.meta)

    # ------------------------------------------------------------------ inputs
    def _mix(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ctx, p = self.ctx, self.params
        if p.mixup == "none" or ctx.mixup_p <= 0:
            return image, label
        if float(torch.rand((), generator=ctx.generator, device=ctx.device)) >= ctx.mixup_p:
            return image, label
        if p.mixup == "symmetric":
            return mixup_batch(image, to_soft(label, ctx.num_classes), ctx.mixup_alpha, ctx.generator)
        return asymmetric_mixup_batch(image, label, ctx.num_classes, ctx.mixup_alpha, ctx.generator,
                                      p.mixup_margin, p.mixup_rare_classes)

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        """One view: its own intensity draw (optional) and clipped Gaussian noise."""
        ctx, p = self.ctx, self.params
        if p.view_intensity:
            x = augment_intensity(x.float().clone(), ctx.augmenter.params, ctx.generator, {})  # works in place
        if p.noise_std > 0:
            noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype) * p.noise_std
            x = x + (noise.clamp(-p.noise_clip, p.noise_clip) if p.noise_clip > 0 else noise)
        return x

    def views(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(student view, teacher view)`` of an unlabelled batch."""
        ctx = self.ctx
        if self.params.augment_unlabelled:
            dummy = torch.zeros((image.shape[0], 1, *image.shape[2:]), dtype=torch.uint8, device=image.device)
            image, _ = ctx.augmenter(image, dummy, ctx.generator)
        return self._perturb(image), self._perturb(image)

    def _draw_pseudo(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.pseudo is None:
            return None
        pl = self.pseudo
        idx = torch.randint(pl.images.shape[0], (self.params.pseudo_batch,), generator=self.ctx.generator,
                            device=pl.images.device)
        return pl.images.index_select(0, idx), pl.soft.index_select(0, idx), pl.similarity.index_select(0, idx)

    # ------------------------------------------------------------------ losses
    def teacher_probs(self, view: torch.Tensor) -> torch.Tensor:
        """The teacher's softmax on its view, without gradients, in the student's train/eval mode."""
        self.teacher.train(unwrap(self.ctx.model).training)
        with torch.no_grad(), autocast(self.ctx):
            out = _first(self.teacher(view))
        return torch.softmax(out.float(), dim=1)

    def _forward(self, inputs: List[torch.Tensor]) -> List[Any]:
        """Student outputs per input; inputs of one spatial size share a forward (DDP: one per size)."""
        outs: List[Any] = [None] * len(inputs)
        shapes: List[Tuple[int, ...]] = []
        for x in inputs:
            if tuple(x.shape[1:]) not in shapes:
                shapes.append(tuple(x.shape[1:]))
        with autocast(self.ctx):
            for shape in shapes:
                idx = [i for i, x in enumerate(inputs) if tuple(x.shape[1:]) == shape]
                out = self.ctx.model(torch.cat([inputs[i] for i in idx]))
                for i, chunk in zip(idx, _split(out, [inputs[i].shape[0] for i in idx])):
                    outs[i] = chunk
        return outs

    def _pseudo_loss(self, out: Any, soft: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        if not self.params.similarity_weighting:
            return self.ctx.loss_fn(out, soft)[0]
        # Per-patch losses weighted by similarity; DiceCELoss of a batch is the mean of its
        # per-sample losses, so uniform weights give the unweighted loss.
        chunks = _split(out, [1] * soft.shape[0])
        per = [self.ctx.loss_fn(chunk, soft[i:i + 1])[0] for i, chunk in enumerate(chunks)]
        w = sim.clamp_min(0)  # a negative cosine similarity counts as no evidence at all
        return (torch.stack(per) * w).sum() / w.sum().clamp_min(1e-12)

    # ------------------------------------------------------------------ the step
    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One mean-teacher step; returns detached loss parts (the loop syncs once per epoch)."""
        ctx, p = self.ctx, self.params
        image, label = ctx.augmenter(batch["image"], batch["label"], ctx.generator)
        image, target = self._mix(image, label)
        student_view, teacher_view = self.views(next(ctx.unlabelled)["image"])
        pseudo = self._draw_pseudo()
        ref = self.teacher_probs(teacher_view)

        ctx.optimizer.zero_grad(set_to_none=True)
        inputs = [image, student_view] + ([pseudo[0]] if pseudo is not None else [])
        outs = self._forward(inputs)
        loss, parts = ctx.loss_fn(outs[0], target)
        consistency = softmax_mse(_first(outs[1]), ref)
        w_cons = p.consistency_weight * sigmoid_rampup(self.step, p.rampup_steps)
        loss = loss + w_cons * consistency
        pseudo_loss = torch.zeros((), device=image.device)
        if pseudo is not None:
            pseudo_loss = self._pseudo_loss(outs[2], pseudo[1], pseudo[2])
            loss = loss + p.pseudo_weight * pseudo_loss
        backward_and_step(ctx, loss, p.grad_clip)

        self.step += 1
        decay = ema_decay(self.step, self.current_decay())
        ema_update(self.teacher, unwrap(ctx.model), decay)
        return {"loss": loss.detach(), **parts, "consistency": consistency.detach(),
                "consistency_weight": _scalar(w_cons, image.device), "pseudo_loss": pseudo_loss.detach(),
                "ema_decay": _scalar(decay, image.device)}

    def current_decay(self) -> float:
        """The configured decay at this step (``decay_after_rampup`` once the ramp-up is over)."""
        p = self.params
        if p.decay_after_rampup is not None and self.step >= p.rampup_steps:
            return p.decay_after_rampup
        return p.decay

    def eval_model(self) -> torch.nn.Module:
        """The network the fit loop validates and stores in ``best.pt``: the EMA teacher by default.

        Tarvainen & Valpola report the teacher as the better model; ``validate_teacher: false``
        keeps the student. Resuming always restores the student (``last.pt``'s model) and the
        teacher (this regime's state).
        """
        return self.teacher if self.params.validate_teacher else self.ctx.model

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The teacher's weights and buffers (copies) and the optimiser-step counter."""
        return {"teacher": {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}, "step": self.step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore `state_dict`'s teacher and step (an empty state keeps the fresh teacher, with a warning).

        Raises:
            CheckpointError: a non-empty state without ``teacher`` and ``step``, or teacher weights
                that do not fit this model.
        """
        if not state:
            log.warning("mean_teacher: no regime state to restore; the teacher restarts as a copy of the student")
            return
        if "teacher" not in state or "step" not in state:
            raise CheckpointError(f"mean_teacher: regime state needs 'teacher' and 'step', got keys {sorted(state)}")
        try:
            self.teacher.load_state_dict(state["teacher"])
        except RuntimeError as e:
            raise CheckpointError(f"mean_teacher: the stored teacher does not fit this model ({e})") from None
        self.step = int(state["step"])


__all__ = ["MIXUP_KINDS", "MeanTeacher", "MeanTeacherParams", "PseudoLabels", "ema_decay", "ema_update", "make_teacher",
           "pad_to_multiple", "read_pseudo_labels", "sigmoid_rampup", "softmax_mse"]
