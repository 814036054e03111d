"""Tail weight averaging (SWA / SWAD style): the equal-weight mean of the weights over the last part of training.

Averaging the weights a run passes through late in training lands in a flatter region of the
loss than any single iterate; SWAD (Cha et al. 2021) found this the cheapest lever against
domain shift. Here the shift is respiratory motion. ``optim.average_from`` (a fraction of the
run) turns it on; the average is what is validated, kept as best and served, while the raw
weights keep training and are stored beside it so a killed run resumes bit-exact. Off by
default: at the issue-16 CPU budget (poly schedule ending at zero) it cost clean Dice and did
not make the model more robust to motion (benchmarks/README.md, rows AVG50 and SWA75).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch

from robustseg.engine.checkpoint import unwrap
from robustseg.engine.optim import average_start


class WeightAverage:
    """Running mean of a model's floating-point state from iteration ``start`` on, every ``every`` iterations."""

    def __init__(self, model: torch.nn.Module, start: int, every: int = 1) -> None:
        self.module = copy.deepcopy(unwrap(model))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.start, self.every, self.count = int(start), max(1, int(every)), 0

    def update(self, model: torch.nn.Module, iteration: int) -> None:
        """Fold ``model``'s weights into the mean if ``iteration`` (0-based, after its step) is an averaging one."""
        if iteration < self.start or (iteration - self.start) % self.every:
            return
        self.count += 1
        with torch.no_grad():
            current = unwrap(model).state_dict()
            for name, mean in self.module.state_dict().items():
                new = current[name].detach()
                if mean.is_floating_point() and self.count > 1:
                    mean.add_(new.to(mean.dtype) - mean, alpha=1.0 / self.count)
                else:  # the first sample, and integer buffers (counters), are copied as they are
                    mean.copy_(new)

    @property
    def active(self) -> bool:
        """Whether any weights have been averaged yet (before that the raw model is the one scored)."""
        return self.count > 0

    def state_dict(self) -> Dict[str, Any]:
        """The count of averaged iterates (the mean weights themselves go to the checkpoint's ``model``)."""
        return {"count": self.count}

    def load(self, count: int, weights: Dict[str, torch.Tensor]) -> None:
        """Restore after a resume: ``weights`` is the stored mean of ``count`` iterates."""
        self.count = int(count)
        if self.count:
            self.module.load_state_dict(weights)


def build_average(model: torch.nn.Module, average_from: Optional[float], every: int, total_iterations: int
                  ) -> Optional[WeightAverage]:
    """The `WeightAverage` for ``optim.average_from`` (a fraction of ``total_iterations``), or None when off."""
    if average_from is None:
        return None
    return WeightAverage(model, average_start(average_from, total_iterations), every)
