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

    def __post_init__(self) -> None:
        if self.grad_clip < 0:
            raise ConfigError("regime.params.grad_clip must be >= 0")


@REGIMES.register("supervised", params=SupervisedParams, source_patches=True)
class Supervised:
    """Plain supervised training on labelled batches."""

    def setup(self, ctx: Any, params: SupervisedParams) -> None:
        """Keep the step context and parameters."""
        self.ctx, self.params = ctx, params

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimisation step; returns detached loss parts (the loop syncs once per epoch)."""
        ctx = self.ctx
        image, label = ctx.augmenter(batch["image"], batch["label"], ctx.generator)
        target: torch.Tensor = label
        if ctx.mixup_p > 0 and float(torch.rand((), generator=ctx.generator, device=ctx.device)) < ctx.mixup_p:
            from robustseg.augment import mixup_batch

            image, target = mixup_batch(image, to_soft(label, ctx.num_classes), ctx.mixup_alpha, ctx.generator)
        ctx.optimizer.zero_grad(set_to_none=True)
        with autocast(ctx):
            out = ctx.model(image)
        loss, parts = ctx.loss_fn(out, target)
        backward_and_step(ctx, loss, self.params.grad_clip)
        return {"loss": loss.detach(), **parts}

    def state_dict(self) -> Dict[str, Any]:
        """No state beyond model/optimiser (saved by the loop)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Nothing to restore."""
