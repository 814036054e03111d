"""The supervised regime: augment on the device, forward (bf16 autocast on CUDA), Dice+CE,
backward, gradient clipping, optimiser step. Mixup (thesis) is an option of the step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch

from robustseg.config import ConfigError, doc
from robustseg.engine.losses import to_soft
from robustseg.regimes.step import autocast, backward_and_step
from robustseg.registry import REGIMES


@dataclass
class SupervisedParams:
    """Parameters of the supervised step."""

    grad_clip: float = doc(12.0, "Clip the gradient norm to this value (nnU-Net: 12); 0 disables.")
    motion_consistency: float = doc(
        0.0, "> 0: train on pairs (half the batch clean, half the same patches under respiratory motion, "
        "`Augmenter.motion_pairs`) and add this weight x KL(clean prediction || motion prediction), the clean "
        "one a fixed target. Needs motion levels in augment.params.motion; replaces its p. Off by default: "
        "at the issue-16 budget (ACDC, seed 0) weight 1.0 lost 0.027 clean Dice and did not cut the motion drop.")

    def __post_init__(self) -> None:
        if self.grad_clip < 0:
            raise ConfigError("regime.params.grad_clip must be >= 0")
        if self.motion_consistency < 0:
            raise ConfigError("regime.params.motion_consistency must be >= 0")


def motion_consistency(logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_moved) per voxel, averaged, for a ``[clean; moved]`` batch of logits.

    The clean half's probabilities are a fixed target (detached): the clean view is the
    better-posed image, and the term should pull the motion prediction towards it, not the
    clean prediction towards the blurred one.
    """
    n = logits.shape[0] // 2
    logp = torch.log_softmax(logits.float(), dim=1)
    clean, moved = logp[:n].detach(), logp[n:]
    return (clean.exp() * (clean - moved)).sum(1).mean()


@REGIMES.register("supervised", params=SupervisedParams, source_patches=True)
class Supervised:
    """Plain supervised training on labelled batches."""

    def setup(self, ctx: Any, params: SupervisedParams) -> None:
        """Keep the step context and parameters.

        Raises:
            ConfigError: motion pairs together with mixup (a mixed pair is no pair).
        """
        if params.motion_consistency > 0 and ctx.mixup_p > 0:
            raise ConfigError("regime.params.motion_consistency needs augment.mixup: 0 (mixing would break the "
                              "clean/motion pairs)")
        self.ctx, self.params = ctx, params

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimisation step; returns detached loss parts (the loop syncs once per epoch)."""
        ctx = self.ctx
        paired = self.params.motion_consistency > 0
        if paired:
            image, label = ctx.augmenter.motion_pairs(batch["image"], batch["label"], ctx.generator)
        else:
            image, label = ctx.augmenter(batch["image"], batch["label"], ctx.generator)
        target: torch.Tensor = label
        if ctx.mixup_p > 0 and float(torch.rand((), generator=ctx.generator, device=ctx.device)) < ctx.mixup_p:
            from robustseg.augment import mixup_batch

            image, target = mixup_batch(image, to_soft(label, ctx.num_classes), ctx.mixup_alpha, ctx.generator)
        ctx.optimizer.zero_grad(set_to_none=True)
        with autocast(ctx):
            out = ctx.model(image)
        loss, parts = ctx.loss_fn(out, target)
        if paired:
            cons = motion_consistency(out if isinstance(out, torch.Tensor) else out[0])
            loss = loss + self.params.motion_consistency * cons
            parts = {**parts, "motion_consistency": cons.detach()}
        backward_and_step(ctx, loss, self.params.grad_clip)
        return {"loss": loss.detach(), **parts}

    def state_dict(self) -> Dict[str, Any]:
        """No state beyond model/optimiser (saved by the loop)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Nothing to restore."""
