"""Optimisers and per-iteration learning-rate schedules named in config.

Presets from the source documents: nnU-Net SGD-Nesterov (lr 1e-2, momentum 0.99, poly 0.9),
Swin-UNETR AdamW (4e-4, wd 5e-5), Swin-UNet SGD (0.05, momentum 0.9, wd 1e-4), the thesis's
Adam with step LR x0.8 every 25 epochs. The values live in config files, not here.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from robustseg.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name``."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd_nesterov":
        return torch.optim.SGD(params, lr=cfg.initial_lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.initial_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.initial_lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.initial_lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, iteration: int) -> float:
    """Multiplier of the initial LR at a global iteration (schedules step per iteration)."""
    total = cfg.epochs * cfg.iters_per_epoch
    if cfg.average_from is not None and cfg.average_hold_lr:  # SWA: constant from where averaging starts
        iteration = min(iteration, average_start(cfg.average_from, total))
    if cfg.schedule == "poly":
        return (1 - min(iteration, total - 1) / total) ** cfg.poly_power
    if cfg.schedule == "step":
        return cfg.step_gamma ** (iteration // cfg.iters_per_epoch // cfg.step_every)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(iteration, total) / total))
    return 1.0


def average_start(average_from: float, total: int) -> int:
    """The first iteration folded into the weight average (``optim.average_from`` of ``total``)."""
    return min(int(round(average_from * total)), total - 1)


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR following ``cfg.schedule``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
