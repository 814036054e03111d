"""What every regime's training step shares: the autocast context and the optimiser step."""
from __future__ import annotations

import contextlib
from typing import Any

import torch


def autocast(ctx: Any) -> contextlib.AbstractContextManager:
    """bf16 autocast on the step's device when enabled (``ctx.amp_dtype``), else a no-op."""
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype)


def backward_and_step(ctx: Any, loss: torch.Tensor, grad_clip: float) -> None:
    """Backward ``loss``, clip the gradient norm of ``ctx.model`` to ``grad_clip`` (0: no clipping), step.

    The caller zeroes the gradients before its forward (some regimes run extra forwards and
    backwards of their own first, e.g. AdvChain's inner loop on its transformation parameters).
    """
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), grad_clip)
    ctx.optimizer.step()
