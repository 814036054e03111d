"""Smoothing the neighbour channels of a 2.5D input inside the network (``model.slice_context_blur``).

A 2.5D network (``model.slice_context = k``) sees a slice with its ``k`` neighbours on each
side as channels. ACDC's slices are 5-10 mm apart, so a neighbour's edges are not the
slice's edges: at a small budget the network partly copies them, which costs clean Dice on
the thin structures (myocardium, RV). Smoothing only the neighbours keeps what they are good
for under respiratory motion (where the heart is, its rough shape, from a slice with its own
breath-hold) and leaves the slice's own edges as the only sharp ones.

The smoothing is a forward pre-hook on the network, so training, validation, `predict`,
serving and ensembles apply exactly the same one without knowing about it; it has no weights,
so checkpoints are unchanged and `build_model` puts it back from the config.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    r = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return (g / g.sum()).to(dtype)


def blur_neighbours(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian-smooth every channel of ``x`` but the middle one (the slice itself).

    Args:
        x: ``(N, 1 + 2k, H, W)``, the slice in channel ``k`` (`robustseg.engine.inference.context_stack`).
        sigma: Gaussian standard deviation in pixels; 0 returns ``x`` itself.

    Returns:
        A tensor of the same shape and dtype; channel ``k`` is ``x``'s, bit for bit. Borders
        are replicated (a field's edge is not a structure).
    """
    if sigma <= 0 or x.shape[1] < 3:
        return x
    k = (x.shape[1] - 1) // 2
    nb = torch.cat([x[:, :k], x[:, k + 1:]], dim=1)
    c = nb.shape[1]
    g = _kernel(float(sigma), x.dtype, x.device)
    r = (g.numel() - 1) // 2
    # Separable: along W, then along H, each channel on its own (groups=c).
    nb = F.conv2d(F.pad(nb, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    nb = F.conv2d(F.pad(nb, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return torch.cat([nb[:, :k], x[:, k:k + 1], nb[:, k:]], dim=1)


class BlurNeighbours:
    """Forward pre-hook: `blur_neighbours` on the network's input (a class, so the model still pickles)."""

    def __init__(self, sigma: float):
        self.sigma = float(sigma)

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        return (blur_neighbours(args[0], self.sigma),) + tuple(args[1:])
