"""The fit loop: epochs of N iterations, whole-volume validation, checkpoints, early stopping.

Runs in a plain process on plain tensors (no Ray): Ray Train wraps it later through
``callbacks``. Every epoch writes ``last.pt`` (and ``best.pt`` on improvement) atomically, so
a killed run resumes from the last completed epoch with identical RNG state.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from robustseg.augment import build_augmenter
from robustseg.engine.averaging import WeightAverage, build_average
from robustseg.engine.precision import autocast_dtype
from robustseg.config import ExperimentConfig, from_dict
from robustseg.engine.checkpoint import (CheckpointError, load_checkpoint, load_model_state, restore_rng,
                                         rng_state, save_checkpoint, unwrap)
from robustseg.engine.init import apply_init, resolve_init
from robustseg.engine.losses import DiceCELoss
from robustseg.engine.optim import build_optimizer, build_scheduler
from robustseg.engine.validate import validate, write_validation_artifacts
from robustseg.models import build_model, size_multiple, spatial_dims
from robustseg.models.transfer import apply_finetune
from robustseg.regimes import StepContext
from robustseg.registry import REGIMES

log = logging.getLogger(__name__)

Callback = Callable[[int, Dict[str, float], Path], None]


@dataclass
class FitResult:
    """Outcome of `fit`."""

    best_score: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: List[Dict[str, float]] = field(default_factory=list)
    last_checkpoint: Optional[Path] = None
    best_checkpoint: Optional[Path] = None


def amp_dtype(cfg: ExperimentConfig, device: torch.device) -> Optional[torch.dtype]:
    """``optim.amp`` on ``device`` (`robustseg.engine.precision.autocast_dtype`): bf16 or None."""
    return autocast_dtype(cfg.optim.amp, device)


def _agree(stop: bool, device: torch.device) -> bool:
    """Rank 0's early-stopping decision, shared with every DDP rank.

    Ranks validate separately; if their scores ever differed (GPU nondeterminism), one rank
    stopping while the others wait in the next all-reduce would hang the job.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stop
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if stop else 0], device=on)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


@dataclass
class Progress:
    """Where a run stands between epochs (restored from ``last.pt`` on resume)."""

    start_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)


@dataclass
class Run:
    """Everything an epoch needs, built once by `fit` from the config (no behaviour of its own)."""

    cfg: ExperimentConfig
    device: torch.device
    dims: int
    model: torch.nn.Module  # as built (DDP-wrapped when a model_wrapper is given)
    run_model: torch.nn.Module  # what the regime steps (``torch.compile``'d when optim.compile)
    divisible: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    regime: Any
    amp: Optional[torch.dtype]
    average: Optional[WeightAverage] = None  # optim.average_from: the tail mean of the weights

    def scored_model(self) -> torch.nn.Module:
        """The network validated and kept as best.pt: a regime's eval_model (e.g. an EMA teacher), else the
        weight average once it holds any iterate, else the trained network."""
        eval_model = getattr(self.regime, "eval_model", None)
        if callable(eval_model):
            return eval_model()
        return self.average.module if self.average is not None and self.average.active else self.run_model

    @property
    def own_validation(self) -> bool:
        """Whether the regime scores epochs itself (``validate(val_cases)`` -> ``val_score``)."""
        return callable(getattr(self.regime, "validate", None))


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_resume(cfg: ExperimentConfig, model: torch.nn.Module, last_path: Path, device: torch.device,
                resume: bool) -> Optional[Dict[str, Any]]:
    """The checkpoint to resume from (its weights loaded into ``model``), or None for a fresh run.

    Raises:
        CheckpointError: the checkpoint's model config differs from ``cfg.model``.
    """
    if not (resume and last_path.exists()):
        return None
    ckpt = load_checkpoint(last_path, map_location=device)
    stored_model = ckpt["config"].get("model", {})
    if stored_model.get("name") == cfg.model.name and stored_model != dataclasses.asdict(cfg.model):
        raise CheckpointError(f"{last_path}: the model config differs from the checkpoint's "
                              f"({stored_model} vs {dataclasses.asdict(cfg.model)}); use another output folder")
    # Weights go in before any DDP wrapping, so every rank starts from the same state. With weight
    # averaging on, "model" holds the average (what is served) and "raw_model" the trained weights.
    load_model_state(model, ckpt.get("raw_model", ckpt["model"]), str(last_path), cfg.model.name, ckpt.get("backbone"))
    return ckpt


def initialise(cfg: ExperimentConfig, model: torch.nn.Module, resumed: bool) -> Any:
    """Transfer initialisation (``regime.init``) and freezing (``regime.finetune``); returns the init used or None."""
    init = resolve_init(cfg) if not resumed else None  # a resumed run's own state is newer than init
    if init is not None:
        apply_init(model, init, cfg)
        log.info("initialised from %s%s", init.where, f" ({len(init.skipped)} parameters left fresh)" if init.skipped else "")
    # Freezing is re-applied on resume (requires_grad is not stored); fresh layers only at the start.
    apply_finetune(model, cfg.model.name, cfg.regime.finetune, reinit=init is not None)
    return init


def build_optimisation(cfg: ExperimentConfig, model: torch.nn.Module, init: Any) -> Any:
    """Optimiser and scheduler; after a transfer init, its lr scale and optionally its optimiser state."""
    optim_cfg = cfg.optim if init is None else dataclasses.replace(cfg.optim, lr=cfg.optim.initial_lr * cfg.regime.init_lr_scale)
    optimizer = build_optimizer(optim_cfg, model.parameters())
    if init is not None and cfg.regime.init_optimizer == "checkpoint":
        if init.optimizer is None:
            raise CheckpointError(f"{init.where}: regime.init_optimizer=checkpoint, but the source holds no optimiser state")
        optimizer.load_state_dict(init.optimizer)
        for group in optimizer.param_groups:  # the schedule below starts from this run's lr
            group["lr"] = group["initial_lr"] = optim_cfg.initial_lr
    return optimizer, build_scheduler(optim_cfg, optimizer)


def build_regime(cfg: ExperimentConfig, run_model: torch.nn.Module, optimizer: torch.optim.Optimizer, dims: int,
                 generator: torch.Generator, device: torch.device, amp: Optional[torch.dtype],
                 unlabelled: Optional[Iterator[Dict[str, torch.Tensor]]],
                 patch_size: Optional[Sequence[int]] = None) -> Any:
    """The registered regime, set up on its step context (its augmenter cuts source patches to ``patch_size``)."""
    regime = REGIMES.get(cfg.regime.name)()
    params = from_dict(REGIMES.meta(cfg.regime.name)["params"], cfg.regime.params, f"regime.params ({cfg.regime.name})")
    # 2D batches may come as larger source patches (`engine.train.source_margin`); 3D slabs never do.
    augmenter = build_augmenter(cfg.augment, dims, cfg.data.plan, patch_size if dims == 2 else None,
                                slice_channels=cfg.model.slice_context > 0)
    ctx = StepContext(model=run_model, optimizer=optimizer, loss_fn=DiceCELoss(cfg.loss, cfg.model.num_classes),
                      augmenter=augmenter, generator=generator, device=device,
                      amp_dtype=amp, num_classes=cfg.model.num_classes, mixup_p=cfg.augment.mixup,
                      mixup_alpha=cfg.augment.mixup_alpha, unlabelled=unlabelled)
    regime.setup(ctx, params)
    return regime


def restore_progress(run: Run, ckpt: Optional[Dict[str, Any]], generator: torch.Generator) -> Progress:
    """Optimiser, scheduler, regime and RNG state from the resumed checkpoint; the run's progress."""
    if ckpt is None:
        return Progress()
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.regime.load_state_dict(ckpt.get("regime", {}))
    if run.average is not None and "average" in ckpt:
        run.average.load(ckpt["average"]["count"], ckpt["model"])
    restore_rng(ckpt["rng"], generator)
    return Progress(start_epoch=int(ckpt["epoch"]), best_score=ckpt["best"]["score"], best_epoch=ckpt["best"]["epoch"],
                    bad_epochs=int(ckpt["best"].get("bad_epochs", 0)), history=list(ckpt.get("history", [])))


def train_epoch(run: Run, train_batches: Iterator[Dict[str, torch.Tensor]], epoch: int,
                progress: Optional[Callable[..., Any]]) -> Dict[str, float]:
    """``optim.iters_per_epoch`` regime steps; the mean of each reported term and the timings."""
    cfg = run.cfg
    run.model.train()
    sums: Dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    steps = range(cfg.optim.iters_per_epoch)
    bar = progress(steps, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="it") if progress else steps
    for i in bar:
        parts = run.regime.train_step(next(train_batches))
        run.scheduler.step()
        if run.average is not None:
            run.average.update(run.model, epoch * cfg.optim.iters_per_epoch + i)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0) + v
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0
    n = cfg.optim.iters_per_epoch
    metrics: Dict[str, float] = {k: float(v) / n for k, v in sums.items()}
    metrics.update(epoch=epoch + 1, lr=run.optimizer.param_groups[0]["lr"], epoch_seconds=seconds,
                   slices_per_s=n * cfg.optim.batch_size / max(seconds, 1e-9))
    return metrics


def validate_epoch(run: Run, val_cases: Sequence[Mapping[str, Any]], metrics: Dict[str, float], state: Progress,
                   class_names: Mapping[int, str], patch_size: Sequence[int]) -> None:
    """Score the epoch (the regime's own score or whole-volume Dice) into ``metrics``; track the best."""
    if run.own_validation:
        metrics.update(run.regime.validate(val_cases))
        score = metrics["val_score"]
    else:
        metrics.update(validate(run.scored_model(), val_cases, spatial_dims=run.dims,
                                num_classes=run.cfg.model.num_classes, class_names=class_names, patch_size=patch_size,
                                cfg=run.cfg.inference, divisible_by=run.divisible, amp=run.amp is not None))
        score = metrics["val_dice"]
    if not math.isnan(score) and score > state.best_score:
        state.best_score, state.best_epoch, state.bad_epochs = score, int(metrics["epoch"]), 0
        metrics["is_best"] = 1.0
    else:
        state.bad_epochs += 1


def checkpoint_payload(run: Run, state: Progress, epoch: int, generator: torch.Generator, patch_size: Sequence[int],
                       spacing: Optional[Sequence[float]], class_names: Mapping[int, str],
                       extra_state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """What ``last.pt`` holds after ``epoch`` epochs: everything a bit-exact resume needs.

    ``model`` is always the weights to serve: the weight average once it is active, with the
    trained weights beside it as ``raw_model``.
    """
    trained = unwrap(run.model).state_dict()
    weights = ({"model": run.average.module.state_dict(), "raw_model": trained, "average": run.average.state_dict()}
               if run.average is not None and run.average.active else {"model": trained})
    return {
        "backbone": run.cfg.model.name, **weights, "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "regime": run.regime.state_dict(), "rng": rng_state(generator),
        "epoch": epoch, "best": {"score": state.best_score, "epoch": state.best_epoch, "bad_epochs": state.bad_epochs},
        "history": state.history, "config": run.cfg.to_dict(), "patch_size": list(patch_size),
        "spacing": None if spacing is None else list(spacing), "class_names": dict(class_names),
        **(extra_state or {}),
    }


def write_epoch(run: Run, payload: Dict[str, Any], metrics: Dict[str, float], out_dir: Path) -> None:
    """``last.pt``, ``best.pt`` on improvement, a snapshot every ``optim.snapshot_every`` epochs, ``history.json``."""
    epoch = int(payload["epoch"])
    save_checkpoint(out_dir / "last.pt", payload)
    if metrics.get("is_best"):
        scored = run.scored_model()
        save_checkpoint(out_dir / "best.pt", payload if scored is run.run_model else
                        {**payload, "model": unwrap(scored).state_dict()})
    if run.cfg.optim.snapshot_every and epoch % run.cfg.optim.snapshot_every == 0:
        slim = {k: v for k, v in payload.items() if k not in ("optimizer", "scheduler", "regime", "rng")}
        save_checkpoint(out_dir / "snapshots" / f"epoch_{epoch:04d}.pt", slim)
    (out_dir / "history.json").write_text(json.dumps(payload["history"], indent=1))


def finish(run: Run, val_cases: Sequence[Mapping[str, Any]], out_dir: Path, class_names: Mapping[int, str],
           patch_size: Sequence[int]) -> None:
    """Per-case Dice and overlays of the final model: the run's MLflow artifacts."""
    collected: List[Dict[str, Any]] = []
    validate(run.scored_model(), val_cases, spatial_dims=run.dims, num_classes=run.cfg.model.num_classes,
             class_names=class_names, patch_size=patch_size, cfg=run.cfg.inference, divisible_by=run.divisible,
             amp=run.amp is not None, collect=collected)
    write_validation_artifacts(collected, val_cases, out_dir, class_names=class_names)


def fit(cfg: ExperimentConfig, train_batches: Iterator[Dict[str, torch.Tensor]], val_cases: Sequence[Mapping[str, Any]],
        *, out_dir: Path, patch_size: Sequence[int], generator: torch.Generator, class_names: Mapping[int, str],
        spacing: Optional[Sequence[float]] = None, device: Optional[torch.device] = None,
        extra_state: Optional[Dict[str, Any]] = None, resume: bool = True,
        callbacks: Sequence[Callback] = (), progress: Optional[Callable[..., Any]] = None,
        model_wrapper: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
        write_checkpoints: bool = True, rank: int = 0,
        unlabelled: Optional[Iterator[Dict[str, torch.Tensor]]] = None) -> FitResult:
    """Train ``cfg.model`` with ``cfg.regime`` and keep the best checkpoint on validation Dice.

    Args:
        cfg: The experiment config (model, regime, optim, loss, augment, inference).
        train_batches: Infinite iterator of ``{"image", "label"}`` batches on ``device``.
        val_cases: Whole validation volumes (see `robustseg.engine.validate.validate`).
        out_dir: Where ``last.pt``, ``best.pt`` and ``history.json`` go.
        patch_size: Training patch (in-plane for 2D, (D, H, W) for 3D).
        generator: The device generator the batches and augmentation draw from.
        class_names: Class index -> structure name.
        spacing: Voxel spacing in patch axis order (for nnU-Net topology), if known.
        device: Training device (default: CUDA if available).
        extra_state: Stored in checkpoints as-is (plan, layout, manifest URI).
        resume: Continue from ``out_dir/last.pt`` when it exists.
        callbacks: Called after each epoch with (epoch, metrics, last checkpoint path).
        progress: tqdm-like factory for a per-epoch progress bar.
        model_wrapper: Wraps the model after it is on the device and weights are restored
            (Ray Train passes ``ray.train.torch.prepare_model`` for DDP).
        write_checkpoints: False on non-zero DDP ranks: only rank 0 writes files.
        rank: DDP rank. Ranks > 0 reseed the augmentation generator (deterministically from
            the seed, rank and start epoch) so ranks do not draw identical augmentations; the
            stored RNG state is rank 0's.
        unlabelled: Batches of unlabelled slices for ``data="semi"`` regimes (``ctx.unlabelled``).

    Regimes with a ``validate(val_cases)`` method score epochs themselves (``val_score``);
    ``optim.snapshot_every`` > 0 also keeps the weights of every N-th epoch under
    ``snapshots/`` (for SVCCA-style analyses of how layers converge).

    Returns:
        A `FitResult`.
    """
    device = device or default_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    model = build_model(cfg.model, patch_size, spacing).to(device)
    divisible = size_multiple(model)
    ckpt = load_resume(cfg, model, last_path, device, resume)
    init = initialise(cfg, model, resumed=ckpt is not None)
    if model_wrapper is not None:
        model = model_wrapper(model)
    optimizer, scheduler = build_optimisation(cfg, model, init)
    average = build_average(model, cfg.optim.average_from, cfg.optim.average_every,
                            cfg.optim.epochs * cfg.optim.iters_per_epoch)
    amp, dims = amp_dtype(cfg, device), spatial_dims(cfg.model.name)
    run_model = torch.compile(model) if cfg.optim.compile else model
    regime = build_regime(cfg, run_model, optimizer, dims, generator, device, amp, unlabelled, patch_size)
    run = Run(cfg=cfg, device=device, dims=dims, model=model, run_model=run_model, divisible=divisible,
              optimizer=optimizer, scheduler=scheduler, regime=regime, amp=amp, average=average)
    state = restore_progress(run, ckpt, generator)
    if rank > 0:
        generator.manual_seed(cfg.optim.seed * 1_000_003 + 7_919 * state.start_epoch + rank)

    stopped = False
    for epoch in range(state.start_epoch, cfg.optim.epochs):
        metrics = train_epoch(run, train_batches, epoch, progress)
        if val_cases and ((epoch + 1) % cfg.inference.val_every == 0 or epoch + 1 == cfg.optim.epochs):
            validate_epoch(run, val_cases, metrics, state, class_names, patch_size)
        state.history.append(metrics)
        if write_checkpoints:
            write_epoch(run, checkpoint_payload(run, state, epoch + 1, generator, patch_size, spacing, class_names,
                                                extra_state), metrics, out_dir)
        for cb in callbacks:
            cb(epoch + 1, metrics, last_path)
        if _agree(cfg.optim.patience is not None and state.bad_epochs >= cfg.optim.patience, device):
            stopped = True
            break
    if write_checkpoints and val_cases and not run.own_validation:
        finish(run, val_cases, out_dir, class_names, patch_size)
    return FitResult(best_score=state.best_score, best_epoch=state.best_epoch, epochs_run=len(state.history),
                     stopped_early=stopped, history=state.history,
                     last_checkpoint=last_path if last_path.exists() else None,
                     best_checkpoint=best_path if best_path.exists() else None)
