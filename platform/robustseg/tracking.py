"""MLflow tracking: one run per training, nested under a trial and a sweep.

Layout of a sweep in MLflow (nesting through the ``mlflow.parentRunId`` tag, so the UI folds it):

    sweep run        robustseg.role=sweep   params: base config
      trial run      robustseg.role=trial   params: the trial's config; cv_val_dice, val_dice_fold<k>
        fold run     robustseg.role=fold    params: the fold's config; per-epoch metrics, artifacts

Everything goes through `MlflowClient` with explicit run ids, never the fluent "active run":
Ray workers, threads and the Tune driver each hold their own run ids and cannot clobber one
another's global state. A run that ends by an exception is marked FAILED (KILLED on Ctrl-C),
never left RUNNING; a worker killed outright cannot write anything, so a restarted worker
re-attaches to its unfinished run (same name, same parent) and keeps logging at the next epoch.

Tags on every run: ``backbone``, ``regime``, ``fold``, ``data_manifest_uri``, ``git_commit``
(+ ``mlflow.source.git.commit``, ``git_dirty``) when the code is a git checkout, and
``version.<package>``. Per-epoch metric names are the fit loop's (``loss``, ``val_dice``,
``val_dice_LV``, ``lr``, ``slices_per_s``, ...) for every backbone and regime, so runs compare
side by side in the MLflow UI.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

import yaml

from robustseg.config import ExperimentConfig, absolute_workdir
from robustseg.errors import RobustsegError

log = logging.getLogger(__name__)

ROLE, SWEEP, TRIAL_NUMBER, PARENT = "robustseg.role", "robustseg.sweep", "robustseg.trial_number", "mlflow.parentRunId"
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.17
MAX_PARAM_KEY = 250
_BATCH = 100  # MLflow accepts at most 100 params/tags and 1000 metrics per log_batch
_SECRET = re.compile(r"(secret|password|token|access_key|accesskey|credential)", re.I)
_BAD_KEY = re.compile(r"[^\w\-. /]")
_PACKAGES = ("robustseg", "torch", "monai", "ray", "mlflow", "optuna")


# --------------------------------------------------------------------------- where runs go
def resolve_tracking_uri(cfg: ExperimentConfig) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in the workdir.

    Args:
        cfg: Experiment config.
    """
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # Absolute path: Ray workers run in other working directories.
    return f"sqlite:///{absolute_workdir(cfg) / 'mlflow.db'}"


class TrackingStoreError(RobustsegError, LookupError):
    """A read-only command pointed at a tracking store that does not exist (none is created)."""


def local_store_path(uri: str) -> Optional[Path]:
    """The file or folder behind a local tracking URI (``sqlite:///...``, ``file:...``, a path); None if remote.

    Args:
        uri: MLflow tracking URI.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///rel.db is relative to the working folder, sqlite:////abs.db absolute; sqlite:// is in memory.
        rest = uri[len("sqlite:///"):].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        return Path(rest).absolute() if rest else None
    if parsed.scheme == "file":
        return Path(parsed.path).absolute()
    if parsed.scheme == "" and uri and not uri.startswith("databricks"):  # "databricks[-uc]" names a workspace
        return Path(uri).expanduser().absolute()
    return None


def require_store(uri: str) -> str:
    """``uri`` itself when its store exists (or is remote); read-only commands call this first.

    MLflow creates an empty SQLite database (or ``mlruns`` folder) the first time any client
    touches a local URI, so a mistyped path or a default store in the wrong working folder
    would silently "exist" and hold nothing. Reading must never create a store.

    Args:
        uri: MLflow tracking URI.

    Raises:
        TrackingStoreError: a local store that does not exist, named with its absolute path.
    """
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise TrackingStoreError(f"MLflow tracking store {uri}: {path} does not exist (nothing was created); pass "
                                 "--tracking-uri (or set MLFLOW_TRACKING_URI) to the store the runs and models are in")
    return uri


def artifact_location(cfg: ExperimentConfig) -> str:
    """Absolute ``file://`` URI of ``<workdir>/mlartifacts`` for experiments created locally.

    Args:
        cfg: Experiment config.
    """
    return (absolute_workdir(cfg) / "mlartifacts").as_uri()


def _is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file", "sqlite")


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _retry(fn: Callable[..., Any], *args: Any, attempts: int = 5, **kwargs: Any) -> Any:
    """Call ``fn``, retrying briefly on SQLite lock contention (parallel Ray workers)."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException wraps the SQLAlchemy OperationalError
            if i == attempts - 1 or "locked" not in str(e).lower():
                raise
            time.sleep(0.2 * 2 ** i)


def _experiment_id(uri: str, name: str, location: Optional[str]) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":  # deleted in the UI: runs cannot be created in it
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        # Against a tracking server its own (proxied) artifact store is the right place.
        return client.create_experiment(name, artifact_location=location if _is_local(uri) else None)
    except Exception:
        exp = client.get_experiment_by_name(name)  # another worker created it first
        if exp is None:
            raise
        return exp.experiment_id


def ensure_experiment(cfg: ExperimentConfig, tracking_uri: Optional[str] = None) -> str:
    """The id of ``tracking.experiment``, created with `artifact_location` if missing.

    Args:
        cfg: Experiment config.
        tracking_uri: Overrides `resolve_tracking_uri`.
    """
    return _experiment_id(tracking_uri or resolve_tracking_uri(cfg), cfg.tracking.experiment, artifact_location(cfg))


# --------------------------------------------------------------------------- params and tags
def _redact_uri(uri: str) -> str:
    parsed = urlparse(uri)
    if not parsed.query:
        return uri
    query = [(k, "***" if _SECRET.search(k) else v) for k, v in parse_qsl(parsed.query, keep_blank_values=True)]
    return urlunparse(parsed._replace(query=urlencode(query, safe="*:/")))


def redacted_config(cfg: ExperimentConfig) -> Dict[str, Any]:
    """``cfg.to_dict()`` with object-store credentials masked (runs are shared, keys are not).

    Args:
        cfg: Experiment config.
    """
    d = cfg.to_dict()
    storage = d["data"]["storage"]
    for key in ("access_key", "secret_key"):
        if storage.get(key):
            storage[key] = "***"
    d["data"]["shards_uri"] = _redact_uri(d["data"]["shards_uri"])
    return d


def _param_value(v: Any) -> str:
    text = json.dumps(v, default=str) if isinstance(v, (list, tuple, dict)) else str(v)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def flatten_config(cfg: ExperimentConfig) -> Dict[str, str]:
    """Resolved config as MLflow params: dotted keys, string values within MLflow's limits.

    Nested dicts (``model.params``) become dotted keys so search-space parameters are
    separate, sortable params; lists are JSON; empty dicts are logged as ``{}``.

    Args:
        cfg: Experiment config.
    """
    out: Dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[_BAD_KEY.sub("_", prefix)[:MAX_PARAM_KEY]] = _param_value(node)

    walk("", redacted_config(cfg))
    return out


@functools.lru_cache(maxsize=1)
def _git_state() -> Dict[str, str]:
    here = str(Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}  # not a checkout (wheel install, Ray working_dir copy) or no git binary
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}


def git_commit() -> str:
    """The checkout's commit (with ``-dirty`` when tracked files changed), or "" outside a checkout."""
    state = _git_state()
    if not state:
        return ""
    return state["git_commit"] + ("-dirty" if state.get("git_dirty") == "true" else "")


def find_run_id(tracking_uri: str, experiment: str, run_name: str, parent_run_id: Optional[str] = None) -> Optional[str]:
    """Newest run of ``experiment`` with this name (and parent, when given), any status; None if absent."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    filt = f"attributes.run_name = '{run_name}'"
    if parent_run_id:
        filt += f" and tags.`{PARENT}` = '{parent_run_id}'"
    runs = client.search_runs([exp.experiment_id], filter_string=filt, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        if pkg == "robustseg":
            import robustseg

            return robustseg.__version__
        return "not installed"


def manifest_uri(cfg: ExperimentConfig) -> str:
    """Absolute URI of the shard manifest the config trains on (credentials masked).

    Args:
        cfg: Experiment config.
    """
    uri = cfg.data.shards_uri
    if urlparse(uri).scheme in ("", "file"):
        local = urlparse(uri).path if uri.startswith("file:") else os.path.expanduser(uri)
        uri = Path(local).resolve().as_uri()
    parsed = urlparse(_redact_uri(uri))
    return urlunparse(parsed._replace(path=parsed.path.rstrip("/") + "/manifest.json"))


def run_tags(cfg: ExperimentConfig, **extra: Any) -> Dict[str, str]:
    """Tags identifying what a run trained and with which code.

    Args:
        cfg: Experiment config.
        **extra: More tags (override the defaults; None values are dropped).
    """
    tags = {"backbone": cfg.model.name, "regime": cfg.regime.name, "fold": str(cfg.data.val_fold),
            "data_manifest_uri": manifest_uri(cfg), "robustseg.experiment": cfg.name, **_git_state()}
    tags.update({f"version.{p}": _version(p) for p in _PACKAGES})
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


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


# --------------------------------------------------------------------------- one training run
class FitTracker:
    """Logs one fit (one fold) to MLflow from wherever it runs (rank 0 of a Ray Train worker).

    Args:
        cfg: The run's resolved config.
        tracking_uri: MLflow tracking URI (resolved by the driver: workers run elsewhere).
        experiment: MLflow experiment name.
        run_name: Run name; an unfinished run of that name under the same parent is re-attached.
        parent_run_id: The trial run this fold belongs to.
        tags: Extra tags.
    """

    def __init__(self, cfg: ExperimentConfig, tracking_uri: str, experiment: str, run_name: str,
                 parent_run_id: Optional[str] = None, tags: Optional[dict] = None) -> None:
        self.cfg, self.tracking_uri = cfg, tracking_uri
        exp_id = _experiment_id(tracking_uri, experiment, artifact_location(cfg))
        self.run_id: str = _open_run(cfg, tracking_uri, exp_id, run_name, parent_run_id, dict(tags or {}),
                                     reuse=True, role="fold" if parent_run_id else "run")
        self._pending: List[Any] = []

    def on_epoch(self, epoch: int, metrics: dict, checkpoint_path: Any) -> None:
        """Log every finite numeric metric at ``step=epoch``; tracking trouble never stops training.

        Args:
            epoch: Completed epochs (the fit loop's 1-based counter).
            metrics: The epoch's metrics.
            checkpoint_path: Path of the last checkpoint (stored as a tag).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(_BAD_KEY.sub("_", k), float(v), now, int(epoch)) for k, v in metrics.items()
                          if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
                          and math.isfinite(float(v))]
        try:
            for i in range(0, len(self._pending), 1000):
                _retry(_client(self.tracking_uri).log_batch, self.run_id, metrics=self._pending[i:i + 1000])
            self._pending = []
            _set_tags(self.tracking_uri, self.run_id,
                      {"last_checkpoint": str(checkpoint_path), "epochs_done": str(epoch)})
        except Exception as e:  # kept in _pending and sent with the next epoch
            log.warning("MLflow logging failed at epoch %s (%s); will retry next epoch", epoch, e)

    def finish(self, result: Any, out_dir: Path) -> None:
        """Log plots, history, per-case metrics, overlays, plan and best metrics; mark FINISHED.

        Args:
            result: The `robustseg.engine.fit.FitResult`.
            out_dir: The fit's output folder (``val_cases.csv`` and ``*overlay*.png`` are picked up).
        """
        client, out_dir, errors = _client(self.tracking_uri), Path(out_dir), []
        history = [dict(h, epoch=h.get("epoch", i + 1)) for i, h in enumerate(result.history)]
        steps: List[Callable[[Path], None]] = [
            lambda tmp: client.log_text(self.run_id, json.dumps(history, indent=1, default=float), "history.json"),
            lambda tmp: self._log_curves(history, tmp), lambda tmp: self._log_outputs(out_dir),
            lambda tmp: self._log_plan(result), lambda tmp: self._log_best(result, history)]
        with tempfile.TemporaryDirectory() as tmp:
            for step in steps:
                try:
                    _retry(step, Path(tmp))
                except Exception as e:  # one missing artifact must not lose the run's status
                    errors.append(f"{type(e).__name__}: {e}")
                    log.warning("MLflow artifact logging failed: %s", e)
        if errors:
            _set_tags(self.tracking_uri, self.run_id, {"artifact_errors": "; ".join(errors)})
        end_run(self.tracking_uri, self.run_id, "FINISHED")

    def fail(self, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED for Ctrl-C) with the error text as tag ``error``.

        Args:
            exc: The exception that stopped training.
        """
        end_run(self.tracking_uri, self.run_id, _status_for(exc), exc)

    def _log_curves(self, history: Sequence[Dict[str, Any]], tmp: Path) -> None:
        from robustseg.engine.plots import plot_history

        if history:
            png = plot_history(history, tmp / "learning_curve.png")
            _client(self.tracking_uri).log_artifact(self.run_id, str(png), "plots")

    def _log_outputs(self, out_dir: Path) -> None:
        client = _client(self.tracking_uri)
        if (out_dir / "val_cases.csv").is_file():
            client.log_artifact(self.run_id, str(out_dir / "val_cases.csv"), "metrics")
        overlays = sorted(p for p in out_dir.rglob("*.png") if "overlay" in str(p.relative_to(out_dir)).lower())
        for p in overlays[:64]:  # bounded: a big validation fold must not flood the store
            client.log_artifact(self.run_id, str(p), "overlays")

    def _log_plan(self, result: Any) -> None:
        path = result.best_checkpoint or result.last_checkpoint
        if path is None or not Path(path).is_file():
            return
        from robustseg.engine.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        client = _client(self.tracking_uri)
        for key in ("plan", "layout"):
            if ckpt.get(key):
                client.log_dict(self.run_id, ckpt[key], f"preprocessing/{key}.json")

    def _log_best(self, result: Any, history: Sequence[Dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), max(int(result.best_epoch), 0)
        best = {"epochs_run": float(result.epochs_run), "stopped_early": float(bool(result.stopped_early))}
        if math.isfinite(result.best_score):
            best.update(best_val_dice=float(result.best_score), best_epoch=float(result.best_epoch))
            row = next((h for h in history if h.get("epoch") == result.best_epoch), {})
            best.update({f"best_{k}": float(v) for k, v in row.items() if k.startswith("val_") and k != "val_dice"
                         and isinstance(v, (int, float)) and math.isfinite(float(v))})
        _client(self.tracking_uri).log_batch(self.run_id, metrics=[Metric(_BAD_KEY.sub("_", k), v, now, step)
                                                                   for k, v in best.items()])
        tags = {k: str(v) for k, v in (("best_checkpoint", result.best_checkpoint),
                                       ("last_checkpoint", result.last_checkpoint)) if v is not None}
        _set_tags(self.tracking_uri, self.run_id, tags)


def callback(tracker: FitTracker) -> Callable[[int, Dict[str, float], Path], None]:
    """A `robustseg.engine.fit.fit` callback that forwards each epoch to ``tracker``.

    Args:
        tracker: The run's tracker.
    """
    def on_epoch(epoch: int, metrics: Dict[str, float], last_checkpoint: Path) -> None:
        tracker.on_epoch(epoch, metrics, last_checkpoint)

    return on_epoch


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
