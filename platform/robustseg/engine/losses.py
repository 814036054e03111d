"""Dice + cross-entropy with deep-supervision weighting.

Targets may be integer labels ``(B, 1, *S)`` or soft/one-hot probabilities ``(B, K, *S)``
(mixup produces the latter). Deep-supervision heads come as a list ``[full, coarser, ...]``;
targets are resized to each head (nearest for labels, area for soft targets), and head
``i`` weighs ``decay**i``, normalised, with the coarsest head at 0 as in nnU-Net.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from robustseg.config import LossConfig

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def ds_weights(n_heads: int, decay: float) -> List[float]:
    """Normalised deep-supervision weights (coarsest head 0 when there are several)."""
    w = [decay ** i for i in range(n_heads)]
    if n_heads > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def to_soft(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels ``(B, 1, *S)`` -> one-hot float ``(B, K, *S)``; soft targets pass through."""
    if target.dtype.is_floating_point and target.shape[1] == num_classes:
        return target
    lbl = target[:, 0].long()
    return F.one_hot(lbl, num_classes).movedim(-1, 1).float()


def resize_target(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a target to a head's spatial size (nearest for labels, area for soft)."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    if target.dtype.is_floating_point:
        return F.interpolate(target, size=tuple(size), mode="area")
    return F.interpolate(target.float(), size=tuple(size), mode="nearest").to(target.dtype)


class DiceCELoss:
    """Weighted soft Dice + cross-entropy, with optional deep supervision.

    Args:
        cfg: Loss weights and deep-supervision settings.
        num_classes: Classes including background.
    """

    def __init__(self, cfg: LossConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of one head at its resolution."""
        logits = logits.float()  # losses in fp32 even under bf16 autocast
        soft = target.dtype.is_floating_point
        if soft:
            ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
            onehot = target
        else:
            ce = F.cross_entropy(logits, target[:, 0].long())
            onehot = to_soft(target, self.num_classes)
        probs = torch.softmax(logits, dim=1)
        # Batch Dice sums over the batch too: (K,); per-sample Dice: (B, K).
        dims = ((0,) if self.cfg.batch_dice else ()) + tuple(range(2, logits.ndim))
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + 1e-5) / (denom + 1e-5)  # smooth keeps empty classes at ~1
        if not self.cfg.include_background_dice:
            dice = dice[..., 1:]
        dice_loss = 1 - dice.mean()
        total = self.cfg.ce_weight * ce + self.cfg.dice_weight * dice_loss
        return total, {"ce": ce.detach(), "dice_loss": dice_loss.detach()}

    def __call__(self, logits: Logits, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its parts (detached tensors: no host sync per step)."""
        heads = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        if not self.cfg.deep_supervision:
            heads = heads[:1]
        weights = ds_weights(len(heads), self.cfg.ds_decay)
        total = torch.zeros((), device=heads[0].device)
        parts: Dict[str, torch.Tensor] = {}
        for w, head in zip(weights, heads):
            if w == 0:
                continue
            loss, p = self.single(head, resize_target(target, head.shape[2:]))
            total = total + w * loss
            if not parts:
                parts = p  # report the full-resolution head's parts
        return total, parts
