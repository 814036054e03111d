"""The SVCCA numbers: the SV step, CCA and their mean, on ``(datapoints, neurons)`` matrices.

Steps 1-4 of the notes in `robustseg.analysis.svcca` (Raghu et al. 2017, arXiv:1706.05806):
datapoints of a layer's output (`as_datapoints`), the SV step (`svd_reduce`), canonical
correlations from orthonormal bases (`cca`) and the similarity, their mean (`svcca`); with
the options (`SVCCAOptions`) and the result of one comparison (`SVCCAResult`). No model, no
hooks: plain arrays in, numbers out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
import torch

from robustseg.errors import ConfigError

Array = Union[np.ndarray, torch.Tensor]


@dataclass
class SVCCAOptions:
    """How activations are reduced and compared (see the notes of `robustseg.analysis.svcca`).

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



__all__ = ["SVCCAOptions", "SVCCAResult", "as_datapoints", "cca", "subsample_rows", "svcca", "svd_reduce"]
