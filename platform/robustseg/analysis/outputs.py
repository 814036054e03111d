"""Output files shared by the analyses: headless figures and strict JSON.

`pyplot` imports matplotlib for headless use, `save_figure` writes a figure (creating its
folder) and closes it, `jsonable` turns a result into something `json.dumps` writes as
strict JSON. Used by `robustseg.analysis.robustness`, `robustseg.analysis.svcca` and
`robustseg.engine.pseudo_labels`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import numpy as np


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (headless: CI and workers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Union[str, Path], dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (its folder created), close it, and return the path.

    Args:
        fig: A matplotlib figure.
        path: Output file; the format follows its suffix.
        dpi: Resolution.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def jsonable(v: Any) -> Any:
    """Strict JSON: NaN and inf become None, numpy arrays and scalars Python lists and numbers,
    tuples lists, dict keys strings; everything else is returned as is."""
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        return jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


__all__ = ["jsonable", "pyplot", "save_figure"]
