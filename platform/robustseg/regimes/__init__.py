"""Training regimes: each owns its ``train_step``; they compose, never inherit.

Contract: a regime class registered in `REGIMES` (with ``params=`` its typed params
dataclass) has ``setup(ctx: StepContext, params)``, ``train_step(batch) -> dict[str, float]``,
``state_dict()`` and ``load_state_dict(state)``. The fit loop owns epochs, validation,
schedules and checkpoints; the regime owns what one optimisation step means.

Optional parts of the contract:

* ``data=`` at registration says what the step is fed: ``"labelled"`` (default: batches of
  training-labelled slices), ``"images"`` (every training slice, labelled or not; labels are
  not used, e.g. self-supervised restoration) or ``"semi"`` (labelled batches, plus
  ``ctx.unlabelled`` yielding batches of the slices without a usable label).
* ``source_patches=True`` at registration promises that every labelled batch goes through
  ``ctx.augmenter``: 2D labelled batches may then come as larger source patches
  (``augment.source_patch``), which the augmenter cuts back to the patch.
* ``validate(val_cases) -> dict`` replaces the fit loop's Dice validation; it must return a
  ``"val_score"`` (higher is better) that selects the best checkpoint and drives early
  stopping (e.g. minus the restoration error of a pre-training regime).
* ``eval_model() -> nn.Module`` names the network the loop validates and stores as ``best.pt``'s
  model when it is not the one being optimised (the mean teacher's EMA teacher); ``last.pt``
  keeps the trained network, so resuming is unchanged.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Protocol, runtime_checkable

import torch

from robustseg.registry import REGIMES


@dataclass
class StepContext:
    """What a regime's step needs, built by the fit loop.

    Attributes:
        model: The (possibly compiled) network.
        optimizer: Its optimiser (the scheduler is stepped by the loop).
        loss_fn: ``loss_fn(logits_or_heads, target) -> (loss, parts)``.
        augmenter: ``augmenter(image, label, generator) -> (image, label)`` on the device.
        generator: The device generator every random draw of a step comes from.
        device: Training device.
        amp_dtype: Autocast dtype (torch.bfloat16) or None.
        num_classes: Output classes.
        mixup_p: Probability of mixup per batch.
        mixup_alpha: Beta parameter of the mixup ratio.
        unlabelled: For regimes registered with ``data="semi"``: an infinite iterator of
            ``{"image"}`` batches of training slices without a usable label (None otherwise).
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[..., Any]
    augmenter: Callable[..., Any]
    generator: torch.Generator
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    num_classes: int
    mixup_p: float = 0.0
    mixup_alpha: float = 0.4
    unlabelled: Optional[Iterator[Dict[str, torch.Tensor]]] = None


@runtime_checkable
class Regime(Protocol):
    """The typed contract of a registered regime (see the module docstring).

    Optional methods, looked up by the fit loop with ``getattr``: ``validate(val_cases) ->
    dict`` (with ``"val_score"``) and ``eval_model() -> nn.Module``.
    """

    def setup(self, ctx: StepContext, params: Any) -> None:
        """Keep the step context and the typed params; build what the steps need."""

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One optimisation step on ``batch``; the terms to average over the epoch."""

    def state_dict(self) -> Dict[str, Any]:
        """Everything beyond model/optimiser a bit-exact resume needs."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict`'s output."""


for _m in ("supervised", "advchain", "genesis", "mean_teacher"):
    importlib.import_module(f"{__name__}.{_m}")
