"""SVCCA results and their files: training curves, the pair heatmap, ``svcca.json`` and the plots.

`TrainingCurve` holds a run's per-layer similarity to its converged model over epochs (the
thesis' Figs 5.2-5.4, `plot_training`), `PairSimilarity` the layer-by-layer matrix of two
models (Fig. 5.5, `plot_heatmap`); `write_outputs` writes them with every number as JSON
(`results_doc`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from robustseg.analysis.outputs import jsonable, pyplot, save_figure
from robustseg.analysis.svcca_math import SVCCAResult


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



__all__ = ["PairSimilarity", "TrainingCurve", "plot_heatmap", "plot_training", "results_doc", "write_outputs"]
