"""Mixup for segmentation: convex combinations of image pairs and of their soft targets.

``x' = lam * x_i + (1 - lam) * x_j`` and ``t' = lam * t_i + (1 - lam) * t_j`` with ``j`` a
random permutation partner and ``lam ~ Beta(alpha, alpha)`` per sample (Zhang et al., the
thesis's reference [7]; Panfilov et al. [8] on knee MR).

Beta sampling under a ``torch.Generator``: torch's own Beta/Gamma samplers
(``torch.distributions``, ``torch._standard_gamma``) take no generator, so a seed would not
reproduce them. Here ``Beta(a, a) = X / (X + Y)`` with ``X, Y ~ Gamma(a)`` drawn by
Marsaglia & Tsang's method (normal and uniform draws from the generator, acceptance above
95% for every shape), boosted for ``a < 1`` by ``Gamma(a) = Gamma(a + 1) * U ** (1 / a)``.
Everything stays in log space, so tiny ``alpha`` gives exact 0/1 instead of 0/0. Rejection
runs in fixed-size rounds over the whole batch, so the number of draws depends only on the
generator state: the same seed gives the same lambdas, bit for bit.

``lam`` is folded to ``max(lam, 1 - lam)``: sample ``i`` stays the dominant one (so
``alpha -> 0`` is the identity, not a shuffle), and since Beta(a, a) is symmetric the set
of mixed pairs has the same distribution as without folding.

Asymmetric mixup (`asymmetric_mixup_batch`; Li, Kamnitsas & Glocker, "Overfitting of neural
nets under class imbalance", MICCAI 2019 / IEEE TMI 2020, the thesis's reference [10]): under
class imbalance the logits of the rare (foreground) classes shift towards the decision
boundary on unseen data; symmetric mixup's soft targets ("0.3 tumour") make that worse by
teaching the network to be unsure about exactly the classes it under-fits. The asymmetric
variant mixes the images as above (same pairs, same lambdas) but never softens a rare class:
every voxel's target is one class, hard, or left out. The rule, generalised to several
classes from the authors' code (``focaloneside``, ``mixupbiasmargin`` in
github.com/ZerojumpLine/OverfittingUnderClassImbalance), with ``w_i = lam`` and
``w_j = 1 - lam`` the two images' weights and ``m`` the margin:

* each image keeps its own label, except that where the *other* image has a rare class and
  that other image's weight exceeds ``m``, the rare class is painted over it;
* where the two results agree, the voxel's target is that class (weight 1); where they
  disagree (a rare class of an image at weight <= ``m`` over a common class, two different
  rare classes, two different common classes), the target is all zeros: the voxel is left
  out of the cross-entropy instead of getting a soft label.

So a rare-class voxel of an image that is visibly there (weight > ``m``) stays rare, fully;
a faint one is neither called rare nor background. (The authors' code takes the floor of
the mixed one-hot vectors, which in float32 can also drop agreeing voxels when
``lam + (1 - lam)`` rounds below 1; here agreement is decided on the labels.) The soft Dice
of `robustseg.engine.losses.DiceCELoss` has no ignore mask: a left-out voxel's predicted
probabilities still count in its denominators; the authors trained with cross-entropy only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

_MAX_ROUNDS = 64  # P(a sample still rejected after 64 rounds) < 0.05 ** 64


def _log_gamma_draws(shape_param: float, shape: Sequence[int], generator: torch.Generator,
                     device: torch.device) -> Tensor:
    """``log`` of Gamma(shape_param, 1) draws (float64), deterministic under ``generator``."""
    k = shape_param + 1.0 if shape_param < 1.0 else shape_param  # Marsaglia-Tsang needs k >= 1
    d = k - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.zeros(tuple(shape), dtype=torch.float64, device=device)
    todo = torch.ones(tuple(shape), dtype=torch.bool, device=device)
    for _ in range(_MAX_ROUNDS):
        z = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float64)
        u = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        safe_v = v.clamp_min(1e-300)
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z * z + d - d * v + d * torch.log(safe_v))
        take = ok & todo
        out = torch.where(take, torch.log(d * safe_v), out)
        todo = todo & ~take
        if not bool(todo.any()):
            break
    if shape_param < 1.0:
        u = torch.rand(tuple(shape), generator=generator, device=device, dtype=torch.float64)
        out = out + torch.log(u.clamp_min(1e-300)) / shape_param
    return out


def sample_beta(alpha: float, shape: Sequence[int], generator: torch.Generator,
                device: Union[str, torch.device] = "cpu") -> Tensor:
    """Symmetric Beta(alpha, alpha) draws in [0, 1] (float32), reproducible under ``generator``.

    Args:
        alpha: Shape parameter, > 0.
        shape: Output shape.
        generator: Source of randomness, on ``device``.
        device: Where the draws live.
    """
    if alpha <= 0:
        raise ValueError(f"mixup: alpha must be > 0, got {alpha}")
    logs = _log_gamma_draws(alpha, (2, *shape), generator, torch.device(device))
    # X / (X + Y) = sigmoid(log X - log Y), exact at the extremes.
    return torch.sigmoid(logs[0] - logs[1]).to(torch.float32)


def mixup_batch(image: Tensor, target: Tensor, alpha: float, generator: torch.Generator,
                return_lambda: bool = False) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """Mix every sample with a random partner of the same batch.

    Args:
        image: ``(B, C, *S)`` float images.
        target: ``(B, K, *S)`` one-hot or soft float targets (each voxel sums to 1).
        alpha: Beta(alpha, alpha) parameter; ``alpha <= 0`` returns the inputs unchanged.
        generator: Generator on the tensors' device (permutation first, then lambdas).
        return_lambda: Also return the ``(B,)`` mixing weights of each sample's own image.

    Returns:
        ``(mixed_image, mixed_target)`` (plus ``lam``); a mixed target still sums to 1.
    """
    if not target.is_floating_point():
        raise ValueError(f"mixup: target must be a one-hot/soft float tensor (B, K, *S), got {target.dtype}")
    if target.shape[0] != image.shape[0] or target.shape[2:] != image.shape[2:]:
        raise ValueError(f"mixup: target {tuple(target.shape)} does not match image {tuple(image.shape)}")
    pair = _draw_pairs(image.shape[0], alpha, generator, image.device)
    if pair is None:
        lam = torch.ones(image.shape[0], device=image.device)
        return (image, target, lam) if return_lambda else (image, target)
    perm, lam = pair
    out = (_mix(image, perm, lam), _mix(target, perm, lam))
    return (*out, lam) if return_lambda else out


def _draw_pairs(b: int, alpha: float, generator: torch.Generator,
                device: torch.device) -> Optional[Tuple[Tensor, Tensor]]:
    """Partner permutation, then folded lambdas (this order: both mixups pair alike); None: no mixing."""
    if alpha <= 0 or b < 2:
        return None
    perm = torch.randperm(b, generator=generator, device=device)
    lam = sample_beta(alpha, (b,), generator, device)
    return perm, torch.maximum(lam, 1.0 - lam)


def _mix(x: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """``lam * x + (1 - lam) * x[perm]``, ``lam`` broadcast per sample."""
    w = lam.reshape(x.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)
    return w * x + (1.0 - w) * x.index_select(0, perm)


def _check_asymmetric(image: Tensor, label: Tensor, num_classes: int, margin: float,
                      rare: Sequence[int]) -> None:
    if label.is_floating_point() or label.dtype == torch.bool or label.is_complex():
        raise ValueError(f"asymmetric mixup: label must be an integer tensor (B, 1, *S), got {label.dtype}")
    if label.shape != (image.shape[0], 1, *image.shape[2:]):
        raise ValueError(f"asymmetric mixup: label {tuple(label.shape)} does not match image {tuple(image.shape)} "
                         "(expected (B, 1, *S))")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"asymmetric mixup: margin must be in [0, 1), got {margin}")
    bad = [c for c in rare if not 0 <= int(c) < num_classes]
    if bad or not rare:
        raise ValueError(f"asymmetric mixup: rare classes {list(rare)} must be a non-empty subset of "
                         f"0..{num_classes - 1}")


def asymmetric_target(label: Tensor, perm: Tensor, lam: Tensor, num_classes: int, margin: float = 0.2,
                      rare: Optional[Sequence[int]] = None) -> Tensor:
    """Hard-or-left-out targets of asymmetric mixup (rule in the module docstring).

    Args:
        label: ``(B, 1, *S)`` integer labels of the unmixed batch.
        perm: ``(B,)`` partner of each sample.
        lam: ``(B,)`` weight of each sample's own image (``1 - lam`` its partner's).
        num_classes: Classes including background.
        margin: A partner's rare class is painted over only where the partner's weight exceeds it.
        rare: The under-represented classes (default: every class but 0, the background).

    Returns:
        ``(B, K, *S)`` float targets; each voxel is one-hot or all zeros (left out).
    """
    rare_t = torch.tensor(list(range(1, num_classes)) if rare is None else [int(c) for c in rare],
                          device=label.device, dtype=label.dtype)
    own = label[:, 0]
    other = own.index_select(0, perm)
    w = lam.reshape(own.shape[0], *([1] * (own.ndim - 1)))
    own_slot = torch.where((w < 1.0 - margin) & torch.isin(other, rare_t), other, own)
    other_slot = torch.where((w > margin) & torch.isin(own, rare_t), own, other)
    agree = own_slot == other_slot
    # A weight of exactly 1 (or 0) is no mixing at all: that image's label holds everywhere.
    keep_own = (agree | (w >= 1.0)).unsqueeze(1)
    keep_other = (~agree & (w <= 0.0)).unsqueeze(1)

    def onehot(y: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(y.long(), num_classes).movedim(-1, 1).float()

    return onehot(own_slot) * keep_own + onehot(other_slot) * keep_other


def asymmetric_mixup_batch(image: Tensor, label: Tensor, num_classes: int, alpha: float,
                           generator: torch.Generator, margin: float = 0.2, rare: Optional[Sequence[int]] = None,
                           return_lambda: bool = False
                           ) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    """Asymmetric mixup (Li et al.): images mixed as `mixup_batch`, rare classes kept hard.

    Draws exactly what `mixup_batch` draws (permutation, then folded lambdas), so under the same
    generator state both pair and weight the images identically; only the targets differ.

    Args:
        image: ``(B, C, *S)`` float images.
        label: ``(B, 1, *S)`` integer labels.
        num_classes: Classes including background.
        alpha: Beta(alpha, alpha) parameter; ``alpha <= 0`` returns the image and one-hot labels.
        generator: Generator on the tensors' device.
        margin: See `asymmetric_target`; the authors' setting is 0.2 (``mixupbiasmargin``).
        rare: The under-represented classes (default: every class but 0).
        return_lambda: Also return the ``(B,)`` weights of each sample's own image.

    Returns:
        ``(mixed_image, target)`` (plus ``lam``), ``target`` ``(B, K, *S)`` float with every voxel
        one-hot or all zeros (left out of the cross-entropy).

    Raises:
        ValueError: non-integer or mis-shaped labels, margin outside [0, 1), unknown rare classes.
    """
    rare_list = list(range(1, num_classes)) if rare is None else [int(c) for c in rare]
    _check_asymmetric(image, label, num_classes, margin, rare_list)
    b, dev = image.shape[0], image.device
    pair = _draw_pairs(b, alpha, generator, dev)
    if pair is None:
        lam = torch.ones(b, device=dev)
        target = torch.nn.functional.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()
        return (image, target, lam) if return_lambda else (image, target)
    perm, lam = pair
    out = (_mix(image, perm, lam), asymmetric_target(label, perm, lam, num_classes, margin, rare_list))
    return (*out, lam) if return_lambda else out
