"""SVCCA on models: activations captured on a probe set, and layers compared on a common grid.

`capture_activations` records named modules' outputs with forward hooks, average-pooled to
at most ``max_grid`` positions per axis; a `LayerSpace` memoises each layer's SV-reduced
basis per grid, so that `compare_layers`, `layer_similarity` (a snapshot against the
converged model) and `similarity_matrix` (layer i of A against layer j of B) reduce a layer
once per grid it is compared on. The memory bounds are in the notes of `robustseg.analysis.svcca`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustseg.analysis.svcca_layers import check_layers, feature_layout
from robustseg.analysis.svcca_math import (SVCCAOptions, SVCCAResult, _correlate, _top_directions, as_datapoints,
                                           subsample_rows)
from robustseg.errors import ConfigError

Grid = Tuple[int, ...]


# --------------------------------------------------------------------------- activations
def _pool(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Average-pool a ``(N, C, *S)`` map to ``grid`` (``()``: a global average to ``(N, C)``)."""
    spatial = tuple(x.shape[2:])
    if spatial == tuple(grid):
        return x
    if not grid:
        return x.flatten(2).mean(2)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(spatial)]
    return pool(x, tuple(grid))


def _as_map(out: Any, name: str, spatial: Sequence[int], max_grid: int) -> torch.Tensor:
    """A hooked output as a pooled channel-first float32 CPU map (a copy: later in-place ops are harmless)."""
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"--layers {name}: outputs {type(out).__name__}, not a tensor; pick a module that returns "
                          "a feature map")
    layout = feature_layout(out.shape, spatial)
    if layout is None:
        raise ConfigError(f"--layers {name}: output shape {tuple(out.shape)} is not a feature map of the "
                          f"{tuple(spatial)} input ((N, C, *spatial), (N, *spatial, C) or (N, C))")
    x = out.detach().float()
    if layout == "cl":
        x = x.movedim(-1, 1)
    grid = tuple(min(int(s), max_grid) for s in x.shape[2:])
    return _pool(x, grid).cpu().clone()


def capture_activations(model: nn.Module, images: torch.Tensor, layers: Sequence[str], *, max_grid: int = 32,
                        batch_size: int = 8, device: Optional[torch.device] = None) -> Dict[str, torch.Tensor]:
    """Outputs of named modules on a probe batch (forward hooks, eval mode, no gradients).

    Args:
        model: The network.
        images: ``(N, C_in, *patch)`` probe inputs.
        layers: ``model.named_modules()`` names (see `default_layers`).
        max_grid: Maps are average-pooled to at most this many positions per spatial axis.
        batch_size: Probe images per forward pass.
        device: Where to run (default: the model's parameters' device).

    Returns:
        ``{layer: (N, C, *S)}`` float32 CPU tensors, channel-first, ``S`` at most ``max_grid``.

    Raises:
        ConfigError: an unknown layer, or one that is not a feature map or runs more than
            once per forward pass (its activations would be ambiguous).
    """
    modules = dict(model.named_modules())
    check_layers(model, layers)
    device = device or next(model.parameters()).device
    spatial = tuple(images.shape[2:])
    got: Dict[str, List[torch.Tensor]] = {n: [] for n in layers}
    calls: Dict[str, int] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                raise ConfigError(f"--layers {name}: runs more than once per forward pass; pick a module used once")
            got[name].append(_as_map(out, name, spatial, max_grid))
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], max(1, batch_size)):
                calls.clear()
                model(images[i:i + batch_size].to(device=device, dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in layers if not got[n]]
    if missing:
        raise ConfigError(f"--layers {', '.join(missing)}: not called in the forward pass")
    return {n: torch.cat(got[n]) for n in layers}


# --------------------------------------------------------------------------- comparisons
def common_grid(a: Grid, b: Grid) -> Grid:
    """The coarser of two grids per axis (``()`` if either is a vector): where two layers are compared."""
    if not a or not b or len(a) != len(b):
        return ()
    return tuple(min(x, y) for x, y in zip(a, b))


class LayerSpace:
    """One model's captured activations, with SV-reduced bases memoised per (layer, grid).

    A layer is reduced once per grid it is compared on, not once per pair: a run's
    converged model is reduced once for all its snapshots, a heatmap reduces each layer once
    per resolution of the other model.
    """

    def __init__(self, acts: Mapping[str, torch.Tensor], opts: Optional[SVCCAOptions] = None) -> None:
        self.acts = dict(acts)
        self.opts = opts or SVCCAOptions()
        self._bases: Dict[Tuple[str, Grid], np.ndarray] = {}

    def grid(self, layer: str) -> Grid:
        """The captured spatial grid of ``layer``."""
        return tuple(int(s) for s in self.acts[layer].shape[2:])

    def basis(self, layer: str, grid: Grid) -> np.ndarray:
        """Orthonormal basis of ``layer``'s SV-reduced subspace on ``grid`` (rows: subsampled datapoints)."""
        key = (layer, tuple(grid))
        if key not in self._bases:
            pts = as_datapoints(_pool(self.acts[layer], tuple(grid)))
            rows = subsample_rows(pts.shape[0], self.opts.max_points, self.opts.seed)
            self._bases[key] = _top_directions(pts[rows], self.opts.keep)
        return self._bases[key]

    def forget(self, layer: str) -> None:
        """Drop ``layer``'s memoised bases (bounds memory in a heatmap)."""
        for key in [k for k in self._bases if k[0] == layer]:
            del self._bases[key]


def compare_layers(a: LayerSpace, layer_a: str, b: LayerSpace, layer_b: str) -> SVCCAResult:
    """SVCCA of ``layer_a`` of model A and ``layer_b`` of model B on their common grid.

    Raises:
        ValueError: the two were captured on different probe sets.
    """
    na, nb = a.acts[layer_a].shape[0], b.acts[layer_b].shape[0]
    if na != nb:
        raise ValueError(f"{layer_a} and {layer_b} were captured on different probe sets ({na} vs {nb} images)")
    grid = common_grid(a.grid(layer_a), b.grid(layer_b))
    return _correlate(a.basis(layer_a, grid), b.basis(layer_b, grid))


def layer_similarity(space: LayerSpace, reference: LayerSpace, layers: Sequence[str]) -> Dict[str, SVCCAResult]:
    """Each layer of one model against the same layer of a reference (a snapshot vs the converged model)."""
    return {layer: compare_layers(space, layer, reference, layer) for layer in layers}


def similarity_matrix(a: LayerSpace, b: LayerSpace, layers_a: Sequence[str], layers_b: Sequence[str],
                      progress: Optional[Callable[..., Any]] = None) -> np.ndarray:
    """``(len(layers_a), len(layers_b))`` SVCCA similarities: layer i of A vs layer j of B.

    Args:
        a: Model A's activations.
        b: Model B's, on the same probe set.
        layers_a: Rows.
        layers_b: Columns.
        progress: tqdm-like factory over the rows.
    """
    out = np.zeros((len(layers_a), len(layers_b)))
    rows = list(enumerate(layers_a))
    for i, la in (progress(rows, desc="svcca heatmap", unit="layer") if progress else rows):
        for j, lb in enumerate(layers_b):
            out[i, j] = compare_layers(a, la, b, lb).mean
        a.forget(la)  # row i's bases are not needed again; B's are, for every row
    return out



__all__ = ["LayerSpace", "capture_activations", "common_grid", "compare_layers", "layer_similarity",
           "similarity_matrix"]
