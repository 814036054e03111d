"""Pseudo labels, steps 1-2: boxes around the foreground and random patch positions in them.

`bounding_box` encloses a mask's foreground with a margin; `sample_origins` draws distinct
patch positions in a set of boxes (`origin_range` per axis) and `crop` gathers the patches.
The method and its numbers: `robustseg.engine.pseudo_labels`.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch


# --------------------------------------------------------------------------- boxes and patches
class Box(NamedTuple):
    """A half-open pixel box ``[y0, y1) x [x0, x1)``."""

    y0: int
    x0: int
    y1: int
    x1: int


def bounding_box(mask: Union[torch.Tensor, np.ndarray], margin: int) -> Optional[Box]:
    """Box of the nonzero pixels of a ``(H, W)`` mask, enlarged by ``margin`` and clipped to the image.

    Returns:
        The box, or None when the mask is empty (no box to sample from).
    """
    m = torch.as_tensor(mask) != 0
    if not bool(m.any()):
        return None
    h, w = m.shape
    ys = m.any(1).nonzero().flatten()
    xs = m.any(0).nonzero().flatten()
    return Box(max(0, int(ys[0]) - margin), max(0, int(xs[0]) - margin),
               min(h, int(ys[-1]) + 1 + margin), min(w, int(xs[-1]) + 1 + margin))


def origin_range(lo: int, hi: int, patch: int, size: int) -> Tuple[int, int]:
    """Inclusive range of patch starts along one axis for a box side ``[lo, hi)``.

    A box side at least ``patch`` long keeps the patch inside the box; a shorter one puts
    the whole box side inside the patch (the patch cannot fit in it, and cutting the box
    would lose the structure the box marks). Both are clipped to the image.

    Raises:
        ValueError: a patch longer than the image.
    """
    if patch > size:
        raise ValueError(f"patch {patch} is larger than the image side {size}")
    first, last = min(lo, hi - patch), max(lo, hi - patch)
    return max(first, 0), min(last, size - patch)


def sample_origins(boxes: Sequence[Tuple[int, Box]], n: int, patch: int, shape: Tuple[int, int],
                   generator: torch.Generator) -> List[Tuple[int, int, int]]:
    """``n`` random patch positions ``(row, y0, x0)`` in some boxes, without duplicates.

    Args:
        boxes: ``(row, box)`` pairs: ``row`` indexes the slice the box belongs to.
        n: Draws; a box is picked uniformly, then a position uniformly in its `origin_range`.
        patch: Patch side.
        shape: Image ``(H, W)``.
        generator: CPU generator (positions do not depend on the device).

    Returns:
        Distinct positions in draw order (fewer than ``n`` when draws coincide).
    """
    if not boxes or n < 1:
        return []
    pick = torch.randint(0, len(boxes), (n,), generator=generator).tolist()
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64).tolist()
    out: Dict[Tuple[int, int, int], None] = {}
    for k, (uy, ux) in zip(pick, u):
        row, b = boxes[k]
        ylo, yhi = origin_range(b.y0, b.y1, patch, shape[0])
        xlo, xhi = origin_range(b.x0, b.x1, patch, shape[1])
        y0 = ylo + min(int(uy * (yhi - ylo + 1)), yhi - ylo)
        x0 = xlo + min(int(ux * (xhi - xlo + 1)), xhi - xlo)
        out[(row, y0, x0)] = None
    return list(out)


def crop(stack: torch.Tensor, origins: Sequence[Tuple[int, int, int]], patch: int) -> torch.Tensor:
    """Patches ``(N, P, P)`` of a ``(S, H, W)`` stack at ``(row, y0, x0)`` positions (gathered at once)."""
    if not origins:
        return stack.new_zeros((0, patch, patch))
    o = torch.tensor(origins, dtype=torch.long, device=stack.device)
    ar = torch.arange(patch, device=stack.device)
    rows = (o[:, 1, None] + ar)[:, :, None]
    cols = (o[:, 2, None] + ar)[:, None, :]
    return stack[o[:, 0, None, None], rows, cols]



__all__ = ["Box", "bounding_box", "crop", "origin_range", "sample_origins"]
