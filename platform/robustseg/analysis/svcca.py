"""SVCCA: how similar two layers' representations are, over training and across models.

Singular Vector Canonical Correlation Analysis (Raghu et al. 2017, arXiv:1706.05806), as the
lung CT thesis uses it (Ch. 2.4.2 and 5.2.4, Figs 5.2-5.5):

1. **Datapoints.** A layer's output over a fixed probe set is a ``(datapoints, neurons)``
   matrix. A convolutional map ``(N, C, *S)`` gives one datapoint per image *and* spatial
   position, ``(N * prod(S), C)``: a channel is a neuron, as in the paper's treatment of
   conv layers (`as_datapoints`).
2. **SV step.** Each side is centred and reduced, separately, to its top singular directions
   explaining ``keep`` (99 %) of the variance: the low-variance directions are mostly noise,
   which CCA would otherwise happily correlate (`svd_reduce`).
3. **CCA step.** The canonical correlations of two subspaces are the singular values of
   ``Qa^T Qb`` for orthonormal bases ``Qa``, ``Qb`` of the centred data (`cca`): no covariance
   is inverted, so it stays stable when neurons outnumber datapoints or a side is
   rank-deficient (the rank is read off the singular values, not assumed).
4. **Similarity** = the mean canonical correlation (`svcca`).

Memory and cost. A 512 x 512 first stage has 262k positions per slice, far more datapoints
than SVD needs. Three bounds, all deterministic so that every model sees the same rows:

* capture average-pools every map to at most ``max_grid`` positions per axis
  (`capture_activations`): each image region still contributes, but the stored activations
  are ``N x C x max_grid^2`` floats at most;
* two layers of different resolution are compared on the coarser grid (the finer one is
  average-pooled to it), so both halves of a datapoint describe the same image region (this
  is what makes the layer i of A vs layer j of B heatmap possible);
* at most ``max_points`` datapoints enter the SVD: a fixed random subset of the rows, the
  same for both sides (the paper subsamples conv positions the same way).

CCA needs many more datapoints than kept directions: with ``dims_a + dims_b >= n_points``
the correlations are forced towards 1 (`SVCCAResult.underdetermined`); probe more slices.

Layers. `default_layers` finds a backbone's top-level blocks in forward order (encoder
stages, bottleneck, decoder stages, output) without knowing the backbone: see its notes.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustseg.analysis.outputs import jsonable, pyplot, save_figure
from robustseg.errors import ConfigError

Array = Union[np.ndarray, torch.Tensor]
Grid = Tuple[int, ...]
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class SVCCAOptions:
    """How activations are reduced and compared (see the module notes).

    Attributes:
        keep: Fraction of each side's variance kept by the SV step (the paper's 99 %).
        max_points: At most this many datapoints (rows) per comparison: a fixed random subset.
        max_grid: Captured maps are average-pooled to at most this many positions per spatial axis.
        seed: Seed of the datapoint subset (the same rows on both sides of a comparison).
    """

    keep: float = 0.99
    max_points: int = 8192
    max_grid: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.keep) <= 1.0:
            raise ConfigError(f"svcca keep must be in (0, 1], got {self.keep}")
        if int(self.max_points) < 2:
            raise ConfigError(f"svcca max_points must be >= 2, got {self.max_points}")
        if int(self.max_grid) < 1:
            raise ConfigError(f"svcca max_grid must be >= 1, got {self.max_grid}")


@dataclass
class SVCCAResult:
    """One comparison of two layers.

    Attributes:
        correlations: Canonical correlations, descending, in [0, 1]; ``min(dims_a, dims_b)`` of them.
        mean: Their mean: the SVCCA similarity.
        dims_a: Directions kept on side A by the SV step.
        dims_b: Directions kept on side B.
        n_points: Datapoints compared.
    """

    correlations: np.ndarray
    mean: float
    dims_a: int
    dims_b: int
    n_points: int

    @property
    def underdetermined(self) -> bool:
        """Too few datapoints for the kept directions: correlations are forced towards 1."""
        return self.dims_a + self.dims_b >= self.n_points


# --------------------------------------------------------------------------- the SVCCA numbers
def as_datapoints(acts: Array) -> np.ndarray:
    """``(datapoints, neurons)`` float64 rows of a layer's output.

    ``(N, C)`` is returned as is; a map ``(N, C, *S)`` becomes ``(N * prod(S), C)`` with row
    ``n * prod(S) + flat_position``: every image position is a datapoint, every channel a neuron.

    Raises:
        ValueError: fewer than two dimensions, or fewer than two datapoints.
    """
    x = acts.detach().cpu().numpy() if isinstance(acts, torch.Tensor) else np.asarray(acts)
    if x.ndim < 2:
        raise ValueError(f"activations must be (datapoints, neurons) or (N, C, *spatial), got shape {x.shape}")
    if x.ndim > 2:
        x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 datapoints, got shape {x.shape}")
    return np.asarray(x, dtype=np.float64)


def subsample_rows(n: int, max_points: Optional[int], seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_points`` of ``n`` rows: a sorted random subset fixed by ``(n, seed)``.

    Both sides of a comparison have the same ``n``, so they keep the same datapoints.
    """
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_points), replace=False))


def _svd_centred(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Left singular vectors and singular values of the centred data, rank-deficient ones dropped."""
    u, s, _ = np.linalg.svd(x - x.mean(axis=0, keepdims=True), full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(x.shape) * np.finfo(np.float64).eps
    rank = int((s > tol).sum())
    if rank == 0:
        raise ValueError(f"activations of shape {x.shape} are constant: no variance to compare")
    return u[:, :rank], s[:rank]


def _kept(s: np.ndarray, keep: float) -> int:
    """The fewest leading directions whose variance reaches ``keep`` of the total."""
    frac = np.cumsum(s ** 2) / float(np.sum(s ** 2))
    # The tolerance makes keep=1.0 mean "every non-null direction" despite rounding of the sum.
    return min(int(np.searchsorted(frac, keep - 1e-9)) + 1, s.size)


def _top_directions(x: np.ndarray, keep: float) -> np.ndarray:
    """Orthonormal ``(n, k)`` basis of the SV-reduced subspace (what CCA needs from it)."""
    u, s = _svd_centred(x)
    return u[:, :_kept(s, keep)]


def svd_reduce(acts: Array, keep: float = 0.99) -> np.ndarray:
    """The SV step: centred data projected on its top directions explaining ``keep`` of the variance.

    Args:
        acts: ``(datapoints, neurons)`` or ``(N, C, *S)`` (see `as_datapoints`).
        keep: Variance fraction in (0, 1].

    Returns:
        ``(datapoints, k)`` reduced data, columns ordered by variance; ``k`` is at most the
        rank of the centred data (so at most ``datapoints - 1``).

    Raises:
        ValueError: a bad ``keep`` or constant activations.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    u, s = _svd_centred(as_datapoints(acts))
    k = _kept(s, keep)
    return u[:, :k] * s[:k]


def _correlate(qa: np.ndarray, qb: np.ndarray) -> SVCCAResult:
    """Canonical correlations of two orthonormal bases of centred data with the same rows."""
    rho = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0.0, 1.0)
    return SVCCAResult(rho, float(rho.mean()), qa.shape[1], qb.shape[1], qa.shape[0])


def _same_rows(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"both sides need the same datapoints, got {a.shape[0]} and {b.shape[0]} rows")


def cca(x: Array, y: Array) -> np.ndarray:
    """Canonical correlations between two sets of variables observed on the same datapoints.

    Orthonormal bases of the centred column spaces come from SVDs (rank-revealing, so
    collinear or surplus neurons are harmless); the correlations are the singular values of
    ``Qx^T Qy``.

    Args:
        x: ``(datapoints, p)`` (or a map, see `as_datapoints`).
        y: ``(datapoints, q)``, same datapoints.

    Returns:
        ``min(rank x, rank y)`` correlations, descending, in [0, 1].

    Raises:
        ValueError: different numbers of datapoints, or a constant side.
    """
    a, b = as_datapoints(x), as_datapoints(y)
    _same_rows(a, b)
    return _correlate(_svd_centred(a)[0], _svd_centred(b)[0]).correlations


def svcca(acts_a: Array, acts_b: Array, keep: float = 0.99, *, max_points: Optional[int] = None,
          seed: int = 0) -> SVCCAResult:
    """SVCCA similarity of two layers' activations on the same datapoints.

    Equal to the mean of ``cca(svd_reduce(a, keep), svd_reduce(b, keep))``; invariant to any
    invertible linear map of either side's neurons (when ``keep`` retains every direction).

    Args:
        acts_a: ``(datapoints, neurons_a)``, or conv maps ``(N, C, *S)`` (one datapoint per
            image position).
        acts_b: The same datapoints seen by the other layer.
        keep: Variance fraction each side keeps in the SV step.
        max_points: Use at most this many datapoints (the same random subset on both sides).
        seed: Seed of that subset.

    Raises:
        ValueError: different datapoints, a bad ``keep``, or a constant side.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    a, b = as_datapoints(acts_a), as_datapoints(acts_b)
    _same_rows(a, b)
    rows = subsample_rows(a.shape[0], max_points, seed)
    return _correlate(_top_directions(a[rows], keep), _top_directions(b[rows], keep))


# --------------------------------------------------------------------------- which layers
@dataclass(frozen=True)
class LayerInfo:
    """A module's output on one example.

    Attributes:
        name: Its ``model.named_modules()`` name.
        kind: Class name.
        shape: Output of one example as a channel-first map ``(C, *S)`` (or ``(C,)``).
        channels_last: The module emits ``(N, *S, C)`` (Swin stages); captures move C first.
    """

    name: str
    kind: str
    shape: Tuple[int, ...]
    channels_last: bool = False


@dataclass
class _Call:
    calls: int = 0
    order: int = -1
    shape: Optional[Tuple[int, ...]] = None
    layout: Optional[str] = None
    on_path: bool = False
    tensor: Optional[torch.Tensor] = field(default=None, repr=False)


def _fits(spatial: Sequence[int], inp: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """Per-axis downsampling factors if ``spatial`` can be a map of an ``inp``-sized input."""
    if len(spatial) != len(inp) or any(s < 1 or s > i or i % s for s, i in zip(spatial, inp)):
        return None
    return tuple(i // s for s, i in zip(spatial, inp))


def feature_layout(shape: Sequence[int], input_spatial: Sequence[int]) -> Optional[str]:
    """``"cf"`` (``(N, C, *S)``), ``"cl"`` (``(N, *S, C)``), ``"vector"`` (``(N, C)``) or None.

    A map's spatial axes must divide the input's. When both orders fit (``C`` equal to a
    spatial size), the one with the same factor on every axis wins, then channel-first: a
    32-channel 32 x 32 map of a 64 x 64 input reads as channel-first, a Swin ``(N, 224, 224,
    16)`` output of a 224 x 224 input as channel-last.
    """
    if len(shape) == 2:
        return "vector"
    if len(shape) != len(input_spatial) + 2:
        return None
    options = []
    for layout, spatial in (("cf", shape[2:]), ("cl", shape[1:-1])):
        factors = _fits(spatial, input_spatial)
        if factors is not None:
            options.append((len(set(factors)) == 1, layout == "cf", layout))
    return max(options)[2] if options else None


def _trace(model: nn.Module, example: torch.Tensor) -> Dict[int, _Call]:
    """Calls, output shape/layout, forward order and output dependence of every module (by id)."""
    seen: Dict[int, _Call] = {}
    spatial = tuple(example.shape[2:])
    counter = [0]

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        rec = seen.setdefault(id(mod), _Call())
        rec.calls += 1
        if rec.calls > 1:
            return
        rec.order, counter[0] = counter[0], counter[0] + 1
        if isinstance(out, torch.Tensor):
            rec.shape, rec.layout = tuple(out.shape), feature_layout(out.shape, spatial)
            rec.tensor = out if out.requires_grad else None

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            x = example.detach().clone().requires_grad_(True)
            out = model(x)
            if isinstance(out, (list, tuple)):
                out = out[0]
            # A block is on the main path iff the output depends on it: deep-supervision heads
            # and other side branches get no gradient, whatever the code in between does.
            recs = [r for r in seen.values() if r.tensor is not None]
            grads = torch.autograd.grad(out.float().sum(), [r.tensor for r in recs], allow_unused=True) if recs else []
            for r, g in zip(recs, grads):
                r.on_path, r.tensor = g is not None, None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_container(m: nn.Module, ancestors: Tuple[type, ...], names: Mapping[int, str],
                  calls: Mapping[int, _Call]) -> bool:
    """A module to look inside rather than to measure (see `default_layers`)."""
    rec = calls.get(id(m))
    if rec is None or rec.calls != 1 or rec.layout not in ("cf", "cl"):
        return any(id(c) in calls for c in m.modules())  # lists, bypassed wrappers, list outputs
    if type(m) is nn.Sequential:
        return True
    own = names[id(m)]
    for sub in list(m.modules())[1:]:
        if type(sub) is type(m) or not names[id(sub)].startswith(own + "."):
            return True  # a recursive U-Net level, or a wrapper of blocks registered elsewhere
    return type(m) in ancestors


def _is_block(m: nn.Module, calls: Mapping[int, _Call]) -> bool:
    rec = calls.get(id(m))
    return (rec is not None and rec.calls == 1 and rec.layout in ("cf", "cl") and rec.on_path
            and _has_params(m) and not isinstance(m, _NORMS))


def _blocks_under(m: nn.Module, ancestors: Tuple[type, ...], names: Mapping[int, str],
                  calls: Mapping[int, _Call], out: Dict[int, nn.Module]) -> None:
    for child in m.children():
        if id(child) in out:
            continue
        if _is_container(child, ancestors, names, calls):
            _blocks_under(child, ancestors + (type(child),), names, calls, out)
        elif _is_block(child, calls):
            out[id(child)] = child


def _info(m: nn.Module, name: str, rec: _Call) -> LayerInfo:
    shape = rec.shape or ()
    cl = rec.layout == "cl"
    chw = (shape[-1], *shape[1:-1]) if cl else tuple(shape[1:])
    return LayerInfo(name, type(m).__name__, tuple(int(s) for s in chw), cl)


def default_layers(model: nn.Module, example: torch.Tensor) -> List[LayerInfo]:
    """The backbone's top-level blocks in forward order, found from one forward pass.

    Generic, so it serves every registered backbone: starting at the root, a module is
    *looked inside* when it is a container (``ModuleList``, plain ``nn.Sequential``, a wrapper
    not called itself, one returning a list), a recursive U-Net level (it contains, or sits
    inside, a module of its own class: MONAI's ``AttentionLayer``, DynUNet's skip layers), or a
    wrapper of blocks registered elsewhere; otherwise it is *a block* if it has parameters,
    runs once, returns a feature map (channel-first or channel-last, `feature_layout`), is
    not a bare normalisation layer, and the model output depends on it (deep-supervision
    heads do not). A lone block (``NNUNet.net``) is the whole network and is looked inside.

    Args:
        model: The network.
        example: One input ``(1, C_in, *patch)``.

    Returns:
        Blocks in the order their outputs are produced.
    """
    calls = _trace(model, example)
    names = {id(m): n for n, m in model.named_modules()}
    found: Dict[int, nn.Module] = {}
    _blocks_under(model, (), names, calls, found)
    while len(found) == 1:
        (only,) = found.values()
        inner: Dict[int, nn.Module] = {}
        _blocks_under(only, (type(only),), names, calls, inner)
        if not inner:
            break
        found = inner
    ordered = sorted(found.values(), key=lambda m: calls[id(m)].order)
    return [_info(m, names[id(m)], calls[id(m)]) for m in ordered]


def check_layers(model: nn.Module, layers: Sequence[str], defaults: Sequence[str] = (), where: str = "model") -> None:
    """Fail on names that are not ``model.named_modules()`` names.

    Raises:
        ConfigError: naming the unknown layers, close matches, and the valid choices (the
            default blocks and how many module names there are in all).
    """
    valid = [n for n, _ in model.named_modules() if n]
    unknown = [n for n in layers if n not in set(valid)]
    if not unknown:
        return
    hints = {n: difflib.get_close_matches(n, valid, n=3) for n in unknown}
    close = "; ".join(f"{n!r}: did you mean {', '.join(h)}?" for n, h in hints.items() if h)
    raise ConfigError(f"--layers: {where} has no module(s) {', '.join(map(repr, unknown))}"
                      f"{f' ({close})' if close else ''}. Valid: any of its {len(valid)} named modules, e.g. the "
                      f"default blocks {', '.join(defaults) if defaults else ', '.join(valid[:20])}")


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


# --------------------------------------------------------------------------- results and outputs
@dataclass
class TrainingCurve:
    """Per-layer similarity of a run's checkpoints to its converged model.

    Attributes:
        run: Display name.
        reference: The converged checkpoint (``best.pt``, else ``last.pt``).
        reference_epoch: Its epoch (None if unrecorded).
        epochs: Epoch of each compared checkpoint, ascending.
        checkpoints: Their paths.
        similarity: ``{layer: [one value per checkpoint]}``, layers in forward order.
        dims: ``{layer: [kept directions of the checkpoint's side]}``.
        n_points: Datapoints per layer comparison.
        underdetermined: Layers with too few datapoints for their kept directions at some
            checkpoint (`SVCCAResult.underdetermined`): their values are biased towards 1.
    """

    run: str
    reference: str
    reference_epoch: Optional[int]
    epochs: List[int] = field(default_factory=list)
    checkpoints: List[str] = field(default_factory=list)
    similarity: Dict[str, List[float]] = field(default_factory=dict)
    dims: Dict[str, List[int]] = field(default_factory=dict)
    n_points: Dict[str, int] = field(default_factory=dict)
    underdetermined: List[str] = field(default_factory=list)

    def add(self, epoch: int, checkpoint: str, results: Mapping[str, SVCCAResult]) -> None:
        """Record one checkpoint's `layer_similarity`."""
        self.epochs.append(int(epoch))
        self.checkpoints.append(str(checkpoint))
        for layer, r in results.items():
            self.similarity.setdefault(layer, []).append(r.mean)
            self.dims.setdefault(layer, []).append(r.dims_a)
            self.n_points[layer] = r.n_points
            if r.underdetermined and layer not in self.underdetermined:
                self.underdetermined.append(layer)

    def final(self) -> Dict[str, float]:
        """Similarity of the latest checkpoint, per layer."""
        return {layer: values[-1] for layer, values in self.similarity.items() if values}


@dataclass
class PairSimilarity:
    """The layer-by-layer heatmap of two models.

    Attributes:
        label_a: Model A (rows).
        label_b: Model B (columns).
        layers_a: Row layers.
        layers_b: Column layers.
        matrix: ``(len(layers_a), len(layers_b))`` similarities.
    """

    label_a: str
    label_b: str
    layers_a: List[str]
    layers_b: List[str]
    matrix: np.ndarray

    def matched(self) -> Dict[str, float]:
        """Similarity of the layers both models have (same name): the heatmap's diagonal for one backbone."""
        cols = {n: j for j, n in enumerate(self.layers_b)}
        return {n: float(self.matrix[i, cols[n]]) for i, n in enumerate(self.layers_a) if n in cols}


def plot_training(curves: Sequence[TrainingCurve], path: Union[str, Path]) -> Path:
    """Similarity to the converged model against epoch: one panel per run, one line per layer.

    Lines are coloured along the forward order (encoder dark to decoder light), as in the
    thesis' Figs 5.2-5.4, so a run fine-tuned from a pre-trained model sits beside one from
    scratch on the same axes. The converged model's own epoch is drawn at 1 (its similarity
    to itself) when no timeline checkpoint has that epoch, so every line ends where it converges.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), sharey=True, squeeze=False)
    for ax, curve in zip(axes[0], curves):
        layers = list(curve.similarity)
        colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(1, len(layers))))
        ref = curve.reference_epoch
        tail = [(ref, 1.0)] if ref is not None and ref not in curve.epochs else []
        for colour, layer in zip(colours, layers):
            pts = sorted([*zip(curve.epochs, curve.similarity[layer]), *tail])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colour, label=layer)
        ax.set_title(f"{curve.run} (vs epoch {ref})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right", ncol=1 + len(layers) // 12)
    axes[0][0].set_ylabel("SVCCA similarity to converged model")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap(pair: PairSimilarity, path: Union[str, Path]) -> Path:
    """Layer i of A (rows) vs layer j of B (columns), annotated when small enough to read."""
    plt = pyplot()
    la, lb = len(pair.layers_a), len(pair.layers_b)
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * lb, 1.8 + 0.4 * la))
    im = ax.imshow(pair.matrix, vmin=0.0, vmax=1.0, cmap="magma")
    ax.set_xticks(range(lb), pair.layers_b, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(la), pair.layers_a, fontsize=7)
    ax.set_xlabel(pair.label_b)
    ax.set_ylabel(pair.label_a)
    if la * lb <= 400:
        for i in range(la):
            for j in range(lb):
                v = pair.matrix[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="SVCCA similarity")
    ax.set_title(f"SVCCA: {pair.label_a} vs {pair.label_b}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def results_doc(curves: Sequence[TrainingCurve], pair: Optional[PairSimilarity],
                info: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Every number as one JSON-ready dict: ``info`` fields, ``training`` per run, ``pair``."""
    doc: Dict[str, Any] = dict(info or {})
    doc["training"] = {c.run: {"reference": c.reference, "reference_epoch": c.reference_epoch, "epochs": c.epochs,
                               "checkpoints": c.checkpoints, "similarity": c.similarity, "final": c.final(),
                               "dims": c.dims, "n_points": c.n_points, "underdetermined": c.underdetermined}
                      for c in curves}
    doc["pair"] = None if pair is None else {
        "a": pair.label_a, "b": pair.label_b, "layers_a": pair.layers_a, "layers_b": pair.layers_b,
        "matrix": pair.matrix, "matched": pair.matched()}
    return jsonable(doc)


def write_outputs(curves: Sequence[TrainingCurve], pair: Optional[PairSimilarity], out_dir: Union[str, Path],
                  info: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """Write ``svcca.json`` and the plots that apply (``svcca_training.png``, ``svcca_heatmap.png``).

    Returns:
        ``{"json", "training_plot"?, "heatmap"?}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "svcca.json"}
    files["json"].write_text(json.dumps(results_doc(curves, pair, info), indent=1))
    if curves:
        files["training_plot"] = plot_training(curves, out / "svcca_training.png")
    if pair is not None:
        files["heatmap"] = plot_heatmap(pair, out / "svcca_heatmap.png")
    return files


__all__ = ["LayerInfo", "LayerSpace", "PairSimilarity", "SVCCAOptions", "SVCCAResult", "TrainingCurve", "as_datapoints",
           "capture_activations", "cca", "check_layers", "common_grid", "compare_layers", "default_layers",
           "feature_layout", "layer_similarity", "plot_heatmap", "plot_training", "results_doc", "similarity_matrix",
           "subsample_rows", "svcca", "svd_reduce", "write_outputs"]
