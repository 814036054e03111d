"""What MLflow runs record about themselves: the config as params, and tags.

The tag names of the sweep -> trial -> fold layout (`ROLE`, `SWEEP`, `TRIAL`, `TRIAL_NUMBER`,
`PARENT`), the resolved config as params within MLflow's limits (`flatten_config`, with
credentials masked by `redacted_config`), and the tags naming what a run trained and with
which code (`run_tags`: backbone, regime, fold, data manifest, git commit, package
versions). The layout of runs: `robustseg.tracking`.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Mapping, Optional
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from robustseg.config import ExperimentConfig
from robustseg.tracking_store import _client

ROLE, SWEEP, TRIAL_NUMBER, PARENT = "robustseg.role", "robustseg.sweep", "robustseg.trial_number", "mlflow.parentRunId"
#: Tag naming the Tune trial (``trial_<n>_<id>``) on a trial run and on each of its fold runs.
TRIAL = "robustseg.trial"
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in MLflow 3.17
MAX_PARAM_KEY = 250
_SECRET = re.compile(r"(secret|password|token|access_key|accesskey|credential)", re.I)
_BAD_KEY = re.compile(r"[^\w\-. /]")
_PACKAGES = ("robustseg", "torch", "monai", "ray", "mlflow", "optuna")


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
    # A null optim.lr means "the optimiser's default": log the number that trained.
    out["optim.lr"] = _param_value(cfg.optim.initial_lr)
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



__all__ = ["MAX_PARAM_KEY", "MAX_PARAM_VALUE", "PARENT", "ROLE", "SWEEP", "TRIAL", "TRIAL_NUMBER", "find_run_id",
           "flatten_config", "git_commit", "manifest_uri", "redacted_config", "run_tags"]
