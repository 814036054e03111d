"""Log ensembles as MLflow pyfunc models, register them, manage aliases, load them by URI.

A registered version carries what a reader of the MLflow UI needs to trust it: validation
metrics, the data manifest URI and the git commit as version tags, and a description that
lists the members. The ``champion`` alias (or any other) is moved with `promote`; each move is
remembered in a registered-model tag, so `rollback` restores the previous holder.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple

from robustseg.errors import RobustsegError

if TYPE_CHECKING:  # torch and the ensemble (monai) load per call: `robustseg --help` reads DEFAULT_NAME
    import torch

    from robustseg.ensemble import Ensemble

DEFAULT_NAME = "robustseg-cmr"
DEFAULT_ALIAS = "champion"
HISTORY_TAG = "robustseg.alias_history.{alias}"
#: Requirements written with the model (no inference: it would import and run the model).
REQUIREMENTS = ("torch", "numpy", "scipy", "SimpleITK", "monai", "einops", "PyYAML", "h5py")


class RegistryError(RobustsegError, ValueError):
    """A registry operation that cannot be done (unknown model, version or alias)."""


@contextlib.contextmanager
def mlflow_uri(uri: Optional[str]) -> Iterator[None]:
    """Point MLflow's fluent API (and its registry) at ``uri`` for a block, then restore.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` for subprocesses; left
    set, it would silently send every later run of this process (other experiments, other
    tests) to this store.
    """
    import mlflow

    if not uri:
        yield
        return
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(tracking_uri: Optional[str]) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _existing_store(tracking_uri: Optional[str]) -> str:
    """The store a lookup reads (MLflow's own default when None, as before), which must exist.

    Looking a model up must not create a store: MLflow would make an empty one at a mistyped
    path, or ``mlflow.db`` in whatever folder the command ran in.
    """
    import mlflow

    from robustseg.tracking_store import require_store

    return require_store(tracking_uri or mlflow.get_tracking_uri())


def _requirements() -> List[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in REQUIREMENTS:
        try:
            v = version(pkg)
        except PackageNotFoundError:
            out.append(pkg)
            continue
        out.append(f"{pkg}=={v.split('+')[0]}")
    return out


def log_ensemble(ens: Ensemble, *, tracking_uri: str, run_id: str, name: str = "ensemble") -> str:
    """Log ``ens`` as a pyfunc model in run ``run_id``; returns the logged model URI.

    Args:
        ens: The ensemble (its members' checkpoints must still be readable).
        tracking_uri: MLflow tracking URI.
        run_id: An open or finished run to attach the model to.
        name: Model name within the run.
    """
    import mlflow

    from robustseg.ensemble.pyfunc import ARTIFACT_KEY, input_example, signature

    code = str(Path(__file__).resolve().parents[1])  # the whole robustseg package ships with the model
    with tempfile.TemporaryDirectory() as tmp, mlflow_uri(tracking_uri):
        folder = ens.save(Path(tmp) / "ensemble")
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # The input is a dict of arrays described by the signature; MLflow's type-hint advice does not apply.
            warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                # Models from code: the class is rebuilt from the shipped package, not unpickled.
                name=name, python_model=str(Path(code) / "ensemble" / "pyfunc_entry.py"), artifacts={ARTIFACT_KEY: str(folder)},
                code_paths=[code], signature=signature(), input_example=input_example(),
                pip_requirements=_requirements(), metadata={"robustseg_spec": ens.spec.to_dict()})
    return info.model_uri


def register_ensemble(model_uri: str, *, tracking_uri: str, name: str = DEFAULT_NAME, alias: Optional[str] = DEFAULT_ALIAS,
                      spec: Optional[Mapping[str, Any]] = None, tags: Optional[Mapping[str, str]] = None) -> str:
    """Register a logged model, tag it, describe it and (optionally) give it ``alias``.

    Args:
        model_uri: `log_ensemble`'s URI.
        tracking_uri: MLflow tracking URI (registry on the same store).
        name: Registered model name.
        alias: Alias to point at the new version (None: none).
        spec: The ensemble spec dict: metrics and provenance become tags, members the description.
        tags: Extra version tags.

    Returns:
        The new version number (string).
    """
    import mlflow

    with mlflow_uri(tracking_uri):
        mv = mlflow.register_model(model_uri, name)
    client = _client(tracking_uri)
    spec = dict(spec or {})
    all_tags: Dict[str, str] = {}
    for k, v in (spec.get("metrics") or {}).items():
        all_tags[f"metric.{k}"] = f"{float(v):.6g}"
    for k, v in (spec.get("provenance") or {}).items():
        all_tags[str(k)] = str(v)
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    members = spec.get("members") or []
    all_tags["members"] = str(len(members))
    for k, v in all_tags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    if spec:
        client.update_model_version(name, mv.version, description=describe_spec(spec))
    if alias:
        promote(name, mv.version, alias=alias, tracking_uri=tracking_uri)
    return str(mv.version)


def describe_spec(spec: Mapping[str, Any]) -> str:
    """Markdown description of a version: members, combination, metrics, provenance."""
    lines = [f"**{spec.get('name', 'ensemble')}** ({spec.get('label_convention', spec.get('task', ''))})", "",
             f"combine: {spec.get('combine')}, TTA: {spec.get('tta')}, centring: {spec.get('centring')}, "
             f"post-processing: {spec.get('postprocess')}", "", "| member | backbone | fold | weight | run |",
             "|---|---|---|---|---|"]
    for m in spec.get("members") or []:
        lines.append(f"| {m['name']} | {m['backbone']} | {m['fold']} | {m['weight']:g} | {m.get('run_id', '')} |")
    if spec.get("metrics"):
        lines += ["", "metrics: " + ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(spec["metrics"].items()))]
    for k, v in (spec.get("provenance") or {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def _history(client: Any, name: str, alias: str) -> List[str]:
    rm = client.get_registered_model(name)
    raw = (rm.tags or {}).get(HISTORY_TAG.format(alias=alias))
    return json.loads(raw) if raw else []


def _check_version(client: Any, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"model {name!r} has no version {version} in {client.tracking_uri}") from None


def promote(name: str, version: str, *, alias: str = DEFAULT_ALIAS, tracking_uri: Optional[str] = None) -> Optional[str]:
    """Point ``alias`` at ``version``; returns the version that held it before (or None)."""
    tracking_uri = _existing_store(tracking_uri)
    client = _client(tracking_uri)
    _check_version(client, name, version)
    previous = alias_version(name, alias, tracking_uri)
    if previous == str(version):
        return previous
    client.set_registered_model_alias(name, alias, str(version))
    if previous is not None:
        hist = _history(client, name, alias) + [previous]
        client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(hist[-50:]))
    return previous


def rollback(name: str, *, alias: str = DEFAULT_ALIAS, tracking_uri: Optional[str] = None) -> str:
    """Move ``alias`` back to the version that held it before the last `promote`.

    Raises:
        RegistryError: no earlier holder is recorded.
        TrackingStoreError: no store at a local ``tracking_uri``.
    """
    tracking_uri = _existing_store(tracking_uri)
    client = _client(tracking_uri)
    hist = _history(client, name, alias)
    if not hist:
        raise RegistryError(f"model {name!r}: alias {alias!r} has no earlier version to roll back to")
    target = hist.pop()
    _check_version(client, name, target)
    client.set_registered_model_alias(name, alias, target)
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(hist))
    return target


def alias_version(name: str, alias: str, tracking_uri: Optional[str] = None) -> Optional[str]:
    """The version ``alias`` points at, or None."""
    from mlflow.exceptions import MlflowException

    client = _client(_existing_store(tracking_uri))
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def list_versions(name: str, tracking_uri: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per version (newest first): version, aliases, status, created, metrics, run.

    Raises:
        RegistryError: no registered model of that name.
        TrackingStoreError: no store at a local ``tracking_uri`` (none is created).
    """
    import time

    from mlflow.exceptions import MlflowException

    tracking_uri = _existing_store(tracking_uri)
    client = _client(tracking_uri)
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models()]
        raise RegistryError(f"no registered model {name!r} in {tracking_uri}; registered: {names or 'none'}") from None
    aliases: Dict[str, List[str]] = {}
    for a, v in (rm.aliases or {}).items():
        aliases.setdefault(str(v), []).append(a)
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = mv.tags or {}
        row = {"version": str(mv.version), "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
               "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
               "run_id": mv.run_id or ""}
        row.update({k[len("metric."):]: v for k, v in tags.items() if k.startswith("metric.")})
        row["members"] = tags.get("members", "")
        rows.append(row)
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def _parse_models_uri(uri: str) -> Tuple[str, str, str]:
    """(name, version, alias) of ``models:/name@alias`` or ``models:/name/version``."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, "", alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, ""
    return rest, "", ""


def load_ensemble(model_uri: str, tracking_uri: Optional[str] = None,
                  device: Optional[torch.device] = None) -> Tuple[Ensemble, Dict[str, Any]]:
    """Load an ensemble from a folder (`Ensemble.save`) or an MLflow model URI.

    Args:
        model_uri: An ensemble folder, or ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
            ``runs:/<run>/<path>``, ``models:/m-<id>`` (MLflow).
        tracking_uri: MLflow tracking URI for MLflow URIs (default: MLflow's own resolution).
        device: Inference device (default CUDA if available; ``$ROBUSTSEG_DEVICE`` for MLflow).

    Returns:
        The ensemble and where it came from: ``uri``, ``name``, ``version``, ``alias``.

    Raises:
        RegistryError: a URI that is neither an ensemble folder nor a loadable MLflow model.
        TrackingStoreError: an MLflow URI and no store at a local ``tracking_uri`` (none is created).
    """
    from robustseg.ensemble import SPEC_FILE, Ensemble

    p = Path(model_uri)
    if (p / SPEC_FILE).is_file():
        return Ensemble.load(p, device), {"uri": str(p), "name": "", "version": "", "alias": ""}
    if not model_uri.startswith(("models:/", "runs:/")):
        raise RegistryError(f"{model_uri}: not an ensemble folder (no {SPEC_FILE}) nor an MLflow models:/ or runs:/ URI")
    import mlflow
    from mlflow.exceptions import MlflowException

    from robustseg.ensemble.pyfunc import DEVICE_ENV

    tracking_uri = _existing_store(tracking_uri)
    before = os.environ.get(DEVICE_ENV)
    if device is not None:
        os.environ[DEVICE_ENV] = str(device)
    try:
        with mlflow_uri(tracking_uri):
            model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise RegistryError(f"{model_uri}: cannot load from {tracking_uri} ({str(e).splitlines()[0]})") from None
    finally:
        if device is not None:
            if before is None:
                os.environ.pop(DEVICE_ENV, None)
            else:
                os.environ[DEVICE_ENV] = before
    ens = model.unwrap_python_model().ensemble
    info: Dict[str, Any] = {"uri": model_uri, "name": "", "version": "", "alias": ""}
    if model_uri.startswith("models:/") and not model_uri.startswith("models:/m-"):  # m-<id>: logged, unregistered
        name, version, alias = _parse_models_uri(model_uri)
        if alias:
            version = alias_version(name, alias, tracking_uri) or ""
        info.update({"name": name, "version": version, "alias": alias})
    return ens, info
