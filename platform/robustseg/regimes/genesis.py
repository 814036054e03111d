"""Models Genesis self-supervised pre-training: restore images from corrupted copies.

After Zhou et al., "Models Genesis", MedIA 2021 (the seed thesis fine-tunes from its
pre-trained weights; this regime pre-trains any registered backbone the same way on our own
slices or cubes). Registered with ``data="images"``: the step is fed every training slice,
labelled or not, in the plan's normalised intensity space; labels are never used.

One step:

1. ``batch["image"]`` -> [0, 1] per sample by min-max (`to_unit`). The corruptions are
   defined on [0, 1] (Bezier curves map [0, 1] onto itself, paint noise is U[0, 1)), and
   Models Genesis scales CT by a fixed HU window to [0, 1]; our plans z-score MR without a
   fixed window, so the range is the sample's own. The map is affine, so nothing of the
   image is lost, and the sample's (min, max) are kept to map back (step 3).
2. Models Genesis flips (`random_flips`, applied to the target too), then the corrupted input
   (`robustseg.augment.genesis.corrupt`: local shuffle, Bezier curve, in-/out-painting).
   ``use_augmenter`` runs ``ctx.augmenter`` on the plan-space batch first (off by default:
   Models Genesis augments with flips only, and the restoration target is the augmented
   image, so intensity augmentation would only change what "clean" means).
3. The network input is the corrupted image mapped back through the sample's min-max
   (``input_space="plan"``), so pre-training and fine-tuning see the same intensity
   distribution; ``"unit"`` feeds the [0, 1] image as Models Genesis does.
4. Restoration ``sigmoid(channel 0)`` of the full-resolution head (the fine-tuning run
   re-initialises the output layer), MSE against the clean [0, 1] image, backward, gradient
   clipping, optimiser step; the forward under bf16 autocast (`autocast`).

`validate` replaces the Dice validation: the restoration MSE of a fixed, seeded set of
corruptions of centred crops of the validation slices (2D) or volumes (3D), ``val_score``
= minus that MSE. Returned parts of a step (detached): ``loss`` and ``mse`` (equal; ``loss``
also carries a zero-weighted term keeping deep-supervision heads in the graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from robustseg.augment.genesis import Corruption, corrupt, random_flips
from robustseg.config import ConfigError, doc
from robustseg.engine.checkpoint import unwrap
from robustseg.models import size_multiple
from robustseg.regimes.step import autocast, backward_and_step
from robustseg.registry import REGIMES

_MG = "Models Genesis (Zhou et al., MedIA 2021; pytorch/config.py and utils.py of github.com/MrGiovanni/ModelsGenesis)"
_EPS = 1e-6  # smallest intensity span (plan units): constant slices map to 0, not to NaN


@dataclass
class GenesisParams:
    """Parameters of the Models Genesis step and its validation (defaults cite their source)."""

    flip_p: float = doc(0.4, f"Probability of each of up to 3 flip rounds (input and target). {_MG}: flip_rate=0.4.")
    local_p: float = doc(0.5, f"Probability of local pixel shuffling per sample. {_MG}: local_rate=0.5.")
    nonlinear_p: float = doc(0.9, f"Probability of the Bezier intensity curve per sample. {_MG}: nonlinear_rate=0.9.")
    invert_p: float = doc(0.5, f"Probability that a Bezier curve is inverted (decreasing). {_MG}: 'Half change to "
                               "get flip' (random() < 0.5).")
    paint_p: float = doc(0.9, f"Probability of in- or out-painting per sample. {_MG}: paint_rate=0.9.")
    outpaint_p: float = doc(0.8, f"Given painting, probability of out- rather than in-painting. {_MG}: "
                                 "outpaint_rate=0.8 (inpaint_rate = 1 - outpaint_rate = 0.2).")
    block_fraction: float = doc(0.1, f"Largest local-shuffle block per axis, as a fraction of the axis. {_MG}: block "
                                     "sides randint(1, img_rows // 10).")
    input_space: str = doc("plan", "Network input: 'plan' maps the corrupted [0, 1] image back through the sample's "
                                   "min-max into the plan's intensities (what fine-tuning feeds); 'unit' feeds [0, 1] "
                                   "as Models Genesis, whose fine-tuning uses the same [0, 1] scaling.")
    use_augmenter: bool = doc(False, "Run the experiment's augmenter (augment section) on each batch before the "
                                     "corruption. Models Genesis augments with flips only.")
    grad_clip: float = doc(12.0, "Clip the gradient norm to this value (nnU-Net: 12); 0 disables.")
    val_samples: int = doc(32, "Validation slices (2D) or volumes (3D), evenly spaced over the validation cases: "
                               "enough for a stable MSE, cheap every epoch.")
    val_crop: int = doc(128, "Largest validation crop per axis (centred), before padding up to the network's size "
                             "multiple.")
    val_batch_size: int = doc(16, "Samples per validation forward.")
    val_seed: int = doc(0, "Seed of the validation corruptions (the same set at every validation).")

    def __post_init__(self) -> None:
        for name in ("flip_p", "local_p", "nonlinear_p", "invert_p", "paint_p", "outpaint_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"regime.params.{name} must be a probability in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.block_fraction <= 1:
            raise ConfigError(f"regime.params.block_fraction must be in (0, 1], got {self.block_fraction!r}")
        if self.input_space not in ("plan", "unit"):
            raise ConfigError(f"regime.params.input_space must be 'plan' or 'unit', got {self.input_space!r}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"regime.params.grad_clip must be >= 0, got {self.grad_clip!r}")
        for name in ("val_samples", "val_crop", "val_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"regime.params.{name} must be an integer >= 1, got {v!r}")

    def corruption(self) -> Corruption:
        """The corruption settings (box geometry: the Models Genesis defaults of `Corruption`)."""
        return Corruption(flip_p=self.flip_p, local_p=self.local_p, nonlinear_p=self.nonlinear_p,
                          invert_p=self.invert_p, paint_p=self.paint_p, outpaint_p=self.outpaint_p,
                          block_fraction=self.block_fraction)


# --------------------------------------------------------------------------- intensities
def to_unit(x: Tensor, valid: Tensor | None = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample min-max to [0, 1] over the valid pixels (all when ``valid`` is None).

    Args:
        x: ``(N, 1, *S)`` float batch.
        valid: Optional ``(N, 1, *S)`` bool mask (padding excluded); invalid pixels become 0.

    Returns:
        ``(unit, lo, span)`` with ``x == unit * span + lo`` on valid pixels; ``lo`` and
        ``span`` are ``(N, 1, 1, ...)``.
    """
    x = x.float()
    dims = tuple(range(1, x.ndim))
    if valid is None:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    else:
        lo = torch.where(valid, x, torch.full_like(x, float("inf"))).amin(dim=dims, keepdim=True)
        hi = torch.where(valid, x, torch.full_like(x, float("-inf"))).amax(dim=dims, keepdim=True)
    span = (hi - lo).clamp_min(_EPS)
    unit = ((x - lo) / span).clamp(0.0, 1.0)
    return (unit if valid is None else unit * valid), lo, span


def restoration(out: Any) -> Tuple[Tensor, Tensor]:
    """``sigmoid`` of channel 0 of the full-resolution head, and a zero tying the other heads.

    Deep supervision returns a list ``[full, coarser, ...]`` (as ``engine.losses`` reads it).
    Only the full-resolution head restores; the coarser ones enter the loss with weight 0 so
    that every parameter gets a (zero) gradient and DDP without ``find_unused_parameters``
    does not wait for them.
    """
    heads = [out] if isinstance(out, Tensor) else list(out)
    tie = sum((h.float().sum() for h in heads[1:]), torch.zeros((), device=heads[0].device)) * 0.0
    return torch.sigmoid(heads[0][:, :1].float()), tie


# --------------------------------------------------------------------------- validation samples
def _fit(x: Tensor, target: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Centre-crop or zero-pad ``x`` (spatial dims only, trailing) to ``target``; with its valid mask."""
    valid = torch.ones_like(x, dtype=torch.bool)
    d = len(target)
    for a, t in enumerate(target):
        axis = x.ndim - d + a
        size = x.shape[axis]
        if size > t:
            x, valid = x.narrow(axis, (size - t) // 2, t), valid.narrow(axis, (size - t) // 2, t)
        elif size < t:
            pad = [0, 0] * (x.ndim - axis - 1) + [(t - size) // 2, t - size - (t - size) // 2]
            x, valid = F.pad(x, pad), F.pad(valid, pad)
    return x, valid


def _evenly(n: int, k: int) -> List[int]:
    """``min(n, k)`` indices spread evenly over ``range(n)`` (deterministic)."""
    k = min(n, k)
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [0] * k


def validation_samples(cases: Sequence[Mapping[str, Any]], dims: int, count: int, crop: int,
                       multiple: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """A fixed set of validation samples, centre-cropped / padded to one shape.

    Args:
        cases: Whole volumes ``{"image": (Z, H, W), ...}`` (see `robustseg.engine.validate`).
        dims: 2 (slices) or 3 (volumes).
        count: At most this many slices (2D) or volumes (3D), evenly spaced.
        crop: Largest extent per axis; each axis is then padded up to a multiple of ``multiple``.
        multiple: The network's per-axis input-size multiple.

    Returns:
        ``(images, valid)``, each ``(S, 1, *shape)``: images float32, valid bool.
    """
    if dims == 2:
        pairs = [(c, z) for c, case in enumerate(cases) for z in range(case["image"].shape[0])]
        items = [cases[pairs[i][0]]["image"][pairs[i][1]] for i in _evenly(len(pairs), count)]
    else:
        items = [cases[i]["image"] for i in _evenly(len(cases), count)]
    if not items:
        raise ValueError("genesis validation: no validation slices")
    extent = [max(int(it.shape[a]) for it in items) for a in range(dims)]
    target = [-(-min(e, crop) // m) * m for e, m in zip(extent, multiple)]
    fitted = [_fit(it.float()[None, None], target) for it in items]
    return torch.cat([f[0] for f in fitted]), torch.cat([f[1] for f in fitted])


# --------------------------------------------------------------------------- the regime
@REGIMES.register("genesis", params=GenesisParams, data="images")
class GenesisRegime:
    """Models Genesis restoration pre-training (see the module docstring)."""

    def setup(self, ctx: Any, params: GenesisParams) -> None:
        """Keep the context and parameters.

        Raises:
            ConfigError: mixup is on (it has no meaning for restoration; set augment.mixup: 0).
        """
        if ctx.mixup_p > 0:
            raise ConfigError("regime genesis does not use augment.mixup (set augment.mixup: 0)")
        self.ctx, self.params = ctx, params
        self.corruption = params.corruption()

    def _network_input(self, corrupted: Tensor, lo: Tensor, span: Tensor) -> Tensor:
        return corrupted * span + lo if self.params.input_space == "plan" else corrupted

    def pair(self, image: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """``(network input, clean [0, 1] target)`` for a plan-space batch ``(N, 1, *S)``."""
        unit, lo, span = to_unit(image)
        clean = random_flips(unit, generator, self.corruption.flip_p)
        return self._network_input(corrupt(clean, generator, self.corruption), lo, span), clean

    def train_step(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """One restoration step; returns detached ``loss`` and ``mse``."""
        ctx = self.ctx
        image = batch["image"]
        if self.params.use_augmenter:
            # The augmenter moves a label with the image; restoration has none, so a dummy one.
            blank = torch.zeros(image.shape, dtype=torch.long, device=image.device)
            image, _ = ctx.augmenter(image, blank, ctx.generator)
        inp, clean = self.pair(image, ctx.generator)
        ctx.optimizer.zero_grad(set_to_none=True)
        with autocast(ctx):
            out = ctx.model(inp)
        restored, tie = restoration(out)
        mse = F.mse_loss(restored, clean)
        loss = mse + tie
        backward_and_step(ctx, loss, self.params.grad_clip)
        return {"loss": loss.detach(), "mse": mse.detach()}

    def validate(self, val_cases: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
        """Restoration MSE on a fixed, seeded set of corrupted validation crops (no flips).

        The model runs in eval mode without gradients (its mode is restored after); the
        corruptions come from a private generator seeded with ``val_seed`` on every call, so
        the same model gives the same score.

        Returns:
            ``{"val_score": -mse, "val_mse": mse}``.
        """
        ctx, p = self.ctx, self.params
        model = ctx.model
        multiple = size_multiple(unwrap(model))
        images, valid = validation_samples(val_cases, len(multiple), p.val_samples, p.val_crop, multiple)
        images, valid = images.to(ctx.device), valid.to(ctx.device)
        generator = torch.Generator(device=ctx.device).manual_seed(p.val_seed)
        unit, lo, span = to_unit(images, valid)
        inp = self._network_input(corrupt(unit, generator, self.corruption), lo, span)
        err = torch.zeros((), device=ctx.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, inp.shape[0], p.val_batch_size):
                    with autocast(ctx):
                        out = model(inp[i:i + p.val_batch_size])
                    restored, _ = restoration(out)
                    chunk = slice(i, i + p.val_batch_size)
                    err = err + ((restored - unit[chunk]) ** 2 * valid[chunk]).sum()
        finally:
            model.train(was_training)
        mse = float(err / valid.sum().clamp_min(1))
        return {"val_score": -mse, "val_mse": mse}

    def state_dict(self) -> Dict[str, Any]:
        """No state across steps: every step draws fresh corruptions from ``ctx.generator``."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Nothing to restore."""


__all__ = ["GenesisParams", "GenesisRegime", "restoration", "to_unit", "validation_samples"]
