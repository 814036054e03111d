"""The AdvChain regime: adversarial data augmentation with a chain of bounded perturbations.

Seed paper §2.4 (after Chen et al., MedIA 2022, "AdvChain"): each step draws a random
sub-chain of {noise, bias, affine, deformation} in random order with random parameters,
then, with the network frozen, takes ``n_iter`` projected gradient-ascent steps on the
perturbation parameters to *increase* a consistency loss between the network's prediction on
the clean image and its back-warped prediction on the perturbed one (MSE on probabilities +
a contour term on Sobel gradients of the probability maps). The network step then minimises
supervised loss + ``consistency_weight`` x that consistency on the optimised perturbation.

One step, in order:

1. Random augmentation of the labelled batch (``ctx.augmenter``), as in ``supervised``.
2. Frozen network (`frozen`): eval mode (dropout off, norm layers use stored statistics),
   ``requires_grad`` off on every parameter, norm running statistics snapshotted and restored
   bit-for-bit, gradients taken with ``torch.autograd.grad`` on the perturbation only, so
   nothing accumulates on the model and the optimiser is untouched. The reference prediction
   (probabilities of the clean image) is computed here, once, without gradients.
3. Network step in train mode on one batch ``[clean; adversarial]`` (one forward, DDP-safe):
   supervised loss (``ctx.loss_fn``, deep supervision included) on the clean half, plus
   ``consistency_weight`` x consistency(reference, back-warped adversarial prediction).
   The reference is a fixed target (AdvChain detaches it too). With batch norm, the running
   statistics of this step see both halves; nnU-Net's instance norm has none.
   ``adv_supervised_weight`` > 0 adds the supervised loss on the adversarial half against
   labels moved by the same spatial chain (nearest); off by default: the seed paper trains on
   "supervised loss together with consistency loss", and AdvChain's README adds the
   consistency term only.

Consistency is a weighted mean over clean-frame voxels, the weights falling to 0 where the
forward-then-inverse warp left the view and ramping down near both frames' edges
(``border_margin``); the prediction is resampled as probabilities and compared with the
clean reference as predicted (AdvChain warps the reference forth and back too: see
`AdvChainRegime._consistency`). 3D batches leave out the deformation (logged once); noise,
bias and in-plane affine work on ``(N, 1, D, H, W)``.

The paper's schedule (pre-train with random augmentation, then fine-tune with AdvChain with
random noise, rotation and scaling off) is two runs; the fine-tuning config is::

    regime: {name: advchain, init: <pre-trained checkpoint or models:/...>, params: {}}
    augment: {preset: nnunet, params: {noise: {p: 0}, rotation: {p: 0}, scaling: {p: 0}}}

``regime.init`` and its ``init_*`` options belong to the fit loop, not to this regime;
`PAPER_FINETUNE_AUGMENT` holds the augment overrides.

Returned parts (detached tensors): ``loss``, the supervised parts (``ce``, ``dice_loss``),
``adv_consistency`` (the consistency term of the network step), ``inner_start`` (consistency
at the random initial perturbation), ``inner_gain`` (``adv_consistency - inner_start``: what
the inner maximisation added; exact for networks without dropout or batch norm, whose train
and eval modes agree) and ``adv_applied`` (1/0: steps skipped by ``adv_p`` report zeros, so
epoch means of the adversarial parts are diluted by ``1 - adv_p``).

Known defects of the reference code not reproduced: its solver indexes the per-transform
``step_sizes`` list by inner iteration, so they are never used per transform (here each
transform steps with its own size, tested); nothing here uses NumPy, so NumPy 2 / Python 3.11
changes do not apply.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import torch
import torch.nn.functional as F

from robustseg.augment.advchain import TRANSFORMS, AdvChain, Affine, BiasField, Deformation, Noise, random_subchain
from robustseg.config import ConfigError, doc
from robustseg.registry import REGIMES
from robustseg.regimes.step import autocast, backward_and_step

log = logging.getLogger(__name__)

PAPER_FINETUNE_AUGMENT: Dict[str, Dict[str, float]] = {"noise": {"p": 0.0}, "rotation": {"p": 0.0}, "scaling": {"p": 0.0}}

_ADV = "AdvChain (Chen et al., MedIA 2022; README of github.com/cherise215/advchain)"


@dataclass
class AdvChainParams:
    """Parameters of the AdvChain step (defaults from the seed paper and AdvChain, as cited)."""

    transforms: List[str] = doc(["noise", "affine", "deformation"],
                                "Transform family the random sub-chain is drawn from (noise, bias, affine, deformation). "
                                "Seed paper §2.4: 'Gaussian noise, spatial transformation, and diffeomorphic "
                                "deformation'; add bias for AdvChain's full family.")
    n_iter: int = doc(1, f"Inner gradient-ascent steps on the perturbation (0: random chain, no attack). {_ADV}: n_iter=1.")
    step_noise: float = doc(1.0, f"Noise step, in units of its bound (L2-normalised gradient). {_ADV}: step_sizes=1.")
    step_bias: float = doc(1.0, f"Bias control-point step, units of the bound (gradient sign). {_ADV}: step_sizes=1.")
    step_affine: float = doc(1.0, f"Affine step, units of the bounds (gradient sign, as AdvAffine). {_ADV}: step_sizes=1.")
    step_deformation: float = doc(1.0, f"Velocity control-point step, units of the bound (gradient sign). {_ADV}: step_sizes=1.")
    noise_epsilon: float = doc(1.0, f"L2 norm bound of the additive noise per sample (whole image). {_ADV}: epsilon=1 "
                                    "for images in [0, 1] (the seed paper min-max normalises).")
    bias_spacing: float = doc(0.5, f"Bias control-point spacing as a fraction of each axis. {_ADV}: "
                                   "control_point_spacing=[H//2, W//2].")
    bias_log_bound: float = doc(0.3, f"Bound of |log bias|: the field stays in [exp(-b), exp(b)] = [0.74, 1.35]. {_ADV}: "
                                     "epsilon=0.3 (bias clipped to 1 +- 0.3), 'log' space.")
    rotation_degrees: float = doc(30.0, f"Rotation bound in degrees (in-plane). {_ADV}: rot=30/180 (x pi).")
    scale: float = doc(0.2, f"Scale factors within 1 +- scale, per in-plane axis. {_ADV}: scale_x=scale_y=0.2.")
    shift: float = doc(0.05, f"Shift bound as a fraction of each in-plane axis. {_ADV}: shift_x=shift_y=0.1 "
                             "in [-1, 1] grid units, i.e. 5% of the field of view.")
    deform_spacing: int = doc(16, f"Velocity control-point spacing in pixels (at least 2 points per axis). {_ADV}: "
                                  "vector_size=[H//16, W//16].")
    deform_sigma: float = doc(1.0, "Gaussian smoothing of the velocity control grid, in control points. AdvChain's "
                                   "AdvMorph: sigma=1.")
    deform_magnitude: float = doc(0.0625, "Bound of each velocity component (and so of the displacement) as a fraction "
                                          "of the axis: 8 px at 128, 16 px at 256. AdvChain bounds the velocity's L2 norm "
                                          "by 1.5 grid units instead, about 6.6% of the view RMS at 128x128.")
    squaring_steps: int = doc(8, "Scaling-and-squaring steps integrating the velocity. AdvChain's AdvMorph: num_steps=8.")
    consistency_weight: float = doc(1.0, "Weight (lambda) of the adversarial consistency term in the network step. The "
                                         "seed paper adds it to the supervised loss unweighted; AdvChain's README leaves "
                                         "w to the user.")
    mse_weight: float = doc(1.0, f"Weight of the MSE between probability maps in the consistency. {_ADV}: "
                                 "divergence_weights=[1.0, 0.5] for ['mse', 'contour'].")
    contour_weight: float = doc(0.5, f"Weight of the contour (Sobel-gradient MSE) term. {_ADV}: 0.5; the seed paper's "
                                     "ref. [9] (Chen et al., MICCAI 2020) introduced it.")
    border_margin: float = doc(8.0, "Pixels over which the consistency weight ramps from 0 to 1 at the edges of the "
                                    "clean and perturbed frames (0: none). The network's zero-padding effects there are "
                                    "not the perturbation's doing; pixels whose round trip left the view get weight 0. "
                                    "AdvChain uses a hard in-view mask instead (see robustseg.augment.advchain).")
    adv_p: float = doc(1.0, "Probability that a step is adversarial (otherwise a plain supervised step). Seed paper: "
                            "every fine-tuning iteration.")
    adv_supervised_weight: float = doc(0.0, "Weight of a supervised loss on the adversarial image with labels moved by "
                                            "the same spatial chain (nearest); 0 = off (seed paper, AdvChain README).")
    preserve_range: bool = doc(True, f"Rescale each perturbed image to its clean [min, max]. {_ADV}: if_norm_image=True.")
    grad_clip: float = doc(12.0, "Clip the gradient norm to this value (nnU-Net: 12); 0 disables.")

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"regime.params.{name} {rule}, got {getattr(self, name)!r}")

        if not self.transforms:
            raise bad("transforms", f"must name at least one of {list(TRANSFORMS)}")
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ConfigError(f"regime.params.transforms: unknown transform(s) {unknown}; valid: {list(TRANSFORMS)}")
        if len(set(self.transforms)) != len(self.transforms):
            raise bad("transforms", "must not repeat a transform")
        for name in ("n_iter", "squaring_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "must be an integer >= 0")
        if isinstance(self.deform_spacing, bool) or not isinstance(self.deform_spacing, int) or self.deform_spacing < 1:
            raise bad("deform_spacing", "must be an integer >= 1 (pixels)")
        non_negative = ("step_noise", "step_bias", "step_affine", "step_deformation", "consistency_weight", "mse_weight",
                        "contour_weight", "adv_supervised_weight", "grad_clip", "deform_sigma", "border_margin")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        for name in ("noise_epsilon", "bias_log_bound", "deform_magnitude"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if not 0 < self.bias_spacing <= 1:
            raise bad("bias_spacing", "must be in (0, 1] (a fraction of the axis)")
        if not 0 <= self.rotation_degrees <= 180:
            raise bad("rotation_degrees", "must be in [0, 180]")
        if not 0 <= self.scale < 1:
            raise bad("scale", "must be in [0, 1) (factors 1 +- scale)")
        if not 0 <= self.shift <= 0.5:
            raise bad("shift", "must be in [0, 0.5] (a fraction of the axis)")
        if not 0 <= self.adv_p <= 1:
            raise bad("adv_p", "must be a probability in [0, 1]")

    def build_chain(self) -> AdvChain:
        """The transform family with these bounds and per-transform step sizes."""
        make = {
            "noise": lambda: Noise(self.noise_epsilon, self.step_noise),
            "bias": lambda: BiasField(self.bias_spacing, self.bias_log_bound, self.step_bias),
            "affine": lambda: Affine(self.rotation_degrees, self.scale, self.shift, self.step_affine),
            "deformation": lambda: Deformation(self.deform_spacing, self.deform_sigma, self.deform_magnitude,
                                               self.squaring_steps, self.step_deformation),
        }
        return AdvChain({name: make[name]() for name in self.transforms}, preserve_range=self.preserve_range)


def _sobel(p: torch.Tensor) -> tuple:
    """In-plane Sobel gradients of ``(N, K, *S)`` maps (3D: per slice), per channel."""
    k = p.shape[1]
    flat = p.movedim(1, -3).reshape(-1, k, *p.shape[-2:]) if p.ndim == 5 else p
    sx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=p.device, dtype=p.dtype)
    kern = torch.stack([sx, sx.t()])[:, None].repeat(k, 1, 1, 1)  # (2K, 1, 3, 3): x then y per channel
    g = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), kern, groups=k)
    return g[:, 0::2], g[:, 1::2]


def consistency_loss(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, mse_weight: float = 1.0,
                     contour_weight: float = 0.5) -> torch.Tensor:
    """MSE between probability maps + contour term (MSE of their Sobel gradients, foreground classes).

    Args:
        pred: ``(N, K, *S)`` probabilities (back-warped prediction on the perturbed image).
        ref: ``(N, K, *S)`` reference probabilities (clean image).
        mask: ``(N, 1, *S)`` weights in [0, 1] (1 where both are defined, 0 out of view).
        mse_weight: Weight of the probability MSE (summed over classes, weighted mean over voxels).
        contour_weight: Weight of the contour term (mean over foreground classes, x/y, weighted voxels).

    Returns:
        A scalar float32 tensor.
    """
    pred, ref, mask = pred.float(), ref.float(), mask.float()
    count = mask.sum().clamp_min(1.0)
    loss = mse_weight * (((pred - ref) ** 2) * mask).sum() / count
    if contour_weight > 0 and pred.shape[1] > 1:
        (px, py), (rx, ry) = _sobel(pred[:, 1:]), _sobel(ref[:, 1:])
        m = mask.movedim(1, -3).reshape(-1, 1, *mask.shape[-2:]) if mask.ndim == 5 else mask
        per = (((px - rx) ** 2 + (py - ry) ** 2) * m).sum() / (2 * count * (pred.shape[1] - 1))
        loss = loss + contour_weight * per
    return loss


def _first(out: Any) -> torch.Tensor:
    """Full-resolution logits of a model output (deep supervision returns a list, head 0 first)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def _local(model: torch.nn.Module) -> torch.nn.Module:
    """The module behind DDP (its reducer must not see the inner loop's forwards)."""
    inner = getattr(model, "_orig_mod", model)
    return inner.module if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients, normalisation running statistics restored exactly.

    Restores every submodule's own train/eval mode (a fine-tuning setup may keep some norm
    layers in eval), every parameter's ``requires_grad`` (frozen layers stay frozen) and the
    buffers of every module with running statistics (BN/IN/SyncBN).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    stats = [(b, b.detach().clone()) for m in model.modules() if getattr(m, "running_mean", None) is not None
             for b in m.buffers(recurse=False)]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in stats:
                b.copy_(saved)
        for m, mode in modes:
            m.training = mode


@REGIMES.register("advchain", params=AdvChainParams, source_patches=True)
class AdvChainRegime:
    """Supervised training with AdvChain adversarial consistency (see the module docstring)."""

    def setup(self, ctx: Any, params: AdvChainParams) -> None:
        """Keep the context; build the transform family.

        Raises:
            ConfigError: mixup is on (soft targets do not combine with the warped-label term).
        """
        if ctx.mixup_p > 0:
            raise ConfigError("regime advchain does not combine with augment.mixup (set augment.mixup: 0)")
        self.ctx, self.params = ctx, params
        self.chain = params.build_chain()
        self._warned_3d = False

    def _names(self, dims: int) -> List[str]:
        names = list(self.params.transforms)
        if dims == 3 and "deformation" in names:
            names.remove("deformation")
            if not self._warned_3d:
                log.warning("advchain: 3D batches leave out the deformation (2D only); chain drawn from %s", names)
                self._warned_3d = True
        if not names:
            raise ConfigError("regime.params.transforms: nothing left for 3D batches once deformation is left out")
        return names

    def reference(self, image: torch.Tensor) -> torch.Tensor:
        """Frozen-network probabilities on the clean image (call inside `frozen`)."""
        with torch.no_grad(), autocast(self.ctx):
            out = _first(_local(self.ctx.model)(image))
        return torch.softmax(out.float(), dim=1)

    def inner_consistency(self, image: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Consistency of the frozen network under the current chain (call inside `frozen`)."""
        adv = self.chain.forward(image)  # outside autocast: bf16 grids and bias fields are too coarse
        with autocast(self.ctx):
            out = _first(_local(self.ctx.model)(adv))
        back = self.chain.inverse(torch.softmax(out.float(), dim=1))
        return self._consistency(back, ref)

    def _consistency(self, back: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        # The reference stays as predicted: AdvChain also warps it forward and back, which makes
        # it depend on the perturbation, so the ascent step would chase interpolation blur
        # instead of the network's response (its gradient then disagrees with the loss).
        mask = self.chain.valid_weight(ref, self.params.border_margin)
        return consistency_loss(back, ref, mask, self.params.mse_weight, self.params.contour_weight)

    def attack(self, image: torch.Tensor, names: List[str]) -> tuple:
        """Draw the chain ``names`` and maximise the frozen network's consistency loss.

        Returns:
            ``(reference probabilities, [consistency before each ascent step])``.
        """
        ctx = self.ctx
        with frozen(ctx.model):
            ref = self.reference(image)
            self.chain.select(names, image.shape, ctx.generator)
            losses = []
            for i in range(self.params.n_iter):
                self.chain.requires_grad_(True)
                loss = self.inner_consistency(image, ref)
                grads = torch.autograd.grad(loss, self.chain.parameters(), allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.chain.parameters(), grads)]
                self.chain.ascend(grads, i)
                losses.append(loss.detach())
            self.chain.requires_grad_(False)
        return ref, losses

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One AdvChain step (or a supervised one, with probability ``1 - adv_p``)."""
        ctx, p = self.ctx, self.params
        image, label = ctx.augmenter(batch["image"], batch["label"], ctx.generator)
        names, (coin,) = random_subchain(self._names(image.ndim - 2), ctx.generator, n_extra=1)
        zero = torch.zeros((), device=image.device)
        if coin >= p.adv_p:
            loss, parts = self._network_step(image, label)
            return {"loss": loss, **parts, "adv_consistency": zero, "inner_start": zero, "inner_gain": zero,
                    "adv_applied": zero}
        ref, losses = self.attack(image, names)
        adv = self.chain.forward(image).detach()
        loss, parts = self._network_step(image, label, adv, ref)
        start = losses[0] if losses else parts["adv_consistency"]
        return {"loss": loss, **parts, "inner_start": start, "inner_gain": parts["adv_consistency"] - start,
                "adv_applied": torch.ones((), device=image.device)}

    def _network_step(self, image: torch.Tensor, label: torch.Tensor, adv: Any = None, ref: Any = None) -> tuple:
        ctx, p = self.ctx, self.params
        n = image.shape[0]
        ctx.optimizer.zero_grad(set_to_none=True)
        with autocast(ctx):
            out = ctx.model(image if adv is None else torch.cat([image, adv]))
        heads = [out] if isinstance(out, torch.Tensor) else list(out)
        clean = [h[:n] for h in heads]
        loss, parts = ctx.loss_fn(clean[0] if isinstance(out, torch.Tensor) else clean, label)
        parts = dict(parts)
        if adv is not None:
            back = self.chain.inverse(torch.softmax(heads[0][n:].float(), dim=1))
            cons = self._consistency(back, ref)
            loss = loss + p.consistency_weight * cons
            parts["adv_consistency"] = cons.detach()
            if p.adv_supervised_weight > 0:
                moved = self.chain.warp(label, mode="nearest")
                adv_heads = [h[n:] for h in heads]
                adv_loss, _ = ctx.loss_fn(adv_heads[0] if isinstance(out, torch.Tensor) else adv_heads, moved)
                loss = loss + p.adv_supervised_weight * adv_loss
        backward_and_step(ctx, loss, p.grad_clip)
        return loss.detach(), parts

    def state_dict(self) -> Dict[str, Any]:
        """No state across steps: every step draws a fresh chain (AdvChain's lazy_load=False)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Nothing to restore."""


__all__ = ["AdvChainParams", "AdvChainRegime", "PAPER_FINETUNE_AUGMENT", "consistency_loss", "frozen"]
