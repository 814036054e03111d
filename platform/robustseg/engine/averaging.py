"""Weight averaging: frozen copies of a network and the EMA step on them (the mean teacher's), and
tail weight averaging (SWA / SWAD style), the equal-weight mean of the weights over the last part
of training, built on the same two.

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


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` on parameters; buffers copied.

    Buffers (batch-norm running statistics and counters) are the student's, not averaged:
    as Tarvainen's teacher they describe the activations of the current weights.
    """
    t_params, s_params = list(teacher.parameters()), [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"ema_update: teacher has {len(t_params)} parameters, student {len(s_params)}")
    # One fused multi-tensor kernel per operation instead of one launch per parameter.
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


def _non_leaf_memo(module: torch.nn.Module) -> Dict[int, torch.Tensor]:
    """Detached copies of the non-leaf tensors modules keep as attributes, keyed for `copy.deepcopy`.

    deepcopy refuses tensors that are not graph leaves, and some backbones keep their last
    outputs (MONAI's DynUNet: the deep-supervision heads, in a list) after a forward pass.
    """
    memo: Dict[int, torch.Tensor] = {}
    for m in module.modules():
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
            for x in items:
                if isinstance(x, torch.Tensor) and not x.is_leaf:
                    memo[id(x)] = x.detach().clone()
    return memo


def make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of the (unwrapped) student: no gradients, never in any optimiser."""
    plain = unwrap(model)
    teacher = copy.deepcopy(plain, _non_leaf_memo(plain))
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.grad = None
    return teacher


class WeightAverage:
    """Running mean of a model's parameters from iteration ``start`` on, every ``every`` iterations.

    Buffers are the latest iterate's (`ema_update`); the default 2D/3D U-Nets use instance
    norm and keep no running statistics.
    """

    def __init__(self, model: torch.nn.Module, start: int, every: int = 1) -> None:
        self.module = make_teacher(model)
        self.start, self.every, self.count = int(start), max(1, int(every)), 0

    def update(self, model: torch.nn.Module, iteration: int) -> None:
        """Fold ``model``'s weights into the mean if ``iteration`` (0-based, after its step) is an averaging one."""
        if iteration < self.start or (iteration - self.start) % self.every:
            return
        self.count += 1
        # The running mean of n iterates is an EMA with decay 1 - 1/n (0 for the first: a copy).
        ema_update(self.module, unwrap(model), 1.0 - 1.0 / self.count)

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
