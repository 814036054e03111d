"""The Ray Train per-worker function: config in, the engine's fit loop, reports out.

Each worker rebuilds the `ExperimentConfig` from its dict, picks its device, reads its
share of the training folds from Ray Data and calls `robustseg.engine.train.train_from_config`
with three Ray hooks: DDP wrapping (``prepare_model``) when there are several ranks, rank-0-only
checkpoint files, and a per-epoch callback that reports to Ray Train.

Checkpoint protocol: every rank works in a private local (scratch) folder, deleted at the end. Rank 0's folder (``last.pt``,
``best.pt``, ``history.json``) is reported as the Ray checkpoint after every epoch; the other
ranks report metrics only, the same number of times (Ray Train needs one report per rank per
epoch). After a failure Ray restarts the workers and ``ray.train.get_checkpoint()`` returns the
latest reported checkpoint: every rank copies it into its folder and the fit loop resumes from
``last.pt`` at the next epoch, with the optimiser, scheduler and RNG state of that epoch.
MLflow (rank 0) records the reported copies by their complete storage URI (``last_checkpoint``)
and gets the best weights as the run artifact ``checkpoints/best.pt`` (``best_checkpoint`` =
``runs:/<run id>/checkpoints/best.pt``): nothing recorded points into the scratch folder.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from robustseg.config import ExperimentConfig
from robustseg.data.shards import SliceLayout
from trainables.ray_session import HEALTH_CHECK_INTERVAL_ENV

log = logging.getLogger(__name__)

#: Files of a robustseg checkpoint folder (what a restore copies back).
CHECKPOINT_FILES = ("last.pt", "best.pt", "history.json")
#: How long a failing attempt waits for its queued MLflow epochs before Ray restarts it.
FLUSH_ON_ERROR_S = 15.0


def restore_into(checkpoint: Any, out_dir: Path, files: Sequence[str] = CHECKPOINT_FILES) -> List[Dict[str, Any]]:
    """Copy a Ray checkpoint's files into ``out_dir`` so the fit loop resumes from them.

    Args:
        checkpoint: A ``ray.train.Checkpoint`` (local or remote storage) or None.
        out_dir: The worker's local run folder.
        files: Which files to copy (the ones present are copied).

    Returns:
        The restored history (empty without a checkpoint).
    """
    if checkpoint is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        for name in files:
            src = Path(d) / name
            if src.exists():
                shutil.copy2(src, out_dir / name)
    hist = out_dir / "history.json"
    return json.loads(hist.read_text()) if hist.exists() else []


def best_of(history: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Best validation Dice so far and its epoch (first maximum, as the fit loop keeps it)."""
    best, epoch = -math.inf, -1
    for h in history:
        v = h.get("val_dice")
        if v is not None and not math.isnan(float(v)) and float(v) > best:
            best, epoch = float(v), int(h["epoch"])
    return {"best_val_dice": best if epoch > 0 else math.nan, "best_epoch": float(epoch)}


class RayReporter:
    """Per-epoch callback: ``ray.train.report`` on every rank, the checkpoint from rank 0 only.

    Metrics are made plain floats and extended with the running best (``best_val_dice``,
    ``best_epoch``) and ``resumed_from`` (the epoch this attempt restored, 0 for a fresh
    start), so a driver or Tune sees the objective and the restart history without reading
    any file.

    Args:
        rank: World rank.
        out_dir: The rank's local run folder (rank 0's is the checkpoint).
        history: History restored from the checkpoint (empty for a fresh start).
    """

    def __init__(self, rank: int, out_dir: Path, history: Sequence[Dict[str, Any]] = (),
                 tags: Optional[Dict[str, str]] = None) -> None:
        self.rank, self.out_dir = rank, out_dir
        self.history = [dict(h) for h in history]
        self.resumed_from = float(self.history[-1]["epoch"]) if self.history else 0.0
        self.tags = dict(tags or {}, rank=str(rank))
        self._gauge = None

    def _export_throughput(self, slices_per_s: float) -> None:
        """Prometheus gauge ``ray_robustseg_train_slices_per_second`` (the Grafana dashboards'
        throughput panels); metrics export problems never stop training."""
        try:
            if self._gauge is None:
                from ray.util.metrics import Gauge

                self._gauge = Gauge("robustseg_train_slices_per_second", "Training slices per second per rank",
                                    tag_keys=tuple(self.tags))
            self._gauge.set(slices_per_s, tags=self.tags)
        except Exception:  # noqa: BLE001 - telemetry is best effort
            pass

    def __call__(self, epoch: int, metrics: Dict[str, Any], last_path: Path) -> None:
        import ray.train
        from ray.train import Checkpoint

        self.history.append(dict(metrics))
        out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        out.update(best_of(self.history), epoch=float(epoch), resumed_from=self.resumed_from)
        if "slices_per_s" in out:
            self._export_throughput(out["slices_per_s"])
        ckpt = Checkpoint.from_directory(str(self.out_dir)) if self.rank == 0 else None
        ray.train.report(out, checkpoint=ckpt)


class FailOnce:
    """Failure drill: kill this worker once at the end of epoch ``epoch``, before its report.

    A marker file records that the drill fired, so the restarted attempt trains on. Used by
    the tests and handy on a real cluster to check that a run resumes (``max_failures >= 1``).

    Ray Train collects a worker's report when the controller next polls it (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default); a process that dies before that
    poll loses its last report and resumes one checkpoint earlier (from scratch after epoch
    1). The drill runs before the reporter and first waits ``settle_s`` so the previous
    epoch's report has certainly been collected: it tests resuming, not that race.

    Args:
        epoch: Epoch after whose training the worker dies (>= 2 to resume from a checkpoint).
        marker: File created when the drill fires (must be visible to every attempt).
        hard: ``os._exit`` (a killed process) rather than raising an exception.
        rank: Only this rank dies.
        settle_s: Wait before dying (default: two poll intervals plus 0.5 s).
    """

    def __init__(self, epoch: int, marker: str, hard: bool = True, rank: int = 0,
                 settle_s: Optional[float] = None) -> None:
        self.epoch, self.marker, self.hard, self.rank = int(epoch), str(marker), hard, int(rank)
        self.settle_s = settle_s

    def __call__(self, epoch: int, metrics: Dict[str, Any], last_path: Path) -> None:
        import ray.train

        if epoch != self.epoch or ray.train.get_context().get_world_rank() != self.rank:
            return
        if os.path.exists(self.marker):
            return
        poll = float(os.environ.get(HEALTH_CHECK_INTERVAL_ENV, "2.0"))
        time.sleep(self.settle_s if self.settle_s is not None else 2 * poll + 0.5)
        Path(self.marker).write_text(f"killed after epoch {epoch} at {time.time()}\n")
        if self.hard:
            os._exit(1)
        raise RuntimeError(f"failure drill: worker stopped after epoch {epoch}")


def _tracker(cfg: ExperimentConfig, mlflow: Optional[Dict[str, Any]]) -> Any:
    """Rank 0's MLflow tracker, or None when tracking is off or unavailable."""
    if not mlflow:
        return None
    try:
        from robustseg.tracking_fit import FitTracker
    except ImportError as e:  # tracking is optional for a training run
        log.warning("MLflow tracking requested but robustseg.tracking is unavailable: %s", e)
        return None
    return FitTracker(cfg, **mlflow)


def _node_ip() -> str:
    """This node's address as Ray knows it (the tracker's ``robustseg.node_ip``)."""
    try:
        import ray.util

        return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - a label, never a reason to stop
        return "unknown"


def _persisted(local: Optional[Path]) -> Optional[str]:
    """The complete URI of the just-reported copy of a checkpoint file in the run's storage.

    ``s3://bucket/.../checkpoint_<n>/last.pt`` for S3 (Ray's own path lacks the scheme when it
    was given a filesystem), a plain path for local storage: what any node can open. Without a
    reported checkpoint the local path itself (scratch: the tracker does not record it).
    """
    import ray.train

    from robustseg import durable

    if local is None:
        return None
    ckpt = ray.train.get_checkpoint()  # the latest checkpoint this worker reported or restored
    if ckpt is None:
        return str(local)
    return durable.join(durable.uri_of(ckpt.filesystem, ckpt.path), Path(local).name)


def _ddp(model: Any) -> Any:
    """DDP through Ray; unused parameters allowed.

    Some parameters get no gradient in a step: the lowest-resolution deep-supervision head has
    loss weight 0 (nnU-Net), and regimes may skip heads. Plain DDP then fails on the next step.
    """
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def cached_batches(shard: Any, layout: SliceLayout, cfg: ExperimentConfig, device: Any, generator: Any,
                   patch: Sequence[int]) -> Any:
    """Read this worker's share of the training slices once; sample batches from memory.

    The batches are `robustseg train`'s (`SliceBatcher`: foreground oversampling, source
    patches for the augmenter, dataset weights), drawn from the fit loop's generator, so a
    resumed fold continues the same draws.

    Args:
        shard: ``ray.train.get_dataset_shard("train")`` streamed with ``case_id`` and ``dataset``.
        layout: The shard layout.
        cfg: The experiment.
        device: Where the slices live (the training device).
        generator: The fit loop's generator.
        patch: The training patch.
    """
    import pyarrow as pa
    import torch

    from robustseg.data.streaming import decode_batch
    from robustseg.engine.data import SliceBatcher, SliceSet
    from robustseg.engine.train import regime_data, source_margin

    table = pa.concat_tables(list(shard.iter_batches(batch_size=1024, batch_format="pyarrow")))
    arrays = decode_batch(table, layout)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    images = torch.from_numpy(arrays["image"]).to(device=device, dtype=dtype)
    labels = torch.from_numpy(arrays["label"]).to(device)
    case_ids = table.column("case_id").to_pylist()
    meta = {c: {"dataset": d} for c, d in zip(case_ids, table.column("dataset").to_pylist())}
    n = len(case_ids)
    # The stream holds labelled rows only, unless the regime learns from every slice.
    rows = "all" if regime_data(cfg.regime.name) == "images" else "labelled"
    data = SliceSet(images=images, labels=labels, labelled=torch.ones(n, dtype=torch.bool, device=device),
                    foreground=labels.flatten(1).any(1), case_ids=case_ids,
                    slice_index=torch.arange(n, device=device), meta=meta)
    log.info("cached %d training slices (%.0f MiB) in memory", n, (images.nbytes + labels.nbytes) / 2**20)
    return SliceBatcher(data, cfg.optim.batch_size, patch, generator, fg_fraction=cfg.data.fg_fraction,
                        dataset_weights=cfg.data.sampling_weights or None, rows=rows,
                        margin=source_margin(cfg, rows, patch))


def train_loop_per_worker(config: Dict[str, Any]) -> Dict[str, Any]:
    """Train one fold on this Ray Train worker.

    Args:
        config: ``{"experiment": ExperimentConfig.to_dict(), "layout": SliceLayout dict or None,
            "mlflow": FitTracker kwargs or None, "callbacks": extra per-epoch callbacks (run
            before the report, e.g. `FailOnce`), "shuffle_buffer": local shuffle rows,
            "cache": read the shard once and sample in memory (`cached_batches`)}``.

    Returns:
        Rank 0's summary (best score and epoch, epochs run); Ray keeps it as the result's
        ``return_value``.
    """
    import ray.train
    import ray.train.torch

    from robustseg.data.streaming import DEFAULT_SHUFFLE_BUFFER, RayDataBatches
    from robustseg.engine.train import train_from_config

    cfg = ExperimentConfig.from_dict(config["experiment"])
    # The tracker retries in the background itself; MLflow's own default (7 retries with
    # exponential backoff, minutes per call) would only delay metrics after a server outage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)

    out_dir = Path(tempfile.mkdtemp(prefix=f"robustseg-{cfg.name}-rank{rank}-"))
    # Rank 0 needs the whole folder (best.pt survives a restart); other ranks only last.pt.
    history = restore_into(ray.train.get_checkpoint(), out_dir, CHECKPOINT_FILES if rank == 0 else ("last.pt",))
    if history:
        log.info("rank %d resumes after epoch %s", rank, history[-1]["epoch"])

    layout = SliceLayout(**config["layout"]) if config.get("layout") else None
    if layout is None:
        from robustseg.data.manifest import read_manifest
        from robustseg.data.storage import open_store

        layout = read_manifest(open_store(cfg.data.shards_uri, cfg.data.storage)).layout
    shard = ray.train.get_dataset_shard("train")
    shuffle = config.get("shuffle_buffer", DEFAULT_SHUFFLE_BUFFER)

    def batches(generator: Any, patch: Sequence[int]) -> Any:
        if config.get("cache"):
            return cached_batches(shard, layout, cfg, device, generator, patch)
        return RayDataBatches(shard, layout, cfg.optim.batch_size, device, patch_size=patch, generator=generator,
                              local_shuffle_buffer_size=shuffle, seed=cfg.optim.seed + rank,
                              accept=config.get("dataset_accept"))

    reporter = RayReporter(rank, out_dir, history, tags={
        "experiment": cfg.name, "backbone": cfg.model.name, "regime": cfg.regime.name,
        "fold": str(cfg.data.val_fold), "trial": str((config.get("mlflow") or {}).get("run_name", ""))})
    tracker = _tracker(cfg, config.get("mlflow")) if rank == 0 else None
    callbacks: List[Callable[..., None]] = list(config.get("callbacks") or []) + [reporter]
    if tracker is not None:
        # Which attempt this is, on which node, and where a restarted one resumed (sent in the background).
        tracker.note_attempt(_node_ip(), int(history[-1]["epoch"]) if history else None)
        callbacks.append(lambda epoch, metrics, path: tracker.on_epoch(epoch, metrics, _persisted(path)))
    try:
        result = train_from_config(
            cfg, out_dir=out_dir, device=device, resume=True, callbacks=callbacks, train_batches=batches,
            model_wrapper=_ddp if world > 1 else None, write_checkpoints=rank == 0, rank=rank)
        if tracker is not None:
            # The weights go to MLflow; the tag names the durable copy, never this scratch folder.
            tracker.finish(result, out_dir, last_checkpoint=_persisted(result.last_checkpoint))
    # Only Ctrl-C ends the MLflow run here. Other errors leave it RUNNING on purpose: Ray may
    # restart this worker, and the next attempt's FitTracker re-attaches the unfinished run. The
    # driver (`run_fold`) marks it FAILED once Ray gives up, which also covers a killed process.
    except KeyboardInterrupt as e:
        if tracker is not None:
            tracker.fail(e)
        raise
    except Exception:
        if tracker is not None:  # the epochs already trained reach the run before this attempt dies (bounded)
            tracker.flush(FLUSH_ON_ERROR_S)
        raise
    finally:
        # Every reported epoch is already in the run's storage: the local copy is scratch.
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"best_val_dice": float(result.best_score), "best_epoch": int(result.best_epoch),
            "epochs_run": int(result.epochs_run), "stopped_early": bool(result.stopped_early)}
