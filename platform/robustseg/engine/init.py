"""Initialise a model from earlier training: pooled pre-training -> fine-tuning (`regime.init`).

``regime.init`` names where the starting weights come from:

* a checkpoint file (``best.pt``/``last.pt`` of `robustseg train`);
* an ensemble folder or a registered model (``models:/robustseg-cmr@champion``): the member
  named by ``regime.init_member``, else the first member with the same backbone;
* a checkpoint in durable storage (``s3://bucket/.../best.pt``; endpoint from ``data.storage``);
* an MLflow run (``runs:/<run_id>``): its ``checkpoints/best.pt`` artifact (what the fit
  tracker logs), else the run's ``best_checkpoint`` tag when that names an existing path or
  URI, else ``best.pt`` beside its ``last_checkpoint``: any node can resolve it.

Reset rules: the optimiser and LR schedule start fresh by default (``init_optimizer: fresh``,
what fine-tuning after pre-training on another pool usually wants); ``init_optimizer:
checkpoint`` continues the source checkpoint's optimiser state (same backbone and optimiser
only). ``init_lr_scale`` scales ``optim.lr`` for the fine-tuning run (e.g. 0.1).
``init_strict: false`` loads only the parameters whose names and shapes match (e.g. a head with
another number of classes) and reports what it skipped. A run that resumes from its own
``last.pt`` ignores ``init``: its own state is newer.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from robustseg import durable
from robustseg.config import ExperimentConfig, StorageConfig
from robustseg.engine.checkpoint import CheckpointError, load_checkpoint, load_model_state, unwrap


@dataclass
class InitState:
    """Weights (and optionally optimiser state) to start from.

    Attributes:
        model: State dict.
        backbone: Backbone that produced it.
        where: Human-readable source (for messages and the run's tags).
        optimizer: Optimiser state of a full checkpoint, or None.
        skipped: Parameters left at their fresh values (non-strict loading).
    """

    model: Dict[str, torch.Tensor]
    backbone: str
    where: str
    optimizer: Optional[Dict[str, Any]] = None
    skipped: List[str] = field(default_factory=list)


def _from_checkpoint(path: Path) -> InitState:
    ckpt = load_checkpoint(path, map_location="cpu")
    return InitState(ckpt["model"], str(ckpt.get("backbone") or ckpt["config"]["model"]["name"]), str(path),
                     ckpt.get("optimizer"))


def _from_ensemble(uri: str, backbone: str, member: str, tracking_uri: Optional[str]) -> InitState:
    from robustseg.ensemble.registry import load_ensemble

    # The config's own store: MLflow's default would be (and create) ./mlflow.db.
    ens, _ = load_ensemble(uri, tracking_uri=tracking_uri, device=torch.device("cpu"))
    names = [m.name for m in ens.spec.members]
    for spec, pred in zip(ens.spec.members, ens.predictors):
        if (member and spec.name == member) or (not member and spec.backbone == backbone):
            return InitState(unwrap(pred.model).state_dict(), spec.backbone, f"{uri} member {spec.name}")
    want = f"member {member!r}" if member else f"a {backbone!r} member"
    raise CheckpointError(f"{uri}: no {want} among {names}; set regime.init_member")


def _from_uri(uri: str, storage: Optional[StorageConfig], where: Optional[str] = None) -> InitState:
    """A checkpoint file at a path or storage URI (remote files are fetched to a temp folder first)."""
    if not durable.is_remote(uri):
        return _from_checkpoint(Path(durable.absolute(uri)))
    with tempfile.TemporaryDirectory(prefix="robustseg-init-") as tmp:
        state = _from_checkpoint(durable.download_file(uri, Path(tmp) / "best.pt", storage))
    state.where = where or uri
    return state


def _run_artifact(run_id: str, tracking_uri: Optional[str], uri: str) -> Tuple[Optional[InitState], str]:
    """The run's ``checkpoints/best.pt`` artifact, or None and why not."""
    import mlflow.artifacts

    from robustseg.tracking_fit import BEST_ARTIFACT

    with tempfile.TemporaryDirectory(prefix="robustseg-init-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=BEST_ARTIFACT,
                                                        tracking_uri=tracking_uri, dst_path=tmp)
        except Exception as e:  # MlflowException, OSError: not there (an older run) or unreachable
            return None, f"artifact {BEST_ARTIFACT} ({str(e).splitlines()[0][:200]})"
        state = _from_checkpoint(Path(local))
    state.where = f"{uri} ({BEST_ARTIFACT})"
    return state, f"artifact {BEST_ARTIFACT}"


def _from_run(uri: str, tracking_uri: Optional[str], storage: Optional[StorageConfig] = None) -> InitState:
    """Weights of an MLflow training run: its artifact, else the checkpoints its tags name.

    Raises:
        CheckpointError: no such run, or none of the candidates exists (each one is listed).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from robustseg.tracking_store import require_store

    run_id = uri[len("runs:/"):].strip("/").split("/", 1)[0]
    if tracking_uri:
        require_store(tracking_uri)  # reading must never create an empty store
    try:
        tags = MlflowClient(tracking_uri).get_run(run_id).data.tags
    except MlflowException as e:
        raise CheckpointError(f"{uri}: no such MLflow run ({str(e).splitlines()[0]})") from None
    state, tried = _run_artifact(run_id, tracking_uri, uri)
    if state is not None:
        return state
    attempts = [tried]
    candidates = [("best_checkpoint tag", tags.get("best_checkpoint"))]
    if tags.get("last_checkpoint"):
        candidates.append(("best.pt beside the last_checkpoint tag",
                           durable.join(tags["last_checkpoint"].rsplit("/", 1)[0], "best.pt")))
    for what, where in candidates:
        if not where or where.startswith("runs:/"):  # a runs:/ tag is the artifact tried above
            attempts.append(f"{what}: {where or 'not set'}")
            continue
        try:
            if durable.exists(where, storage):
                return _from_uri(where, storage, f"{uri} ({where})")
            attempts.append(f"{what} {where}: not found")
        except OSError as e:
            attempts.append(f"{what} {where}: {e}")
    raise CheckpointError(f"{uri}: checkpoint not found; tried " + "; ".join(attempts))


def resolve_init(cfg: ExperimentConfig) -> Optional[InitState]:
    """The `InitState` named by ``cfg.regime.init`` (None when empty).

    Raises:
        CheckpointError: a source that does not exist or holds no matching weights.
    """
    spec = cfg.regime.init
    if not spec:
        return None
    if spec.startswith("runs:/"):
        from robustseg.tracking_store import resolve_tracking_uri

        return _from_run(spec, resolve_tracking_uri(cfg), cfg.data.storage)
    if spec.startswith("models:/"):
        from robustseg.tracking_store import resolve_tracking_uri

        return _from_ensemble(spec, cfg.model.name, cfg.regime.init_member, resolve_tracking_uri(cfg))
    if durable.is_remote(spec):
        return _from_uri(spec, cfg.data.storage)
    if (Path(spec) / "spec.json").is_file():
        return _from_ensemble(spec, cfg.model.name, cfg.regime.init_member, None)
    return _from_checkpoint(Path(spec))


def _is_3d(backbone: str) -> bool:
    from robustseg.models import spatial_dims

    return spatial_dims(backbone) == 3


def apply_init(model: torch.nn.Module, state: InitState, cfg: ExperimentConfig) -> InitState:
    """Load ``state`` into ``model`` (strictly, or matching parameters only).

    A 3D source into a 2D model is flattened (``regime.init_flatten``); strict loading then
    requires every 2D parameter to get a weight.

    Raises:
        CheckpointError: strict loading of weights that do not fit, or nothing matching at all.
    """
    if _is_3d(state.backbone) and not _is_3d(cfg.model.name):
        from robustseg.models.transfer import flatten_3d_to_2d

        report = flatten_3d_to_2d(state.model, unwrap(model), mode=cfg.regime.init_flatten)
        if not report["flattened"]:
            raise CheckpointError(f"{state.where}: no 3D kernel of the {state.backbone} weights fits the "
                                  f"{cfg.model.name} model (same stage count and filters needed)")
        if cfg.regime.init_strict and report["missing"]:
            raise CheckpointError(f"{state.where}: flattening leaves {len(report['missing'])} {cfg.model.name} "
                                  f"parameters without weights (e.g. {report['missing'][:3]}); "
                                  "set regime.init_strict: false to keep them fresh")
        state.skipped = report["missing"]
        return state
    if cfg.regime.init_strict:
        load_model_state(model, state.model, state.where, cfg.model.name, state.backbone)
        return state
    own = unwrap(model).state_dict()
    fit = {k: v for k, v in state.model.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fit:
        raise CheckpointError(f"{state.where}: no parameter matches the {cfg.model.name} model by name and shape")
    state.skipped = sorted(k for k in own if k not in fit)
    unwrap(model).load_state_dict({**own, **fit})
    return state


__all__ = ["InitState", "apply_init", "resolve_init"]
