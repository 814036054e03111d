"""Pseudo-label files: the format, writing and reading it, and the similarity histogram.

`save_pseudo_labels` / `load_pseudo_labels` write and read the file the mean-teacher regime
takes (``regime.params.pseudo_labels``), both checking it with `check_pseudo_labels`;
`write_outputs` writes it with its summary and `plot_similarity_histogram` (thesis Fig. 5.7).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import numpy as np
import torch

from robustseg.analysis.outputs import jsonable, pyplot, save_figure
from robustseg.engine.pseudo_labels_pipeline import PseudoLabelResult
from robustseg.errors import DataError

#: Keys every pseudo-label file holds (`load_pseudo_labels` checks them).
REQUIRED_KEYS = ("images", "soft", "similarity", "source", "meta")


# --------------------------------------------------------------------------- files
def save_pseudo_labels(data: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write a pseudo-label file (``torch.save``), after checking it as `load_pseudo_labels` would.

    An empty set (no patch in the window) is written too, so its summary can be inspected,
    but `load_pseudo_labels` refuses it.
    """
    path = Path(path)
    check_pseudo_labels(data, path, allow_empty=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(path)  # readers never see half a file
    return path


def check_pseudo_labels(data: Any, where: Union[str, Path], *, allow_empty: bool = False) -> None:
    """Validate the pseudo-label format.

    Format: ``images`` float32 ``(N, 1, P, P)`` (store intensities), ``soft`` float32
    ``(N, C, P, P)`` (non-negative, sums 1 over C), ``similarity`` ``(N,)``, ``source`` N
    ``(case_id, y0, x0)``, ``meta`` dict; optionally ``slice_index`` ``(N,)``.

    Raises:
        DataError: naming ``where``: a missing key or a shape, type or sum that does not fit.
    """
    if not isinstance(data, dict):
        raise DataError(where, f"not a pseudo-label file (a {type(data).__name__}, expected a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DataError(where, f"not a pseudo-label file: missing keys {missing} (expected {list(REQUIRED_KEYS)})")
    images, soft, sim = data["images"], data["soft"], data["similarity"]
    for key, t in (("images", images), ("soft", soft), ("similarity", sim)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise DataError(where, f"{key} must be a float tensor, got {type(t).__name__}")
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise DataError(where, f"images must be (N, 1, P, P), got {tuple(images.shape)}")
    n, p = images.shape[0], images.shape[2]
    if soft.dim() != 4 or soft.shape[0] != n or soft.shape[2:] != images.shape[2:] or soft.shape[1] < 2:
        raise DataError(where, f"soft must be (N={n}, C>=2, {p}, {p}) like images, got {tuple(soft.shape)}")
    if tuple(sim.shape) != (n,):
        raise DataError(where, f"similarity must be ({n},), got {tuple(sim.shape)}")
    if not isinstance(data["source"], (list, tuple)) or len(data["source"]) != n:
        raise DataError(where, f"source must list {n} (case_id, y0, x0) entries")
    if "slice_index" in data and tuple(torch.as_tensor(data["slice_index"]).shape) != (n,):
        raise DataError(where, f"slice_index must be ({n},)")
    if not isinstance(data["meta"], dict):
        raise DataError(where, "meta must be a dict")
    if n == 0 and not allow_empty:
        raise DataError(where, "holds no pseudo labels (no unlabelled patch fell in the similarity window)")
    if n and (float(soft.min()) < -1e-6 or not torch.allclose(soft.sum(1), torch.ones(()), atol=1e-4)):
        raise DataError(where, "soft masks must be non-negative and sum to 1 over the classes")


def load_pseudo_labels(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and validate a pseudo-label file (see `check_pseudo_labels` for the format).

    Raises:
        DataError: naming the file: missing, unreadable, empty, or not in the format.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "pseudo-label file not found (write it with `robustseg pseudo-label`)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike mean "not our file"
        raise DataError(path, f"unreadable pseudo-label file ({type(e).__name__}: {e})") from None
    check_pseudo_labels(data, path)
    return data


# --------------------------------------------------------------------------- report
def plot_similarity_histogram(best: torch.Tensor, window: Sequence[float], path: Union[str, Path],
                              bins: int = 50) -> Path:
    """Histogram of the best similarities with the kept window shaded (thesis Fig. 5.7)."""
    plt = pyplot()
    values = best.double().numpy()
    low, high = float(window[0]), float(window[1])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    lo = min(float(values.min()) if values.size else low, low) - 0.01
    hi = max(1.0, float(values.max()) if values.size else 1.0)  # float error can give 1 + eps
    ax.hist(values, bins=np.linspace(lo, hi, bins + 1), color="#4c72b0", edgecolor="white", linewidth=0.4)
    kept = int(((values >= low) & (values <= high)).sum())
    ax.axvspan(low, high, color="#55a868", alpha=0.2, label=f"kept [{low:g}, {high:g}]: {kept}/{values.size}")
    for v in (low, high):
        ax.axvline(v, color="#55a868", linestyle="--", linewidth=1)
    ax.set_xlabel("best cosine similarity to the labelled dictionary")
    ax.set_ylabel("unlabelled patches")
    ax.set_title("Cosine similarity of unlabelled patches (cf. thesis Fig. 5.7)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(result: PseudoLabelResult, out: Union[str, Path]) -> Dict[str, Path]:
    """Write the pseudo-label file, ``<stem>_similarity.png`` and ``<stem>_summary.json`` beside it.

    Returns:
        ``{"labels", "histogram", "summary"}`` paths.
    """
    out = Path(out)
    stem = out.name[: -len(".pt")] if out.name.endswith(".pt") else out.name
    labels = save_pseudo_labels(result.data, out)
    window = result.summary["params"]["window"]
    hist = plot_similarity_histogram(result.best_similarity, window, out.with_name(f"{stem}_similarity.png"))
    summary = out.with_name(f"{stem}_summary.json")
    summary.write_text(json.dumps(jsonable({**result.summary, "output": str(labels)}), indent=1))
    return {"labels": labels, "histogram": hist, "summary": summary}



__all__ = ["REQUIRED_KEYS", "check_pseudo_labels", "load_pseudo_labels", "plot_similarity_histogram",
           "save_pseudo_labels", "write_outputs"]
