"""Driver for one (backbone, regime, fold, hyperparameters) training run on Ray Train.

`build_trainer` turns an `ExperimentConfig` into a `TorchTrainer`: scaling from
``cfg.scaling`` (gloo on CPU, NCCL on GPU), a Ray Data stream of the training folds (all but
``data.val_fold``, labelled slices only), checkpoints under ``<storage_path>/<run_name>`` and
``FailureConfig(max_failures=cfg.scaling.max_failures)`` so a killed worker resumes from the
last reported epoch. `run_fold` fits it and returns a small summary dict for sweeps.

Storage (`robustseg.durable`): ``storage_path`` is a local folder or a complete URI. An S3 URI
is reached with ``cfg.data.storage`` (endpoint, credentials), and Ray gets that filesystem with
the path without its scheme; the summary's checkpoint is a complete ``s3://`` URI again, so any
node (and `history_of`, `trainables.ensemble_build.fetch_best`) can open it.

Resuming in Ray 2.60 (Train V2). ``TorchTrainer.restore`` and ``TorchTrainer.can_restore``
are deprecated stubs that raise ``DeprecationWarning``. V2 resumes by name instead: a new
trainer with the same ``RunConfig(name, storage_path)`` loads the run's
``checkpoint_manager_snapshot.json`` and hands the latest reported checkpoint to the workers
through ``ray.train.get_checkpoint()``; the worker copies it back and the fit loop continues
at the next epoch. Within one ``fit()`` the same happens after each worker failure, up to
``max_failures`` times. `run_fold` returns a run that reached its last epoch as stored,
without starting workers (`stored_result` reads it with ``ray.train.Result.from_path``).
`can_resume` checks for the snapshot; ``run_fold(resume=False)`` refuses to reuse a run folder
that has one, so nothing is silently continued or overwritten.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from robustseg import durable
from robustseg.config import ExperimentConfig, StorageConfig
from robustseg.errors import ConfigError

log = logging.getLogger(__name__)

#: Ray Train V2 keeps the run's checkpoint list in this file under ``<storage>/<run name>``.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def storage_uri(storage_path: str) -> str:
    """An absolute local path or a URI as-is: Ray workers run in other directories."""
    return durable.absolute(storage_path)


def _ray_storage(storage_path: str, storage_filesystem: Any, storage: Optional[StorageConfig]) -> Tuple[str, Any]:
    """``(path, filesystem)`` as Ray takes them: a given filesystem as-is (``storage_path`` is a
    path in it), else `robustseg.durable.ray_storage` (S3 from ``storage``, local as a plain path)."""
    if storage_filesystem is not None:
        return str(storage_path), storage_filesystem
    return durable.ray_storage(storage_uri(storage_path), storage)


def can_resume(storage_path: str, run_name: str, storage_filesystem: Any = None,
               storage: Optional[StorageConfig] = None) -> bool:
    """Whether ``<storage_path>/<run_name>`` holds a Ray Train run with reported checkpoints.

    Args:
        storage_path: The run's storage (local path or URI such as ``s3://bucket/prefix``).
        run_name: The ``RunConfig.name`` of the run.
        storage_filesystem: A custom pyarrow filesystem (then ``storage_path`` is a path in it).
        storage: S3 endpoint and credentials for a URI (``data.storage``).
    """
    import pyarrow.fs as pafs

    root, fs = _ray_storage(storage_path, storage_filesystem, storage)
    fs = fs or pafs.LocalFileSystem()
    info = fs.get_file_info(f"{root.rstrip('/')}/{run_name}/{SNAPSHOT}")
    return info.type == pafs.FileType.File


def worker_cache(cfg: ExperimentConfig, rows: int, layout: Any) -> bool:
    """Whether each Train worker reads its share of the slices once and samples it in memory.

    Small data, the platform's usual case, fits: a few thousand slices decode to tens of MiB.
    Streaming them again on every pass would start Ray Data tasks each time (on 2 cores a
    fold of the demo spent more time in them than in training) and would crop uniformly,
    while the in-memory batcher samples exactly as `robustseg train` does.

    Args:
        cfg: The experiment (``data.worker_cache_mb``, ``scaling.num_workers``).
        rows: Training slices of the fold, all workers together.
        layout: The shards' `SliceLayout` (slice height and width).
    """
    per_worker = -(-int(rows) // max(1, cfg.scaling.num_workers))
    mib = per_worker * layout.height * layout.width * 5 / 2**20  # float32 image + uint8 label
    return 0 < mib <= cfg.data.worker_cache_mb


def build_trainer(cfg: ExperimentConfig, *, storage_path: str, run_name: str, mlflow: Optional[Dict[str, Any]] = None,
                  callbacks: Sequence[Any] = (), worker_callbacks: Sequence[Callable[..., None]] = (),
                  storage_filesystem: Any = None, shuffle_buffer: Optional[int] = None) -> "TorchTrainer":  # noqa: F821
    """A `TorchTrainer` for one fold of ``cfg`` (the data is prepared first if needed).

    Args:
        cfg: The experiment; ``data.val_fold`` is held out, ``scaling`` sizes the workers.
        storage_path: Where Ray persists checkpoints (local path or URI, e.g. ``s3://...``; an S3
            URI is reached with ``cfg.data.storage``, and Ray gets that filesystem).
        run_name: The run's folder under ``storage_path``; the same name resumes the run.
        mlflow: ``robustseg.tracking.FitTracker`` keyword arguments (tracking_uri, experiment,
            run_name, parent_run_id, tags) for rank 0, or None for no tracking.
        callbacks: Ray Train ``RunConfig`` callbacks (e.g. Tune's ``TuneReportCallback``).
        worker_callbacks: Picklable per-epoch callbacks run in every worker before the report
            (e.g. `trainables.train_worker.FailOnce`).
        storage_filesystem: A custom pyarrow filesystem for ``storage_path`` (then a path in it).
        shuffle_buffer: Rows in each worker's local shuffle buffer (default: streaming's).

    Raises:
        ConfigError: ``data.val_fold`` is not a fold of the data, or the training folds hold
            fewer labelled slices than one batch per worker.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from robustseg.data.streaming import TRAIN_COLUMNS, acceptance_rates, slice_dataset, training_rows
    from robustseg.engine.train import ensure_prepared, regime_data
    from trainables.train_worker import train_loop_per_worker

    manifest = ensure_prepared(cfg)
    k = int(manifest.folds["k"])
    if not 0 <= cfg.data.val_fold < k:
        raise ConfigError(f"data.val_fold={cfg.data.val_fold} but {manifest.uri} has {k} folds")
    sc = cfg.scaling
    # Self-supervised regimes (data="images") learn from every slice, labelled or not.
    labelled_only = regime_data(cfg.regime.name) != "images"
    counts = training_rows(manifest, [cfg.data.val_fold], labelled_only)
    rows = sum(counts.values())
    if rows < cfg.optim.batch_size * sc.num_workers:
        raise ConfigError(f"{manifest.uri}: {rows} {'labelled ' if labelled_only else ''}training slices outside fold "
                          f"{cfg.data.val_fold}, fewer than batch_size x num_workers = "
                          f"{cfg.optim.batch_size} x {sc.num_workers}")
    weights = cfg.data.sampling_weights
    cache = worker_cache(cfg, rows, manifest.layout)
    extra = ("case_id", "dataset") if cache else (("dataset",) if weights else ())
    dataset = slice_dataset(cfg.data, manifest, exclude_folds=[cfg.data.val_fold], labelled_only=labelled_only,
                            columns=TRAIN_COLUMNS + extra, shuffle_seed=cfg.optim.seed)
    resources: Dict[str, float] = {**{k: float(v) for k, v in sc.resources_per_worker.items()},
                                   "CPU": float(sc.cpus_per_worker)}
    if sc.use_gpu:
        resources["GPU"] = float(sc.gpus_per_worker)
    loop_config: Dict[str, Any] = {"experiment": cfg.to_dict(), "layout": manifest.layout.to_dict(),
                                   "mlflow": mlflow, "callbacks": list(worker_callbacks), "cache": cache}
    if shuffle_buffer is not None:
        loop_config["shuffle_buffer"] = int(shuffle_buffer)
    ray_path, ray_fs = _ray_storage(storage_path, storage_filesystem, cfg.data.storage)
    if weights:
        accept = acceptance_rates(counts, weights)  # checks the names here, on the driver, in both modes
        if not cache:  # the in-memory batcher weighs datasets itself
            loop_config["dataset_accept"] = accept
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=FailureConfig(max_failures=sc.max_failures),
            # Every checkpoint folder holds last.pt and best.pt: two keep a fallback, not a history.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks) or None,
        ),
        datasets={"train": dataset},
    )


def run_fold(cfg: ExperimentConfig, *, storage_path: str, run_name: str, mlflow: Optional[Dict[str, Any]] = None,
             resume: bool = True, callbacks: Sequence[Any] = (), worker_callbacks: Sequence[Callable[..., None]] = (),
             storage_filesystem: Any = None) -> Dict[str, Any]:
    """Train one fold on Ray Train and summarise it.

    Args:
        cfg: The experiment (see `build_trainer`).
        storage_path: Where Ray persists the run (local path or URI).
        run_name: The run's folder name; an existing run of that name is continued.
        mlflow: FitTracker keyword arguments for rank 0, or None.
        resume: Continue an interrupted (or return a finished) run of the same name; False
            refuses to start when the folder already holds a run.
        callbacks: Ray Train ``RunConfig`` callbacks.
        worker_callbacks: Per-epoch callbacks run in every worker (see `build_trainer`).
        storage_filesystem: A custom pyarrow filesystem for ``storage_path``.

    Returns:
        ``{"val_dice": best validation Dice, "best_epoch", "metrics": the last reported
        metrics, "checkpoint": path of the latest checkpoint folder (holding last.pt and
        best.pt) in the storage filesystem, "path": the run folder, "error": None or the
        failure message}``. A failed run (retries exhausted) is reported, not raised, with
        whatever checkpoint it left.

    Raises:
        FileExistsError: ``resume=False`` and the run folder already holds a run.
    """
    io = cfg.data.storage
    if not resume and can_resume(storage_path, run_name, storage_filesystem, io):
        raise FileExistsError(f"{storage_path}/{run_name} already holds a Ray Train run: pass resume=True to "
                              "continue it, or choose another run name")
    if resume:
        prior = stored_result(storage_path, run_name, storage_filesystem, io)
        # A run that reached its last epoch is returned as stored: starting workers only to
        # find nothing left to train costs a worker group start-up per fold on a resumed sweep.
        if prior is not None and float((prior.metrics or {}).get("epoch", 0)) >= cfg.optim.epochs:
            return summarise(prior)
    trainer = build_trainer(cfg, storage_path=storage_path, run_name=run_name, mlflow=mlflow, callbacks=callbacks,
                            worker_callbacks=worker_callbacks, storage_filesystem=storage_filesystem)
    error: Optional[str] = None
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError (retries exhausted) or a controller error
        error = f"{type(e).__name__}: {e}"
        if mlflow:
            _mark_failed(cfg, mlflow, e)
        try:
            result = stored_result(storage_path, run_name, storage_filesystem, io)
        except Exception:  # nothing usable persisted: the error says why
            result = None
    return summarise(result, error)


def _mark_failed(cfg: ExperimentConfig, mlflow: Dict[str, Any], exc: BaseException) -> None:
    """Mark the fold's MLflow run FAILED after Ray gave up on it (workers leave it RUNNING)."""
    try:
        from robustseg.tracking_fit import FitTracker

        FitTracker(cfg, **mlflow).fail(exc)  # re-attaches the unfinished run of that name
    except Exception as e:  # tracking trouble must not hide the training error
        log.warning("could not mark the MLflow run %s FAILED: %s", mlflow.get("run_name"), e)


def stored_result(storage_path: str, run_name: str, storage_filesystem: Any = None,
                  storage: Optional[StorageConfig] = None) -> Any:
    """The ``ray.train.Result`` persisted for a run (latest checkpoint and its metrics), or None.

    Args:
        storage_path: The run's storage (local path or URI).
        run_name: The run's name.
        storage_filesystem: A custom filesystem (then ``storage_path`` is a path in it).
        storage: S3 endpoint and credentials for a URI (``data.storage``).
    """
    from ray.train import Result

    if not can_resume(storage_path, run_name, storage_filesystem, storage):
        return None
    root, fs = _ray_storage(storage_path, storage_filesystem, storage)
    return Result.from_path(f"{root.rstrip('/')}/{run_name}", fs)


def summarise(result: Any, error: Optional[str] = None) -> Dict[str, Any]:
    """The `run_fold` summary of a Ray Train ``Result`` (or of none, for a run that failed early).

    ``checkpoint`` and ``path`` are complete: ``s3://bucket/...`` for S3 storage (Ray itself
    returns them without the scheme), a plain path for local storage.
    """
    metrics: Dict[str, Any] = dict(result.metrics or {}) if result is not None else {}
    best = metrics.get("best_val_dice", math.nan)
    ckpt = result.checkpoint if result is not None else None
    path = getattr(result, "path", None)
    fs = getattr(result, "filesystem", None)
    return {
        "val_dice": float(best) if best is not None else math.nan,
        "best_epoch": int(metrics.get("best_epoch", -1)),
        "metrics": metrics,
        "checkpoint": durable.uri_of(ckpt.filesystem, ckpt.path) if ckpt is not None else None,
        "path": durable.uri_of(fs, path) if path is not None and fs is not None else path,
        "error": error,
    }


def history_of(checkpoint_path: str, storage_filesystem: Any = None,
               storage: Optional[StorageConfig] = None) -> List[Dict[str, Any]]:
    """The epoch history stored in a run checkpoint folder (``history.json``).

    Args:
        checkpoint_path: ``run_fold(...)["checkpoint"]`` (a path or URI).
        storage_filesystem: The filesystem it lives in (then a path in it).
        storage: S3 endpoint and credentials for a URI (``data.storage``).
    """
    if storage_filesystem is not None:
        with storage_filesystem.open_input_stream(f"{checkpoint_path.rstrip('/')}/history.json") as f:
            return json.loads(f.read().decode())
    return durable.read_json(durable.join(checkpoint_path, "history.json"), storage)
