"""What a 2.5D network does to its neighbour channels before its first layer.

A 2.5D network (``model.slice_context = k``) sees a slice with its ``k`` neighbours on each
side as channels. ACDC's slices are 5-10 mm apart, so a neighbour's edges are not the
slice's edges: at a small budget the network partly copies them, which costs clean Dice on
the thin structures (myocardium, RV). Two options change what the neighbours carry, keeping
what they are good for under respiratory motion (each slice is its own breath-hold):

* ``model.slice_context_fusion: mean``: every neighbour channel becomes the mean of the
  neighbours, an interpolated estimate of the slice itself (closer to its anatomy than either
  neighbour), in which two independent breathing artefacts partly cancel;
* ``model.slice_context_blur: sigma``: the neighbour channels are Gaussian-smoothed, so they
  give where the heart is and its rough shape, and only the slice itself gives sharp edges.

Both run as a forward pre-hook on the network, so training, validation, `predict`, serving and
ensembles apply exactly the same transform without knowing about it; neither has weights, so
checkpoints are unchanged and `build_model` puts the hook back from the config.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from robustseg.config import SLICE_CONTEXT_FUSIONS


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


def mean_neighbours(x: torch.Tensor) -> torch.Tensor:
    """Every channel of ``x`` but the middle one replaced by the neighbours' mean.

    Args:
        x: ``(N, 1 + 2k, H, W)``, the slice in channel ``k``.

    Returns:
        A tensor of the same shape; channel ``k`` is ``x``'s, bit for bit.
    """
    if x.shape[1] < 3:
        return x
    k = (x.shape[1] - 1) // 2
    m = (x[:, :k].sum(1, keepdim=True) + x[:, k + 1:].sum(1, keepdim=True)) / (2 * k)
    return torch.cat([m.expand(-1, k, -1, -1), x[:, k:k + 1], m.expand(-1, k, -1, -1)], dim=1)


class ContextInput:
    """Forward pre-hook: the configured fusion, then blur, on the network's input.

    A class, not a closure, so the network still pickles.
    """

    def __init__(self, fusion: str = "channels", sigma: float = 0.0):
        if fusion not in SLICE_CONTEXT_FUSIONS:
            raise ValueError(f"slice context fusion must be one of {SLICE_CONTEXT_FUSIONS}, got {fusion!r}")
        self.fusion, self.sigma = fusion, float(sigma)

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = mean_neighbours(args[0]) if self.fusion == "mean" else args[0]
        return (blur_neighbours(x, self.sigma),) + tuple(args[1:])
