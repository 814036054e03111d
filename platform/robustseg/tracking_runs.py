"""MLflow run lifecycle: open, re-attach and end runs, analysis runs, and the sweep/trial runs.

Runs are opened with the config's params and tags (re-attached to an unfinished run of the
same name and parent when asked) and always end: FINISHED, FAILED on an exception, KILLED on
Ctrl-C (`tracked_run`, `analysis_run`, `end_run`). A sweep's parent run (`sweep_parent`),
its trial runs (`child_run`) and a trial's cross-validated result (`finish_trial`) build
the sweep -> trial -> fold layout described in `robustseg.tracking`; the fold runs are
`robustseg.tracking_fit.FitTracker`'s.
"""
from __future__ import annotations

import contextlib
import math
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import yaml

from robustseg.config import ExperimentConfig
from robustseg.tracking_store import _client, _retry, ensure_experiment, resolve_tracking_uri
from robustseg.tracking_tags import (MAX_PARAM_VALUE, PARENT, ROLE, SWEEP, TRIAL_NUMBER, flatten_config, git_commit,
                                     redacted_config, run_tags)

_BATCH = 100  # MLflow accepts at most 100 params/tags and 1000 metrics per log_batch


# --------------------------------------------------------------------------- run lifecycle
def _log_params_and_config(uri: str, run_id: str, cfg: ExperimentConfig) -> None:
    from mlflow.entities import Param

    client = _client(uri)
    have = client.get_run(run_id).data.params
    # A re-attached run keeps its params: MLflow refuses to change a logged value.
    params = [Param(k, v) for k, v in flatten_config(cfg).items() if k not in have]
    for i in range(0, len(params), _BATCH):
        _retry(client.log_batch, run_id, params=params[i:i + _BATCH])
    text = yaml.safe_dump(redacted_config(cfg), sort_keys=False)
    _retry(client.log_text, run_id, text, "config/config.yaml")


def _find_run(uri: str, exp_id: str, run_name: str, parent_run_id: Optional[str], role: str,
              statuses: Sequence[str] = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")) -> Optional[str]:
    """Newest run with this name, parent and role whose status is in ``statuses``."""
    filt = f"tags.`{PARENT}` = '{parent_run_id}'" if parent_run_id else f"tags.`{ROLE}` = '{role}'"
    runs = _client(uri).search_runs([exp_id], filter_string=filt, order_by=["attributes.start_time DESC"])
    for r in runs:
        if (r.info.run_name == run_name and r.info.status in statuses
                and r.data.tags.get(PARENT) == parent_run_id and r.data.tags.get(ROLE) == role):
            return r.info.run_id
    return None


def _open_run(cfg: ExperimentConfig, uri: str, exp_id: str, run_name: str, parent_run_id: Optional[str],
              tags: Mapping[str, Any], reuse: bool, role: str) -> str:
    client = _client(uri)
    all_tags = run_tags(cfg, **{ROLE: role, **tags})
    if parent_run_id:
        all_tags[PARENT] = parent_run_id
    run_id = _find_run(uri, exp_id, run_name, parent_run_id, all_tags[ROLE]) if reuse else None
    if run_id is None:
        run_id = _retry(client.create_run, exp_id, tags=all_tags, run_name=run_name).info.run_id
    else:
        _retry(client.update_run, run_id, status="RUNNING")
        _set_tags(uri, run_id, {**all_tags, "robustseg.reattached": "true"})
    _log_params_and_config(uri, run_id, cfg)
    return run_id


def _set_tags(uri: str, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    for i in range(0, len(items), _BATCH):
        _retry(_client(uri).log_batch, run_id, tags=items[i:i + _BATCH])


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED", error: Optional[BaseException] = None) -> None:
    """Terminate a run with ``status`` (FINISHED, FAILED or KILLED), recording ``error``.

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: The run.
        status: Terminal status.
        error: The exception that ended the run, stored as tag ``error`` and ``error.txt``.
    """
    client = _client(tracking_uri)
    if error is not None:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        with contextlib.suppress(Exception):  # the status matters more than the text
            _set_tags(tracking_uri, run_id, {"error": f"{type(error).__name__}: {error}"})
            client.log_text(run_id, text, "error.txt")
    _retry(client.set_terminated, run_id, status=status)


def _status_for(exc: BaseException) -> str:
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"


@contextlib.contextmanager
def tracked_run(cfg: ExperimentConfig, run_name: str, *, parent_run_id: Optional[str] = None,
                nested_tags: Optional[Mapping[str, Any]] = None) -> Iterator[Any]:
    """A run that logs the config and always ends: FINISHED, FAILED on error, KILLED on Ctrl-C.

    Args:
        cfg: Experiment config (params, tags, ``config/config.yaml`` artifact).
        run_name: MLflow run name.
        parent_run_id: Nest the run under this run.
        nested_tags: Extra tags (e.g. ``{"robustseg.role": "trial"}``).

    Yields:
        The `mlflow.entities.Run` (log to it with `MlflowClient` and ``run.info.run_id``).
    """
    uri = resolve_tracking_uri(cfg)
    exp_id = ensure_experiment(cfg, uri)
    tags = dict(nested_tags or {})
    run_id = _open_run(cfg, uri, exp_id, run_name, parent_run_id, tags, reuse=False, role=tags.pop(ROLE, "run"))
    try:
        yield _client(uri).get_run(run_id)
    except BaseException as e:
        end_run(uri, run_id, _status_for(e), e)
        raise
    end_run(uri, run_id, "FINISHED")


def add_run_arguments(parser: Any, *, experiment: str, run_name: str) -> None:
    """The MLflow options every analysis command takes: --tracking-uri, --experiment, --run-name, --no-tracking.

    Args:
        parser: An argparse (sub)parser.
        experiment: Default experiment name.
        run_name: How the default run name reads (for the help text).
    """
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or robustseg_work/mlflow.db)")
    parser.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment})")
    parser.add_argument("--run-name", help=f"MLflow run name (default {run_name})")
    parser.add_argument("--no-tracking", action="store_true", help="write the files only (no MLflow)")


def cli_tracking_uri(args: Any) -> str:
    """``--tracking-uri``, else the default store (`resolve_tracking_uri` of the default config)."""
    return getattr(args, "tracking_uri", None) or resolve_tracking_uri(ExperimentConfig())


@contextlib.contextmanager
def analysis_run(tracking_uri: str, experiment: str, run_name: str, role: str, *,
                 tags: Optional[Mapping[str, Any]] = None, params: Optional[Mapping[str, Any]] = None,
                 workdir: Optional[str] = None) -> Iterator[Tuple[Any, str]]:
    """A run that records an analysis (not a training) and always ends, like `tracked_run`.

    The experiment is created if missing (`ensure_experiment`); a new local one keeps its
    artifacts under ``workdir``, by default beside a SQLite database (else the config
    default). The run is tagged ``robustseg.role=role`` and ``git_commit``. Everything goes
    through an `MlflowClient` bound to ``tracking_uri``: nothing process-wide is changed.
    The run ends FINISHED when the block does, FAILED on an exception (KILLED on Ctrl-C),
    with the error recorded by `end_run`.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: Experiment name.
        run_name: Run name.
        role: Value of the ``robustseg.role`` tag.
        tags: More tags.
        params: Run parameters, logged as strings cut to `MAX_PARAM_VALUE` characters.
        workdir: Where a new local experiment keeps its artifacts (``<workdir>/mlartifacts``).

    Yields:
        ``(client, run_id)``: log to the run with ``client``.
    """
    from mlflow.entities import Param

    cfg = ExperimentConfig()
    cfg.tracking.experiment = experiment
    if workdir:
        cfg.tracking.workdir = workdir
    elif tracking_uri.startswith("sqlite:///"):  # a local database keeps its artifacts beside it
        cfg.tracking.workdir = str(Path(tracking_uri[len("sqlite:///"):]).parent)
    client = _client(tracking_uri)
    all_tags = {ROLE: role, "git_commit": git_commit(), **(tags or {})}
    run_id = _retry(client.create_run, ensure_experiment(cfg, tracking_uri), run_name=run_name,
                    tags=all_tags).info.run_id
    try:
        items = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in (params or {}).items()]
        for i in range(0, len(items), _BATCH):
            _retry(client.log_batch, run_id, params=items[i:i + _BATCH])
        yield client, run_id
    except BaseException as e:
        end_run(tracking_uri, run_id, _status_for(e), e)
        raise
    end_run(tracking_uri, run_id, "FINISHED")


def log_metrics_batched(client: Any, run_id: str,
                        metrics: Union[Mapping[str, float], Iterable[Tuple[str, float, int]]]) -> None:
    """Log metrics in batches of 1000 (MLflow's `log_batch` limit), all with the current time.

    Args:
        client: An `MlflowClient`.
        run_id: The run.
        metrics: ``{key: value}`` (step 0) or ``(key, value, step)`` triples.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    triples = [(k, v, 0) for k, v in metrics.items()] if isinstance(metrics, Mapping) else metrics
    items = [Metric(k, float(v), now, int(step)) for k, v, step in triples]
    for i in range(0, len(items), 1000):
        _retry(client.log_batch, run_id, metrics=items[i:i + 1000])


# --------------------------------------------------------------------------- sweeps
def sweep_parent(cfg: ExperimentConfig, sweep_name: str, *, resume: bool = False,
                 tags: Optional[Mapping[str, Any]] = None) -> str:
    """The parent run of a sweep (left RUNNING: end it with `end_run`).

    Args:
        cfg: The sweep's base config.
        sweep_name: Run name and tag ``robustseg.sweep``; `robustseg.sweep_report` finds sweeps by it.
        resume: Re-attach to the newest sweep run of that name (``tune --resume``).
        tags: Extra tags (search space, scheduler, number of trials).
    """
    uri = resolve_tracking_uri(cfg)
    exp_id = ensure_experiment(cfg, uri)
    extra = {"fold": "all", SWEEP: sweep_name, **(tags or {})}
    any_status = ("RUNNING", "FAILED", "KILLED", "FINISHED", "SCHEDULED")
    # A finished sweep being resumed is re-opened too (Tune decides what is left to run).
    run_id = _find_run(uri, exp_id, sweep_name, None, "sweep", statuses=any_status) if resume else None
    if run_id is not None:
        _retry(_client(uri).update_run, run_id, status="RUNNING")
        return run_id
    return _open_run(cfg, uri, exp_id, sweep_name, None, extra, reuse=False, role="sweep")


def child_run(cfg: ExperimentConfig, parent_run_id: str, run_name: str, *, trial_number: Optional[int] = None,
              role: str = "trial", tags: Optional[Mapping[str, Any]] = None) -> str:
    """A trial run under a sweep (or any nested run); an unfinished one of that name is re-attached.

    Args:
        cfg: The trial's resolved config (its params are what the leaderboard compares).
        parent_run_id: The sweep run.
        run_name: Run name (e.g. the Tune trial id).
        trial_number: Optuna/Tune trial index (x axis of the report's history plot).
        role: ``trial`` (default) or ``fold``.
        tags: Extra tags.
    """
    uri = resolve_tracking_uri(cfg)
    exp_id = ensure_experiment(cfg, uri)
    parent_tags = _client(uri).get_run(parent_run_id).data.tags
    extra = {"fold": "all" if role == "trial" else str(cfg.data.val_fold), SWEEP: parent_tags.get(SWEEP),
             TRIAL_NUMBER: trial_number, **(tags or {})}
    return _open_run(cfg, uri, exp_id, run_name, parent_run_id, extra, reuse=True, role=role)


def finish_trial(tracking_uri: str, run_id: str, fold_scores: Mapping[int, float], status: str = "FINISHED") -> float:
    """Log a trial's cross-validated result and end it.

    Logs ``val_dice_fold<k>`` for every finite fold score, and ``cv_val_dice`` (the mean: the
    sweep's objective) and ``cv_val_dice_std`` only when every fold has one: a mean over the
    folds that happened to succeed would flatter a trial.

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: The trial run.
        fold_scores: Best validation Dice per fold.
        status: Terminal status.

    Returns:
        The mean Dice over folds (NaN unless every fold has a finite score).
    """
    from mlflow.entities import Metric

    scores = {int(k): float(v) for k, v in fold_scores.items()}
    vals = [v for v in scores.values() if math.isfinite(v)]
    complete = bool(vals) and len(vals) == len(scores)
    mean = sum(vals) / len(vals) if complete else float("nan")
    now = int(time.time() * 1000)
    metrics = [Metric(f"val_dice_fold{k}", v, now, 0) for k, v in sorted(scores.items()) if math.isfinite(v)]
    if complete:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        metrics += [Metric("cv_val_dice", mean, now, 0), Metric("cv_val_dice_std", std, now, 0)]
    _retry(_client(tracking_uri).log_batch, run_id, metrics=metrics)
    end_run(tracking_uri, run_id, status)
    return mean


__all__ = ["add_run_arguments", "analysis_run", "child_run", "cli_tracking_uri", "end_run", "finish_trial",
           "log_metrics_batched", "sweep_parent", "tracked_run"]
