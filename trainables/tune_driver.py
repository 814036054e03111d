"""Ray Tune + Optuna over folds and hyperparameters: `run_sweep`.

Folds are part of the search design: a trial's objective (``cv_dice``) is the mean best
validation Dice over the ``data.folds`` subject-grouped folds, each fold one Ray Train run
(`trainables.train_fold.run_fold`), run in threads when ``fold_concurrency > 1``. The trial
function is `trainables.tune_trial.cv_objective` (re-exported here); the MLflow bookkeeping
of sweep and trial runs is `trainables.tune_tracking`.

How the pieces fit Ray 2.60 (checked against the installed source):

* ``OptunaSearch`` with a define-by-run space gets ``metric``/``mode`` itself (else it refuses
  to suggest); `TuneConfig` gets them again for the result grid and the scheduler, which is
  built without them (Tune raises when both carry them). Its suggestion is
  ``{**raw suggest_* values, **returned dict}``, unflattened on ``/``: `SpaceInTrialConfig`
  returns the space's point under ``sample/`` so the trial applies exactly that point, never
  the raw ``choice/...`` values.
* Intermediate results: one ``tune.report`` per fold, in fold order (a fold that finishes early
  waits for its predecessors), so ``training_iteration == folds done`` and ASHA compares every
  trial on the same folds at each rung. Each report carries a small checkpoint of the finished
  folds: a resumed trial skips them.
* Resume: ``Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
  restart_errored=False)`` reloads ``tuner.pkl`` (param space, TuneConfig, RunConfig, callbacks
  included) and the searcher state (Optuna study and the count of trials created), continues
  unfinished and errored trials from their last checkpoint and creates the remaining ones.
* Storage: `robustseg.durable.storage_uri` (``tracking.storage_uri``, ``--storage``). For S3,
  ``RunConfig``, ``Tuner.can_restore`` and ``Tuner.restore`` get the S3 filesystem built from
  ``data.storage`` (endpoint, credentials) with the path without its scheme, as Ray expects when
  a ``storage_filesystem`` is given; ``sweep.json``/``trials.json`` go through the same settings.
  Note that Tune pickles its ``RunConfig`` (filesystem included) into ``tuner.pkl``.
* The trial function holds only a sliver of CPU (``TRIAL_CPUS``) on the head node
  (``TRIAL_RESOURCES``): the TorchTrainer inside asks for its own workers, and Ray Data needs
  free CPUs or the stream stalls.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ray.tune import Callback

from robustseg import durable
from robustseg.config import ExperimentConfig, StorageConfig, absolute_workdir
from search_spaces import apply_sample, flatten_sample, get_space
from trainables.tune_tracking import Winner, open_sweep_tracking
from trainables.tune_trial import (FOLD_STORAGE, METRIC, MODE, SAMPLE_KEY, FoldFailedError, cv_objective,
                                   fold_columns, trial_config)

log = logging.getLogger(__name__)

TRIAL_CPUS = 0.01
#: Trials run on the head node. A fold's Train controller and its Ray Data split coordinator
#: live on the node of the trial that started it: on a worker node, losing that node would
#: fail the whole trial; on the head, it only costs the fold's workers, which Ray Train
#: restarts elsewhere from the last checkpoint. (Ray's built-in head-node resource.)
TRIAL_RESOURCES = {"CPU": TRIAL_CPUS, "node:__internal_head__": 0.001}
BEST_CONFIG = "best_config.yaml"
SWEEP_FILE = "sweep.json"
#: Per-trial status, score and sampled point (what `trainables.ensemble_build` selects from).
TRIALS_FILE = "trials.json"
FoldRunner = Callable[..., Dict[str, Any]]


class SweepError(RuntimeError):
    """A sweep that cannot start, resume, or produced no completed trial."""


class SpaceInTrialConfig:
    """Picklable define-by-run wrapper placing a registered space's point under ``sample/``.

    Args:
        name: Registered search space.
    """

    def __init__(self, name: str) -> None:
        get_space(name)  # unknown names fail here, listing the registered ones
        self.name = name

    def __call__(self, trial: Any) -> Dict[str, Any]:
        return {f"{SAMPLE_KEY}/{k}": v for k, v in get_space(self.name)(trial).items()}


@dataclass
class SweepResult:
    """What a sweep found.

    Attributes:
        best_config: The best completed trial's config (also at ``<path>/best_config.yaml``).
        best_cv_dice: Its cross-validated mean Dice.
        per_fold: Its Dice per fold, in fold order.
        table: One row per trial: ``trial``, ``status`` (COMPLETE, STOPPED by the scheduler,
            ERROR, INTERRUPTED), ``cv_dice``, ``fold<k>_dice``, ``done_folds``, the sampled
            params by config path, ``error``.
        path: The sweep folder (Tune experiment) under the storage path.
        name: Sweep name (pass it with ``resume=True`` to continue).
        complete: False when the run was interrupted before every trial finished.
    """

    best_config: ExperimentConfig
    best_cv_dice: float
    per_fold: List[float]
    table: List[Dict[str, Any]]
    path: str
    name: str
    complete: bool = True


class SweepProgress(Callback):
    """One printed line per finished fold and per finished trial, for people watching a sweep.

    Args:
        folds: K.
        trials: Number of trials in the sweep.
    """

    def __init__(self, folds: int, trials: int) -> None:
        self.folds, self.trials = folds, trials

    def on_trial_result(self, iteration: int, trials: List[Any], trial: Any, result: Dict[str, Any], **info: Any) -> None:
        n = int(result.get("done_folds", 0))
        if n:
            print(f"  {trial.trial_id}: fold {n - 1} Dice {result.get(f'fold{n - 1}_dice', math.nan):.4f} "
                  f"({n}/{self.folds} folds, running mean {result.get(METRIC, math.nan):.4f})", flush=True)

    def on_trial_complete(self, iteration: int, trials: List[Any], trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + 1
        what = "done" if int(r.get("done_folds", 0)) >= self.folds else "stopped early"
        print(f"trial {trial.trial_id} {what}: cv_dice {r.get(METRIC, math.nan):.4f} "
              f"[{min(ended, self.trials)}/{self.trials} trials]", flush=True)

    def on_trial_error(self, iteration: int, trials: List[Any], trial: Any, **info: Any) -> None:
        print(f"trial {trial.trial_id} FAILED: see {trial.path}/error.txt", flush=True)


def trial_name(trial: Any) -> str:
    """Tune trial name and folder, and run-name prefix of its folds: ``trial_<n>_<id>``.

    ``n`` is the searcher's running trial count, the leading number of Tune's experiment tag:
    names sort in sampling order and MLflow gets the trial number from them.
    """
    n = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    return f"trial_{int(n):03d}_{trial.trial_id}" if n.isdigit() else f"trial_{trial.trial_id}"


# --------------------------------------------------------------------------- helpers
def _is_uri(path: str) -> bool:
    return "://" in str(path)


def absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its local paths (workdir, storage, shards, sources) made absolute.

    Trials and Train workers run in other working directories, so a relative path that is
    right for the driver would point elsewhere there.
    """
    d = cfg.to_dict()
    d["tracking"]["workdir"] = str(absolute_workdir(cfg))
    if d["tracking"].get("storage_uri"):
        d["tracking"]["storage_uri"] = durable.storage_uri(cfg)
    if not _is_uri(d["data"]["shards_uri"]):
        d["data"]["shards_uri"] = str(Path(os.path.expanduser(d["data"]["shards_uri"])).resolve())
    for src in d["data"]["sources"]:
        if src.get("path") and not _is_uri(src["path"]):
            src["path"] = str(Path(os.path.expanduser(src["path"])).resolve())
    return ExperimentConfig.from_dict(d)


def storage_root(cfg: ExperimentConfig, storage_path: Optional[str] = None) -> str:
    """Ray storage for sweeps: `robustseg.durable.storage_uri` with ``storage_path`` (``tune --storage``) as override."""
    return durable.storage_uri(cfg, storage_path)


def read_json(path: str, storage: Optional[StorageConfig] = None) -> Dict[str, Any]:
    """A sweep's JSON file (local path or storage URI).

    Raises:
        SweepError: the file is missing.
    """
    try:
        return durable.read_json(path, storage)
    except FileNotFoundError:
        raise SweepError(f"{path}: missing (was this sweep started by run_sweep?)") from None


def default_fold_concurrency(cfg: ExperimentConfig, concurrency: int) -> int:
    """Folds per trial that the cluster can train at once next to ``concurrency`` trials.

    Each fold needs its Train workers plus about half a CPU for its Ray Data stream (without
    that headroom the read stalls, see STACK_NOTES); GPUs bound it too when used.
    """
    import ray

    total = ray.cluster_resources()
    sc = cfg.scaling
    slots = int(float(total.get("CPU", 1.0)) // (sc.num_workers * sc.cpus_per_worker + 0.5))
    if sc.use_gpu:
        slots = min(slots, int(float(total.get("GPU", 0.0)) // max(sc.num_workers * sc.gpus_per_worker, 1e-9)))
    return max(1, min(cfg.data.folds, slots // max(1, concurrency)))


def run_sweep(cfg: ExperimentConfig, *, space: str, trials: int, concurrency: int = 1,
              scheduler: Optional[str] = None, resume: bool = False, storage_path: Optional[str] = None,
              sweep_name: Optional[str] = None, fold_runner: Optional[FoldRunner] = None, seed: int = 0,
              mlflow: bool = False, fold_concurrency: Optional[int] = None,
              callbacks: Sequence[Any] = (), verbose: bool = True) -> SweepResult:
    """Run (or resume) an Optuna sweep whose objective is the K-fold cross-validated Dice.

    Args:
        cfg: Base experiment; ``data.folds`` sets K. Ignored on resume (the stored base wins).
        space: Registered search space (``search_spaces.space_names()``).
        trials: Number of trials.
        concurrency: Trials at once.
        scheduler: None or ``"asha"`` (stop poor trials after their first folds).
        resume: Continue the interrupted sweep ``sweep_name``.
        storage_path: Overrides ``tracking.storage_uri`` (`robustseg.durable.storage_uri`: else
            ``$ROBUSTSEG_STORAGE_URI``, else ``<workdir>/ray_results``): where Tune's results, the
            sweep's ``sweep.json``/``trials.json``/``best_config.yaml`` and its fold runs go. S3 is
            reached with ``cfg.data.storage``; Ray gets the same filesystem.
        sweep_name: Sweep (experiment) name; default ``<cfg.name>-<space>-<timestamp>``.
        fold_runner: ``fn(cfg, *, storage_path, run_name, mlflow) -> {"val_dice", "error", ...}``;
            default `trainables.train_fold.run_fold`.
        seed: TPE sampler seed.
        mlflow: Track a parent run per sweep, a child per trial and nested fold runs.
        fold_concurrency: Folds at once within a trial; default from the cluster's resources.
        callbacks: Extra Tune callbacks (stored with the sweep: a resumed sweep keeps them).
        verbose: Print a line per finished fold and trial (`SweepProgress`).

    Returns:
        The `SweepResult`; ``complete`` is False when the run was interrupted.

    Raises:
        SweepError: resuming a missing sweep, starting over an existing one, or no trial completed.
    """
    import ray
    from ray import tune

    get_space(space)
    if trials < 1 or concurrency < 1:
        raise ValueError(f"trials and concurrency must be >= 1, got {trials}, {concurrency}")
    if scheduler not in (None, "asha"):
        raise ValueError(f"scheduler must be None or 'asha', got {scheduler!r}")
    if resume and not sweep_name:
        raise SweepError("resume=True needs the sweep_name of the sweep to continue")
    cfg = absolute_paths(cfg)
    if mlflow:
        # Trials resolve the tracking URI themselves: pin the driver's (env vars may not travel).
        try:
            from robustseg.tracking_store import resolve_tracking_uri

            d = cfg.to_dict()
            d["tracking"]["tracking_uri"] = resolve_tracking_uri(cfg)
            cfg = ExperimentConfig.from_dict(d)
        except ImportError:  # open_tracking warns below
            pass
    storage = storage_root(cfg, storage_path)
    io = cfg.data.storage  # S3 endpoint and credentials for the storage (and for Ray, through `ray_fs`)
    name = sweep_name or f"{cfg.name}-{space}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = durable.join(storage, name)
    ray_path, ray_fs = durable.ray_storage(path, io)
    restorable = tune.Tuner.can_restore(ray_path, storage_filesystem=ray_fs)
    if resume and not restorable:
        raise SweepError(f"{path}: no sweep to resume (wrong name or storage path?)")
    if not resume and restorable:
        raise SweepError(f"{path} already holds a sweep: resume it (resume=True / --resume) or choose another name")
    if not ray.is_initialized():
        ray.init()

    if resume:
        meta = read_json(durable.join(path, SWEEP_FILE), io)
        if meta.get("space") != space:
            raise SweepError(f"{path} was a sweep over space {meta.get('space')!r}, not {space!r}")
        if int(meta["trials"]) != trials:
            log.warning("sweep %s was started with %s trials; resuming keeps that number", name, meta["trials"])
        trials = int(meta["trials"])
        base = ExperimentConfig.from_dict(meta["base"])
        tracker = open_sweep_tracking(base, name, space, resume=True, path=path) if (mlflow or meta.get("mlflow")) else None
    else:
        base = cfg
        if fold_runner is None:
            # Prepare once here: concurrent folds would otherwise race to prepare the same store.
            from robustseg.engine.train import ensure_prepared

            ensure_prepared(base)
        tracker = open_sweep_tracking(base, name, space, resume=False, path=path) if mlflow else None
        durable.write_text(durable.join(path, SWEEP_FILE), json.dumps({
            "space": space, "trials": trials, "seed": seed, "scheduler": scheduler, "concurrency": concurrency,
            "mlflow": tracker is not None, "base": base.to_dict()}, indent=1), io)

    trainable = tune.with_resources(tune.with_parameters(cv_objective, fold_runner=fold_runner), TRIAL_RESOURCES)
    if resume:
        tuner = tune.Tuner.restore(ray_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, storage_filesystem=ray_fs)
    else:
        tuner = _new_tuner(trainable, base, space=space, trials=trials, concurrency=concurrency, scheduler=scheduler,
                           storage=storage, name=name, seed=seed, path=path, tracker=tracker,
                           fold_concurrency=fold_concurrency or default_fold_concurrency(base, concurrency),
                           callbacks=callbacks, verbose=verbose)
    try:
        grid = tuner.fit()
    except BaseException as e:
        if tracker:
            tracker.end(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", error=e)
        raise
    return _summarise(grid, base, name=name, path=path, trials=trials, tracker=tracker, storage=io)


def _new_tuner(trainable: Any, base: ExperimentConfig, *, space: str, trials: int, concurrency: int,
               scheduler: Optional[str], storage: str, name: str, seed: int, path: str, tracker: Any,
               fold_concurrency: int, callbacks: Sequence[Any], verbose: bool) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    k = base.data.folds
    searcher = OptunaSearch(SpaceInTrialConfig(space), metric=METRIC, mode=MODE,
                            sampler=optuna.samplers.TPESampler(seed=seed))
    # metric/mode come from TuneConfig: Tune refuses a scheduler that also carries them.
    sched = ASHAScheduler(max_t=k, grace_period=1, reduction_factor=2) if scheduler == "asha" else None
    # Tune's experiment folder is ``path``; Ray wants it as (storage path without scheme, filesystem).
    ray_storage, ray_fs = durable.ray_storage(storage, base.data.storage)
    param_space = {
        "base": base.to_dict(),
        "fold_concurrency": int(fold_concurrency),
        FOLD_STORAGE: durable.join(path, "folds"),  # a full URI: the folds' trainers build their filesystem from it
        "mlflow": tracker.info if tracker else None,
    }
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=trials, search_alg=searcher,
                                    scheduler=sched, max_concurrent_trials=concurrency,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=name, storage_path=ray_storage, storage_filesystem=ray_fs, callbacks=[*callbacks, *([SweepProgress(k, trials)] if verbose else [])],
            # Tune's own heartbeat prints every trial's full config (the base included): too
            # much to read. SweepProgress prints one line per fold and per trial instead.
            verbose=0,
            # A fold failure is deterministic more often than not: report it, do not retry it.
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def _summarise(grid: Any, base: ExperimentConfig, *, name: str, path: str, trials: int, tracker: Any,
               storage: Optional[StorageConfig] = None) -> SweepResult:
    """Results table, best trial, best config YAML, and MLflow end states."""
    k = base.data.folds
    rows, samples, names, run_ids = [], {}, {}, {}
    for res in grid:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or str(res.path).rstrip("/").rsplit("/", 1)[-1]
        done = int(m.get("done_folds", 0) or 0)
        # Tune marks the result a scheduler stopped the trial on with done=True; a trial cut
        # short by an interruption has done=False (its in-memory status reads TERMINATED
        # after the shutdown, so the status cannot tell the two apart).
        if res.error is not None:
            status = "ERROR"
        elif done >= k:
            status = "COMPLETE"
        elif m.get("done"):
            status = "STOPPED"
        else:
            status = "INTERRUPTED"
        sample = flatten_sample((res.config or {}).get(SAMPLE_KEY) or {})
        samples[trial_id] = sample
        names[trial_id] = str(res.path).rstrip("/").rsplit("/", 1)[-1]  # trial_<n>_<id>: its fold runs' prefix
        run_ids[trial_id] = m.get("mlflow_run_id")
        row: Dict[str, Any] = {"trial": trial_id, "status": status, "cv_dice": m.get(METRIC)}
        row.update(fold_columns(m, k))
        row["done_folds"] = done
        row.update(sample)
        row["error"] = _first_line(res.error) if res.error is not None else ""
        rows.append(row)
        if tracker and status in ("STOPPED", "INTERRUPTED") and m.get("mlflow_run_id"):
            tracker.end_trial(m["mlflow_run_id"], "KILLED")
    table = _rectangular(rows)
    complete = len(rows) >= trials and all(r["status"] != "INTERRUPTED" for r in rows)
    done_rows = [r for r in table if r["status"] == "COMPLETE" and _finite(r["cv_dice"])]
    if not done_rows:
        if tracker:
            tracker.end(status="KILLED" if not complete else "FAILED")
        errors = "; ".join(f"{r['trial']}: {r['error']}" for r in table if r["error"])[:2000]
        hint = f" (interrupted: resume with sweep_name={name!r}, resume=True)" if not complete else ""
        raise SweepError(f"sweep {name}: no trial completed all {k} folds{hint}. {errors}")
    best = max(done_rows, key=lambda r: r["cv_dice"])
    durable.write_text(durable.join(path, TRIALS_FILE), json.dumps({
        "best": best["trial"], "folds": k,
        "trials": [{"trial": r["trial"], "name": names[r["trial"]], "status": r["status"], "cv_dice": r["cv_dice"], "done_folds": r["done_folds"],
                    "sample": samples[r["trial"]]} for r in table]}, indent=1, default=str), storage)
    best_cfg = ExperimentConfig.from_dict(apply_sample(base.to_dict(), samples[best["trial"]]))
    durable.write_text(durable.join(path, BEST_CONFIG), best_cfg.to_yaml(), storage)
    per_fold = [float(best[f"fold{j}_dice"]) for j in range(k)]
    if tracker:
        tracker.end(status="FINISHED" if complete else "KILLED", winner=Winner(
            trial=names[best["trial"]], trial_id=best["trial"], cv_dice=float(best["cv_dice"]), cfg=best_cfg,
            sample=samples[best["trial"]], run_id=run_ids.get(best["trial"])))
    if not complete:
        log.warning("sweep %s was interrupted after %d of %d trials; resume with sweep_name=%r, resume=True",
                    name, sum(r["status"] in ("COMPLETE", "STOPPED", "ERROR") for r in table), trials, name)
    return SweepResult(best_config=best_cfg, best_cv_dice=float(best["cv_dice"]), per_fold=per_fold, table=table,
                       path=path, name=name, complete=complete)


def _rectangular(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Same keys in every row (sampled params differ between trials of conditional spaces)."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tail = [k for k in keys if k == "error"]
    keys = [k for k in keys if k != "error"] + tail
    return [{k: r.get(k) for k in keys} for r in rows]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # Ray wraps trial errors; the informative line is usually the last one.
    return (text[-1] if text else type(err).__name__)[:500]


__all__ = ["BEST_CONFIG", "TRIALS_FILE", "SWEEP_FILE", "FoldFailedError", "SweepError", "SweepProgress", "SweepResult", "SpaceInTrialConfig", "TRIAL_CPUS", "cv_objective",
           "run_sweep", "trial_config", "trial_name"]
