"""SVCCA over runs: which checkpoints, which probe slices, which layers, and the MLflow record.

The numbers come from `robustseg.analysis.svcca`; this module finds the checkpoints, the
probe slices and the layers, and records the analysis as one MLflow run (experiment
``analysis``). `robustseg analyze svcca` (`robustseg.cli.analysis`) is its command line.

Runs. A ``--runs`` argument is a run folder (``.../runs/<name>/fold0``) or a checkpoint file,
optionally named ``NAME=PATH``:

* a folder's *converged model* is ``best.pt``, else ``last.pt``; its *timeline* is every
  ``snapshots/epoch_NNNN.pt`` (``optim.snapshot_every``) plus ``last.pt``, one per epoch. Each
  timeline checkpoint is compared layer by layer with the converged model (the thesis' Figs
  5.2-5.4: similarity to the converged model against epoch);
* a file is a converged model without a timeline;
* with two runs, the converged models are also compared layer i of A against layer j of B
  (Fig. 5.5); this needs the same patch size, so that both see the same probe images.

Probe set. ``--max-slices`` slices (default 32) of fold ``--fold`` (default 0) of a prepared
store: ``--probe STORE``, else the store named in the first run's config
(``data.shards_uri``). The choice is deterministic: slices sorted by case and index, evenly
spaced over those with foreground (the structures the network is for), filled up from the
others if there are too few. Each is centre-cropped or padded (with its minimum) to the
model's patch size. A 3D model gets ``max(1, max_slices // depth)`` whole-case slabs instead.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from robustseg.errors import ConfigError, DataError

if TYPE_CHECKING:  # numpy and torch are imported where used: `robustseg --help` must not pay for them
    import torch

ROLE = "svcca"
_NAMED = re.compile(r"^([\w.\-]+)=(.+)$")
_EPOCH = re.compile(r"epoch_(\d+)\.pt$")


# --------------------------------------------------------------------------- runs and checkpoints
@dataclass
class RunSpec:
    """One ``--runs`` argument resolved to files.

    Attributes:
        label: Display name (``NAME=`` or derived from the path).
        path: The argument's path.
        reference: The converged checkpoint.
        timeline: Checkpoints to compare with it, in epoch order (empty for a file).
    """

    label: str
    path: Path
    reference: Path
    timeline: List[Path] = field(default_factory=list)


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint, in eval mode on its device."""

    model: torch.nn.Module
    cfg: Any
    backbone: str
    patch_size: Tuple[int, ...]
    epoch: Optional[int]
    path: Path


def run_label(path: Path) -> str:
    """``runs/scratch/fold0`` -> ``scratch/fold0``; ``x/fold1/best.pt`` -> ``fold1/best``."""
    parts = [p for p in (path.parent.name, path.stem if path.suffix == ".pt" else path.name) if p]
    return "/".join(parts) or str(path)


def _epoch_of(path: Path) -> int:
    m = _EPOCH.search(path.name)
    return int(m.group(1)) if m else -1


def resolve_run(arg: str) -> RunSpec:
    """A ``[NAME=]PATH`` argument -> its converged checkpoint and timeline.

    Raises:
        CheckpointError: the path does not exist, or a folder holds neither best.pt nor last.pt.
    """
    from robustseg.engine.checkpoint import CheckpointError

    m = _NAMED.match(arg)
    label, raw = (m.group(1), m.group(2)) if m and not Path(arg).exists() else (None, arg)
    path = Path(raw)
    if path.is_file():
        return RunSpec(label or run_label(path), path, path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint not found (expected a run folder holding best.pt/last.pt, "
                              "or a .pt checkpoint file)")
    best, last = path / "best.pt", path / "last.pt"
    reference = best if best.is_file() else last
    if not reference.is_file():
        raise CheckpointError(f"{path}: no best.pt or last.pt in this run folder")
    snaps = sorted((path / "snapshots").glob("epoch_*.pt"), key=_epoch_of)
    return RunSpec(label or run_label(path), path, reference, snaps + ([last] if last.is_file() else []))


def load_model(path: Path, device: torch.device) -> LoadedModel:
    """Rebuild the network stored in a checkpoint (as `robustseg.engine.predict.load_predictor` does).

    Unlike the predictor, no preprocessing plan is needed: the probe slices come from a
    prepared store, already preprocessed.

    Raises:
        CheckpointError: unreadable, another backbone than its config, or weights that do not fit.
    """
    from robustseg.config import ExperimentConfig
    from robustseg.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state
    from robustseg.models import build_model

    ckpt = load_checkpoint(path, map_location="cpu")
    cfg = ExperimentConfig.from_dict(ckpt["config"])
    if ckpt.get("backbone") != cfg.model.name:
        raise CheckpointError(f"{path}: backbone {ckpt.get('backbone')!r} does not match its config "
                              f"({cfg.model.name!r})")
    if "patch_size" not in ckpt:
        raise CheckpointError(f"{path}: no patch_size recorded; cannot rebuild the model")
    patch = tuple(int(p) for p in ckpt["patch_size"])
    model = build_model(cfg.model, patch, ckpt.get("spacing"))
    load_model_state(model, ckpt["model"], str(path))
    epoch = ckpt.get("epoch")
    return LoadedModel(model.to(device).eval(), cfg, cfg.model.name, patch,
                       int(epoch) if epoch is not None else (_epoch_of(path) if _epoch_of(path) >= 0 else None), path)


# --------------------------------------------------------------------------- probe set
def choose_slices(case_ids: Sequence[str], slice_index: Sequence[int], foreground: Sequence[bool], n: int) -> List[int]:
    """Deterministic probe rows: evenly spaced over foreground slices, filled from the rest.

    Returns:
        At most ``n`` row indices, in (case, slice) order.
    """
    order = sorted(range(len(case_ids)), key=lambda i: (case_ids[i], int(slice_index[i])))
    fg = [i for i in order if foreground[i]]
    rest = [i for i in order if not foreground[i]]

    import numpy as np

    def spread(rows: List[int], k: int) -> List[int]:
        if k >= len(rows):
            return list(rows)
        return [rows[int(j)] for j in np.linspace(0, len(rows) - 1, k).round().astype(int)]

    picked = set(spread(fg, n)) | set(spread(rest, max(0, n - len(fg))))
    return [i for i in order if i in picked]


def fit_to_patch(images: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Centre-crop or pad ``(N, *S)`` images to ``patch``; padding takes each image's minimum (background)."""
    out = images
    for axis, p in enumerate(patch, start=1):
        size = out.shape[axis]
        if size > p:
            out = out.narrow(axis, (size - p) // 2, p)
        elif size < p:
            shape = list(out.shape)
            shape[axis] = p
            lo = out.flatten(1).min(1).values.view(-1, *([1] * (out.ndim - 1)))
            padded = lo.expand(*shape).clone()
            padded.narrow(axis, (p - size) // 2, size).copy_(out)
            out = padded
    return out.contiguous()


def load_probe(uri: str, fold: int, max_slices: int, patch: Sequence[int], *,
               storage: Any = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The probe images ``(N, 1, *patch)`` (float32, CPU) and where they came from.

    Args:
        uri: Prepared store URI (or its manifest.json).
        fold: Fold of the manifest to draw from.
        max_slices: Slices (2D) or slice budget (3D: ``max(1, max_slices // depth)`` slabs).
        patch: The model's patch size (2D ``(H, W)`` or 3D ``(D, H, W)``).
        storage: The checkpoint's `StorageConfig` (credentials for s3:// stores).

    Raises:
        ConfigError: a fold outside the manifest's, or ``max_slices`` < 1.
        DataError: a fold without slices.
        StorageError: no prepared store at ``uri``.
    """
    import torch

    from robustseg.data.manifest import MANIFEST, read_manifest
    from robustseg.data.storage import open_store
    from robustseg.engine.data import load_slice_set

    if max_slices < 1:
        raise ConfigError(f"--max-slices must be >= 1, got {max_slices}")
    uri = uri[: -len(MANIFEST)].rstrip("/") if uri.endswith(MANIFEST) else uri
    store = open_store(uri, storage) if storage is not None else open_store(uri)
    manifest = read_manifest(store)
    k = int(manifest.folds["k"])
    if not 0 <= fold < k:
        raise ConfigError(f"--fold {fold}: {manifest.uri} has folds 0..{k - 1}")
    data = load_slice_set(store, manifest, folds=[fold], device=torch.device("cpu"))
    if len(data) == 0:
        raise DataError(manifest.uri, f"fold {fold} holds no slices")
    if len(patch) == 3:
        images, picked = _probe_slabs(data, max_slices, patch)
    else:
        rows = choose_slices(data.case_ids, data.slice_index.tolist(), data.foreground.tolist(), max_slices)
        images = fit_to_patch(data.images[rows].float(), patch)
        picked = [{"case_id": data.case_ids[i], "slice_index": int(data.slice_index[i])} for i in rows]
    info = {"store": manifest.uri, "fold": fold, "n": int(images.shape[0]), "patch_size": list(patch),
            "slices": picked}
    return images[:, None], info


def _probe_slabs(data: Any, max_slices: int, patch: Sequence[int]) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    """Whole-case volumes centre-cropped/padded to a 3D patch: cases with foreground first."""
    import torch

    vols = sorted(data.volumes(), key=lambda v: (not bool((v["label"] > 0).any()), v["case_id"]))
    vols = vols[: max(1, max_slices // int(patch[0]))]
    images = torch.stack([fit_to_patch(v["image"].float()[None], patch)[0] for v in vols])
    return images, [{"case_id": v["case_id"], "slab": "centre"} for v in vols]


# --------------------------------------------------------------------------- the analysis
@dataclass
class SVCCAJob:
    """What `run_svcca` computes (the CLI's arguments, resolved)."""

    runs: List[RunSpec]
    layers: Optional[List[str]] = None
    probe: Optional[str] = None
    fold: int = 0
    max_slices: int = 32
    batch_size: int = 8
    device: Optional[torch.device] = None


def _layers_for(loaded: LoadedModel, example: torch.Tensor, explicit: Optional[Sequence[str]], label: str) -> List[str]:
    from robustseg.analysis.svcca_layers import check_layers, default_layers

    defaults = [info.name for info in default_layers(loaded.model, example)]
    if not explicit:
        if not defaults:
            raise ConfigError(f"--runs {label}: found no feature-map blocks in {loaded.backbone}; name modules with "
                              "--layers")
        return defaults
    check_layers(loaded.model, explicit, defaults, where=f"{label} ({loaded.backbone})")
    return list(explicit)


def _check_probe_fits(models: Mapping[str, LoadedModel]) -> None:
    patches = {label: m.patch_size for label, m in models.items()}
    if len(set(patches.values())) > 1:
        raise ConfigError(f"--runs: the models were trained on different patch sizes {patches}; SVCCA compares "
                          "activations of the same probe images, so both need the same input size")
    for label, m in models.items():
        if m.cfg.model.in_channels != 1 or m.cfg.model.slice_context:
            channels = m.cfg.model.in_channels * (1 + 2 * m.cfg.model.slice_context)
            raise ConfigError(f"--runs {label}: {m.backbone} takes {channels} input channels; "
                              "probe slices have one")


def run_svcca(job: SVCCAJob, opts: Any, progress: Optional[Any] = None,
              log: Any = print) -> Tuple[List[Any], Optional[Any], Dict[str, Any]]:
    """Compute the training curves (run folders) and the heatmap (two runs).

    Args:
        job: Runs, layers and probe settings.
        opts: `robustseg.analysis.svcca.SVCCAOptions`.
        progress: tqdm-like factory over checkpoints.
        log: Where one-line notes go.

    Returns:
        ``(curves, pair, info)``: `TrainingCurve` per run with a timeline, a `PairSimilarity`
        or None, and JSON-ready details (runs, layers, probe, options).

    Raises:
        ConfigError: nothing to compare, unknown layers, models that cannot share a probe.
    """
    from dataclasses import asdict

    import torch

    from robustseg.analysis.svcca_activations import LayerSpace, capture_activations, similarity_matrix
    from robustseg.analysis.svcca_outputs import PairSimilarity

    if not 1 <= len(job.runs) <= 2:
        raise ConfigError(f"--runs takes one or two runs, got {len(job.runs)}")
    if len(job.runs) == 1 and not job.runs[0].timeline:
        raise ConfigError(f"--runs {job.runs[0].path}: a single checkpoint has nothing to compare with; give a run "
                          "folder (snapshots/, last.pt) to follow its training, or two runs to compare")
    device = job.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refs = {r.label: load_model(r.reference, device) for r in job.runs}
    _check_probe_fits(refs)
    first = refs[job.runs[0].label]
    probe_uri = job.probe or first.cfg.data.shards_uri
    images, probe_info = load_probe(probe_uri, job.fold, job.max_slices, first.patch_size,
                                    storage=first.cfg.data.storage)
    layers = {label: _layers_for(m, images[:1].to(device), job.layers, label) for label, m in refs.items()}
    spaces = {label: LayerSpace(capture_activations(m.model, images, layers[label], max_grid=opts.max_grid,
                                                    batch_size=job.batch_size, device=device), opts)
              for label, m in refs.items()}
    curves = []
    for run in job.runs:
        if run.timeline:
            curves.append(_training_curve(run, refs[run.label], spaces[run.label], layers[run.label], images,
                                          job, opts, device, progress))
    pair = None
    if len(job.runs) == 2:
        a, b = (r.label for r in job.runs)
        log(f"svcca: heatmap {a} ({len(layers[a])} layers) x {b} ({len(layers[b])} layers)")
        matrix = similarity_matrix(spaces[a], spaces[b], layers[a], layers[b], progress=progress)
        pair = PairSimilarity(a, b, layers[a], layers[b], matrix)
    info = {"runs": {r.label: {"path": str(r.path), "reference": str(r.reference), "backbone": refs[r.label].backbone,
                               "reference_epoch": refs[r.label].epoch, "timeline": [str(p) for p in r.timeline]}
                     for r in job.runs},
            "layers": layers, "probe": probe_info, "options": asdict(opts)}
    return curves, pair, info


def _training_curve(run: RunSpec, ref: LoadedModel, ref_space: Any, layers: List[str], images: torch.Tensor,
                    job: SVCCAJob, opts: Any, device: torch.device, progress: Optional[Any]) -> Any:
    """One run's checkpoints, each loaded, captured and compared with the converged model, then freed."""
    import numpy as np

    from robustseg.analysis.svcca_activations import LayerSpace, capture_activations, layer_similarity
    from robustseg.analysis.svcca_outputs import TrainingCurve

    curve = TrainingCurve(run.label, str(run.reference), ref.epoch)
    seen: set = set()
    steps = progress(run.timeline, desc=f"svcca {run.label}", unit="ckpt") if progress else run.timeline
    for path in steps:
        loaded = load_model(path, device)
        epoch = loaded.epoch if loaded.epoch is not None else len(curve.epochs) + 1
        if epoch in seen:  # last.pt of an epoch that also has a snapshot
            continue
        seen.add(epoch)
        if loaded.backbone != ref.backbone:
            raise ConfigError(f"{path}: a {loaded.backbone} checkpoint in a {ref.backbone} run")
        acts = capture_activations(loaded.model, images, layers, max_grid=opts.max_grid,
                                   batch_size=job.batch_size, device=device)
        curve.add(epoch, str(path), layer_similarity(LayerSpace(acts, opts), ref_space, layers))
    order = np.argsort(curve.epochs, kind="stable")  # snapshots are sorted; last.pt may predate them
    curve.epochs = [curve.epochs[i] for i in order]
    curve.checkpoints = [curve.checkpoints[i] for i in order]
    curve.similarity = {k: [v[i] for i in order] for k, v in curve.similarity.items()}
    curve.dims = {k: [v[i] for i in order] for k, v in curve.dims.items()}
    return curve


# --------------------------------------------------------------------------- MLflow
def metric_key(*parts: str) -> str:
    """An MLflow metric name from parts (``svcca``, a layer, a run label): unsafe characters -> ``-``."""
    return "_".join(re.sub(r"[^\w\-.]", "-", p).strip("-") for p in parts if p)


def mlflow_metrics(curves: Sequence[Any], pair: Optional[Any]) -> List[Tuple[str, float, int]]:
    """``(key, value, step)`` triples to log.

    * ``svcca_<layer>``: every timeline point, step = epoch, so the run's latest value is the
      final checkpoint's similarity and MLflow draws the curve; with two timelines the key
      ends in ``_<run>``;
    * ``svcca_pair_<layer>``: the two converged models, layers both have (the heatmap's
      matching entries), step 0.
    """
    out: List[Tuple[str, float, int]] = []
    for c in curves:
        suffix = c.run if len(curves) > 1 else ""
        for layer, values in c.similarity.items():
            out += [(metric_key("svcca", layer, suffix), float(v), int(e)) for e, v in zip(c.epochs, values)]
    if pair is not None:
        out += [(metric_key("svcca_pair", layer), v, 0) for layer, v in pair.matched().items()]
    return [t for t in out if math.isfinite(t[1])]


def log_to_mlflow(curves: Sequence[Any], pair: Optional[Any], files: Mapping[str, Path], *, tracking_uri: str,
                  experiment: str = "analysis", run_name: str = "svcca",
                  params: Optional[Mapping[str, Any]] = None) -> str:
    """Record the analysis as one MLflow run (``robustseg.role=svcca``): params, `mlflow_metrics`, files.

    Uses an `MlflowClient` bound to ``tracking_uri``: nothing process-wide is changed. A
    local SQLite store keeps the artifacts beside the database. A failure marks the run FAILED.

    Returns:
        The run id.
    """
    from robustseg.tracking_runs import analysis_run, log_metrics_batched

    with analysis_run(tracking_uri, experiment, run_name, ROLE, params=params) as (client, run_id):
        log_metrics_batched(client, run_id, mlflow_metrics(curves, pair))
        for p in files.values():
            client.log_artifact(run_id, str(p), "svcca")
    return run_id


# --------------------------------------------------------------------------- printing and the command
def _columns(epochs: Sequence[int], at_most: int = 6) -> List[int]:
    """Indices of at most ``at_most`` epochs, evenly spaced, first and last included."""
    import numpy as np

    if len(epochs) <= at_most:
        return list(range(len(epochs)))
    return sorted(set(np.linspace(0, len(epochs) - 1, at_most).round().astype(int).tolist()))


def curve_table(curve: Any) -> List[Dict[str, Any]]:
    """Printable rows: one per layer, one column per (sampled) checkpoint epoch."""
    cols = _columns(curve.epochs)
    return [{"layer": layer, **{f"ep{curve.epochs[i]}": f"{values[i]:.3f}" for i in cols}}
            for layer, values in curve.similarity.items()]


def pair_table(pair: Any) -> List[Dict[str, Any]]:
    """Printable rows: each layer of A, its same-name similarity in B and its best match in B."""
    import numpy as np

    matched = pair.matched()
    rows = []
    for i, layer in enumerate(pair.layers_a):
        j = int(np.argmax(pair.matrix[i]))
        rows.append({"layer": layer, "same layer": f"{matched[layer]:.3f}" if layer in matched else "-",
                     "best match": pair.layers_b[j], "value": f"{pair.matrix[i, j]:.3f}"})
    return rows


__all__ = ["LoadedModel", "RunSpec", "SVCCAJob", "choose_slices", "curve_table", "fit_to_patch", "load_model",
           "load_probe", "log_to_mlflow", "metric_key", "mlflow_metrics", "pair_table", "resolve_run", "run_label",
           "run_svcca"]
