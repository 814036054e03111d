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
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

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
    b, dev = image.shape[0], image.device
    if alpha <= 0 or b < 2:
        lam = torch.ones(b, device=dev)
        return (image, target, lam) if return_lambda else (image, target)
    perm = torch.randperm(b, generator=generator, device=dev)
    lam = sample_beta(alpha, (b,), generator, dev)
    lam = torch.maximum(lam, 1.0 - lam)

    def mix(x: Tensor) -> Tensor:
        w = lam.reshape(b, *([1] * (x.ndim - 1))).to(x.dtype)
        return w * x + (1.0 - w) * x.index_select(0, perm)

    out = (mix(image), mix(target))
    return (*out, lam) if return_lambda else out
