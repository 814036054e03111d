"""`train_from_config`: one model, one fold, from prepared shards, in a plain process.

This is what `robustseg train` runs and what the Ray Train worker will call: open the store,
decode the training folds and the validation fold onto the device, build the batcher, and
hand everything to `robustseg.engine.fit.fit`. If the store holds no manifest yet and the
config names sources, the data is prepared first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from robustseg.augment import build_augmenter
from robustseg.config import ExperimentConfig, absolute_workdir
from robustseg.data.manifest import MANIFEST, Manifest, read_manifest
from robustseg.data.storage import open_store
from robustseg.engine.data import SliceBatcher, SliceSet, VolumeBatcher, load_slice_set
from robustseg.engine.fit import FitResult, default_device, fit
from robustseg.errors import ConfigError
from robustseg.models import spatial_dims
from robustseg.registry import REGIMES


@dataclass
class TrainData:
    """Decoded folds of one training run."""

    manifest: Manifest
    train: SliceSet
    val: SliceSet


def ensure_prepared(cfg: ExperimentConfig, progress: Optional[Callable[..., Any]] = None) -> Manifest:
    """The store's manifest, preparing the configured sources first if there is none."""
    store = open_store(cfg.data.shards_uri, cfg.data.storage)
    if not store.exists(MANIFEST):
        if not cfg.data.sources:
            raise ConfigError(f"{store.uri}: no prepared data and no data.sources to prepare it from")
        from robustseg.data.prepare import prepare

        prepare(cfg.data, progress=progress) if progress else prepare(cfg.data)
    return read_manifest(store)


def load_train_data(cfg: ExperimentConfig, device: torch.device, manifest: Optional[Manifest] = None) -> TrainData:
    """Decode the training folds (all but ``data.val_fold``) and the validation fold."""
    store = open_store(cfg.data.shards_uri, cfg.data.storage)
    manifest = manifest or read_manifest(store)
    k = int(manifest.folds["k"])
    if not 0 <= cfg.data.val_fold < k:
        raise ConfigError(f"data.val_fold={cfg.data.val_fold} but {store.uri} has {k} folds")
    train = load_slice_set(store, manifest, exclude_folds=[cfg.data.val_fold], device=device)
    val = load_slice_set(store, manifest, folds=[cfg.data.val_fold], device=device)
    return TrainData(manifest, train, val)


def patch_for(cfg: ExperimentConfig, manifest: Manifest) -> Sequence[int]:
    """Training patch: ``inference.patch_size`` or the shard slice size (2D); 3D adds a slab depth."""
    hw = list(cfg.inference.patch_size or [manifest.layout.height, manifest.layout.width])[-2:]
    if spatial_dims(cfg.model.name) == 3:
        # 3D: inference.patch_size = [D, H, W]; without it a slab of 8 slices.
        ps = cfg.inference.patch_size
        return [int(ps[0]), int(hw[0]), int(hw[1])] if ps and len(ps) == 3 else [8, int(hw[0]), int(hw[1])]
    return [int(hw[0]), int(hw[1])]


def train_from_config(cfg: ExperimentConfig, *, out_dir: Optional[Path] = None, device: Optional[torch.device] = None,
                      resume: bool = True, callbacks: Sequence[Any] = (),
                      progress: Optional[Callable[..., Any]] = None,
                      train_batches: Optional[Callable[[torch.Generator, Sequence[int]], Any]] = None,
                      model_wrapper: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
                      write_checkpoints: bool = True, rank: int = 0) -> FitResult:
    """Train one model on one fold as configured.

    Args:
        cfg: Experiment config.
        out_dir: Checkpoint folder (default ``<workdir>/runs/<name>/fold<k>``).
        device: Training device (default CUDA if available).
        resume: Continue from ``out_dir/last.pt``.
        callbacks: Per-epoch callbacks (see `fit`).
        progress: tqdm-like factory.
        train_batches: ``factory(generator, patch) -> iterator`` of training batches on the
            device (Ray Data streaming); default: the in-memory `SliceBatcher`/`VolumeBatcher`.
        model_wrapper: See `fit` (DDP under Ray Train).
        write_checkpoints: See `fit` (False on non-zero ranks).
        rank: DDP rank (see `fit`).
    """
    device = device or default_device()
    manifest = ensure_prepared(cfg, progress)
    if cfg.model.num_classes != len(manifest.class_names):
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has "
                          f"{len(manifest.class_names)} classes ({manifest.class_names})")
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.optim.seed)
    torch.manual_seed(cfg.optim.seed)
    patch = patch_for(cfg, manifest)
    dims = spatial_dims(cfg.model.name)
    feed = regime_data(cfg.regime.name)
    unlabelled = None
    if train_batches is None:
        data = load_train_data(cfg, device, manifest)
        train, val = data.train, data.val
        rows = "all" if feed == "images" else "labelled"
        if dims == 3:
            if cfg.data.sampling_weights:
                raise ConfigError("data.sampling_weights applies to 2D (slice) training; 3D batches sample cases")
            batches = VolumeBatcher(train, cfg.optim.batch_size, patch, generator, fg_fraction=cfg.data.fg_fraction,
                                        rows=rows)
            if feed == "semi":
                unlabelled = VolumeBatcher(train, cfg.optim.batch_size, patch, generator, rows="unlabelled")
        else:
            weights = cfg.data.sampling_weights or None
            batches = SliceBatcher(train, cfg.optim.batch_size, patch, generator, fg_fraction=cfg.data.fg_fraction,
                                   dataset_weights=weights, rows=rows, margin=source_margin(cfg, rows, patch),
                                   context=cfg.model.slice_context, context_dropout=cfg.model.slice_context_dropout)
            if feed == "semi":
                unlabelled = SliceBatcher(train, cfg.optim.batch_size, patch, generator, rows="unlabelled",
                                          context=cfg.model.slice_context)
        spacing = _median_spacing(train, dims)
    else:
        if feed == "semi":
            raise ConfigError(f"regime {cfg.regime.name!r} needs labelled and unlabelled batches, which only the "
                              "in-memory batcher provides (`robustseg train`); the Ray Data stream feeds one set")
        if cfg.model.slice_context:
            raise ConfigError(f"model.slice_context={cfg.model.slice_context} needs each slice's neighbours, which "
                              "only the in-memory batcher gathers (`robustseg train`); the Ray Data stream feeds "
                              "single slices")
        store = open_store(cfg.data.shards_uri, cfg.data.storage)
        val = load_slice_set(store, manifest, folds=[cfg.data.val_fold], device=device)
        batches = train_batches(generator, patch)
        spacing = _median_spacing(val, dims)
    val_cases = [v for v in val.volumes() if v["has_label"]]
    if cfg.inference.val_max_cases is not None:
        val_cases = val_cases[: cfg.inference.val_max_cases]
    out = Path(out_dir) if out_dir else absolute_workdir(cfg) / "runs" / cfg.name / f"fold{cfg.data.val_fold}"
    extra = {"plan": manifest.plan, "layout": manifest.layout.to_dict(), "manifest_uri": manifest.uri,
             "task": manifest.task}
    return fit(cfg, batches, val_cases, out_dir=out, patch_size=patch, generator=generator,
               class_names={int(k): v for k, v in manifest.class_names.items()}, spacing=spacing, device=device,
               extra_state=extra, resume=resume, callbacks=callbacks, progress=progress,
               model_wrapper=model_wrapper, write_checkpoints=write_checkpoints, rank=rank, unlabelled=unlabelled)


def source_margin(cfg: ExperimentConfig, rows: str, patch: Sequence[int]) -> Sequence[int]:
    """In-plane margin of the 2D source patches (``augment.source_patch``), for labelled batches.

    Only a regime registered with ``source_patches=True`` gets them: it promises to pass every
    labelled batch through the augmenter (which cuts the patch back out). An unlabelled or
    self-supervised stream, or a regime that reads raw batches, gets plain patches.
    """
    if not cfg.augment.source_patch or rows != "labelled" or not REGIMES.meta(cfg.regime.name).get("source_patches"):
        return (0, 0)
    return build_augmenter(cfg.augment, 2, cfg.data.plan).source_margin(patch)


def regime_data(name: str) -> str:
    """What a regime's step is fed: ``labelled``, ``images`` or ``semi`` (see `robustseg.regimes`)."""
    import robustseg.regimes  # noqa: F401 (registers the regimes)

    feed = str(REGIMES.meta(name).get("data", "labelled"))
    if feed not in ("labelled", "images", "semi"):
        raise ConfigError(f"regime {name!r} registered with data={feed!r}; expected labelled, images or semi")
    return feed


def _median_spacing(data: SliceSet, dims: int) -> Optional[Sequence[float]]:
    """Median spacing in patch axis order ((y, x) or (z, y, x)) for topology derivation."""
    spacings = [m["spacing"] for m in data.meta.values()]
    if not spacings:
        return None
    sx, sy, sz = (sorted(s[i] for s in spacings)[len(spacings) // 2] for i in range(3))
    return (sz, sy, sx) if dims == 3 else (sy, sx)
