"""Where MLflow runs go: the tracking URI, its local store, the client and the experiment.

`resolve_tracking_uri` picks the store (config, ``$MLFLOW_TRACKING_URI``, else SQLite in the
workdir); `require_store` keeps read-only commands from creating one; `ensure_experiment`
finds or creates the experiment with `artifact_location`. The private helpers here (one
cached `MlflowClient` per URI, retries on SQLite lock contention) serve every
``robustseg.tracking_*`` module. The layout of runs: `robustseg.tracking`.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from robustseg.config import ExperimentConfig, absolute_workdir
from robustseg.errors import RobustsegError


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


#: Where `mlflow ui` / `mlflow server` listen by default.
DEFAULT_UI = "http://127.0.0.1:5000"


def ui_runs_url(experiment_id: str, ui: str = DEFAULT_UI) -> str:
    """Address of an experiment's runs table in the MLflow UI, in its model-training view.

    The MLflow 3.17 UI shows an experiment in its GenAI view (traces, evaluations) or its
    machine-learning view (runs, metric charts). Which one comes from the ``workflowType`` query
    parameter of the page (``genai`` or ``machine_learning``), else the browser's last choice
    (local storage), else GenAI. The experiment tag ``mlflow.experimentKind`` that older UIs
    read is ignored there (the build hard-wires the workflow-type switch on), so the link carries
    the parameter instead of tagging the experiment.

    Args:
        experiment_id: The experiment.
        ui: Base address of the UI.
    """
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


__all__ = ["DEFAULT_UI", "TrackingStoreError", "artifact_location", "ensure_experiment", "local_store_path",
           "require_store", "resolve_tracking_uri", "ui_runs_url"]
