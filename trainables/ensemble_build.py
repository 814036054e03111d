"""`robustseg ensemble`: sweep -> best config per backbone -> K fold models -> ensemble -> registry.

1. Resolve the sweep (its folder, its name under the storage path, or its MLflow run id) and
   read ``trials.json`` written by `trainables.tune_driver.run_sweep`.
2. Per backbone, take the best trial (completed trials first; a trial stopped early by ASHA
   only when the backbone has no completed one) and its K fold models. Folds the sweep trained
   are reused as stored; missing ones (stopped trials) are trained now with
   `trainables.train_fold.run_fold`, under the same run names, so a rerun reuses them too.
3. Evaluate every fold model and the cross-architecture ensemble out of fold on the same
   cases (`robustseg.engine.oof`) and log the comparison (table + plot) to an MLflow
   ``ensemble`` run nested under the sweep run. The run names what was selected (param
   ``selected_backbones``, param ``selection``, tag ``robustseg.ensemble_kind``, description):
   when one backbone wins, the model is a *fold ensemble of that backbone* and its
   ``oof_dice_ensemble`` equals that backbone's out-of-fold Dice.
4. Build the `robustseg.ensemble.Ensemble` over all backbones x folds, log it as a pyfunc
   model in that run and register it (alias ``champion`` by default).

Where things live (`robustseg.durable`): the sweep, its fold runs and the ensemble folder
(``<sweep>/ensemble/model``) are in the durable storage (``tracking.storage_uri``, a local folder
or S3 reached with ``data.storage``); the registered model's artifacts are in MLflow's artifact
store. For a sweep on S3 the folder is built in a local temp folder and copied up.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from robustseg import durable
from robustseg.config import ExperimentConfig, StorageConfig
from robustseg.ensemble import Ensemble, EnsembleSpec, MemberSpec, label_convention
from robustseg.errors import RobustsegError
from search_spaces import apply_sample
from trainables.tune_driver import SWEEP_FILE, TRIALS_FILE, SweepError, read_json, storage_root
from trainables.tune_tracking import fold_run_name, fold_storage_name, fold_tags
from trainables.tune_trial import fold_config

BEST_FILE = "best.pt"


class EnsembleBuildError(RobustsegError, RuntimeError):
    """An ensemble that cannot be built (no usable trial for a backbone, a fold that failed)."""


@dataclass
class Choice:
    """The trial chosen for one backbone."""

    backbone: str
    trial: str  # Tune trial name (trial_<n>_<id>): prefix of its fold runs and its MLflow run name
    cfg: ExperimentConfig
    cv_dice: float
    status: str


@dataclass
class EnsembleBuild:
    """What `build_ensemble` produced."""

    ensemble: Ensemble
    folder: Path
    choices: List[Choice]
    summary: List[Dict[str, Any]]
    rows: List[Dict[str, Any]] = field(repr=False)
    sweep_path: str = ""
    run_id: Optional[str] = None
    model_uri: Optional[str] = None
    version: Optional[str] = None
    #: Where the ensemble folder lives durably (== ``folder`` when that is already durable).
    stored: str = ""


def resolve_sweep(sweep: str, *, storage_path: Optional[str] = None, cfg: Optional[ExperimentConfig] = None,
                  tracking_uri: Optional[str] = None, experiment: str = "") -> str:
    """The folder of a sweep given as a folder, a name under the storage path, or an MLflow run id/name.

    Args:
        sweep: Sweep folder (path or URI), name, or MLflow run id / name.
        storage_path: Overrides the config's storage (`robustseg.durable.storage_uri`).
        cfg: Config naming the storage (``tracking.storage_uri``) and its S3 settings (``data.storage``).
        tracking_uri: MLflow store to look a run id or name up in.
        experiment: MLflow experiment of a sweep given by name.

    Raises:
        SweepError: nothing matches (the message lists what was tried).
    """
    cfg = cfg or ExperimentConfig(name="ensemble")
    io = cfg.data.storage

    def has_sweep(folder: str) -> bool:
        return durable.exists(durable.join(folder, SWEEP_FILE), io)

    tried = [sweep]
    if has_sweep(sweep):
        return durable.absolute(sweep)
    cand = durable.join(storage_root(cfg, storage_path), sweep)
    tried.append(cand)
    if has_sweep(cand):
        return cand
    if tracking_uri:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from robustseg.tracking_tags import SWEEP
        from trainables.tune_tracking import SWEEP_PATH

        client = MlflowClient(tracking_uri)
        tags: Dict[str, str] = {}
        try:
            tags = client.get_run(sweep).data.tags
        except MlflowException:
            exp = client.get_experiment_by_name(experiment) if experiment else None
            if exp is not None:
                runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP}` = '{sweep}' and "
                                          "tags.`robustseg.role` = 'sweep'", order_by=["attributes.start_time DESC"])
                tags = runs[0].data.tags if runs else {}
        tried.append(f"MLflow run {sweep} at {tracking_uri}")
        if tags.get(SWEEP_PATH) and has_sweep(tags[SWEEP_PATH]):
            return tags[SWEEP_PATH]
    raise SweepError(f"sweep {sweep!r} not found (tried: {'; '.join(tried)})")


def choose_trials(path: str, backbones: Optional[Sequence[str]] = None, storage: Optional[StorageConfig] = None
                  ) -> Tuple[ExperimentConfig, List[Choice], int]:
    """Base config, the best trial per backbone, and the sweep's number of folds.

    Args:
        path: The sweep folder (path or URI).
        backbones: Backbones wanted (default: all with a usable trial).
        storage: S3 settings for a sweep on S3 (``data.storage``).

    Raises:
        EnsembleBuildError: a requested backbone has no usable trial.
    """
    meta = read_json(durable.join(path, SWEEP_FILE), storage)
    base = ExperimentConfig.from_dict(meta["base"])
    trials = read_json(durable.join(path, TRIALS_FILE), storage)
    best: Dict[str, Choice] = {}
    rank = {"COMPLETE": 1, "STOPPED": 0}
    for t in trials["trials"]:
        score = t.get("cv_dice")
        if t["status"] not in rank or not isinstance(score, (int, float)) or not math.isfinite(score):
            continue
        cfg = ExperimentConfig.from_dict(apply_sample(base.to_dict(), t["sample"]))
        b = cfg.model.name
        c = Choice(b, t.get("name") or t["trial"], cfg, float(score), t["status"])
        old = best.get(b)
        if old is None or (rank[c.status], c.cv_dice) > (rank[old.status], old.cv_dice):
            best[b] = c
    wanted = list(backbones) if backbones else sorted(best)
    missing = [b for b in wanted if b not in best]
    if missing or not wanted:
        raise EnsembleBuildError(f"sweep {path}: no completed or stopped trial for backbone(s) {missing or wanted}; "
                                 f"available: {sorted(best) or 'none'}")
    return base, [best[b] for b in wanted], int(trials.get("folds", base.data.folds))


def fetch_best(checkpoint_dir: str, dest: Path, storage: Optional[StorageConfig] = None) -> Path:
    """Copy ``best.pt`` from a (local or remote) Ray checkpoint folder to ``dest``.

    Args:
        checkpoint_dir: ``run_fold(...)["checkpoint"]``: a path or a complete URI.
        dest: Local file to write.
        storage: S3 settings for a URI (``data.storage``).
    """
    return durable.download_file(durable.join(checkpoint_dir, BEST_FILE), dest, storage)


def fold_models(path: str, choice: Choice, folds: int, *, mlflow: Optional[Dict[str, Any]] = None
                ) -> Dict[int, Dict[str, Any]]:
    """`run_fold` summaries of the chosen trial's folds: stored ones as they are, missing ones trained.

    Raises:
        EnsembleBuildError: a fold failed or left no checkpoint.
    """
    from trainables.train_fold import run_fold, stored_result

    # Reading a finished run back logs a paragraph per fold about resuming: not news here.
    logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager").setLevel(logging.WARNING)
    out = {}
    sweep = path.rstrip("/").rsplit("/", 1)[-1]
    for k in range(folds):
        name = fold_storage_name(choice.trial, k)
        folds_path = durable.join(path, "folds")
        prior = stored_result(folds_path, name, storage=choice.cfg.data.storage)
        if prior is None or float((prior.metrics or {}).get("epoch", 0)) < choice.cfg.optim.epochs:
            from trainables.ray_session import init_ray

            init_ray()
            print(f"  training {choice.backbone} fold {k} ({name}): not finished in the sweep", flush=True)
        ml = dict(mlflow, run_name=fold_run_name(choice.trial, k), tags=fold_tags(sweep, choice.trial, k)) if mlflow else None
        res = run_fold(fold_config(choice.cfg, k), storage_path=folds_path, run_name=name, mlflow=ml)
        if res.get("error") or not res.get("checkpoint"):
            raise EnsembleBuildError(f"{choice.backbone} fold {k} ({name}): {res.get('error') or 'no checkpoint'}")
        out[k] = res
    return out


def build_ensemble(sweep: str, *, storage_path: Optional[str] = None, backbones: Optional[Sequence[str]] = None,
                   folds: Optional[int] = None, combine: str = "mean", weights: Optional[Mapping[str, float]] = None,
                   tta: Optional[bool] = None, centring: str = "two_stage", locators: Optional[Sequence[str]] = None,
                   select: str = "best",
                   register: Optional[str] = "robustseg-cmr", alias: Optional[str] = "champion",
                   tracking: bool = True, tracking_uri: Optional[str] = None, out_dir: Optional[Path] = None,
                   device: Optional[torch.device] = None, max_oof_cases: Optional[int] = None,
                   progress: Optional[Callable[..., Any]] = None, cfg: Optional[ExperimentConfig] = None
                   ) -> EnsembleBuild:
    """Build, evaluate, log and register the fold-by-architecture ensemble of a sweep.

    Raises:
        EnsembleBuildError: no usable trial, a failed fold, or a bad ``folds``/``select``.

    Args:
        sweep: Sweep folder, name under the storage path, or MLflow run id / name.
        storage_path: Storage the sweep used; overrides the storage of ``cfg``
            (`robustseg.durable.storage_uri`: ``tracking.storage_uri``, ``$ROBUSTSEG_STORAGE_URI``,
            ``<workdir>/ray_results``).
        backbones: Backbones to include (default: every backbone with a usable trial).
        folds: Use the first N of the sweep's folds (default all; more than the sweep's K is
            refused: folds are fixed when the data is prepared).
        combine: "mean" or "vote".
        weights: Per-backbone weights (default equal).
        tta: Mirror TTA (default: the chosen configs' ``inference.tta``).
        centring: "two_stage" or "image" (`robustseg.ensemble`).
        locators: Backbones used by the first (centring) stage (default all).
        select: "best": register the backbone combination (or single backbone's folds) with the
            best out-of-fold Dice; "all": every chosen backbone, whatever the numbers say.
        register: Registered model name (None: log only).
        alias: Alias for the new version (None: none).
        tracking: Log to MLflow (False: build and evaluate only; nothing registered).
        tracking_uri: MLflow URI (default: the sweep's).
        out_dir: Where the ensemble folder and checkpoints go, locally (default ``<sweep>/ensemble``
            for a local sweep; for a sweep on S3 a temp folder whose ``model`` folder is copied to
            ``<sweep>/ensemble/model`` in the bucket, see ``EnsembleBuild.stored``).
        device: Evaluation/inference device.
        max_oof_cases: Most out-of-fold cases per fold.
        progress: tqdm-like factory.
        cfg: Config naming the storage and its S3 settings (``data.storage``) to find the sweep
            in; the sweep's own base config is used once found.
    """
    from robustseg.data.manifest import read_manifest
    from robustseg.data.storage import open_store
    from robustseg.engine import oof
    from robustseg.tracking_store import resolve_tracking_uri

    io = (cfg or ExperimentConfig(name="ensemble")).data.storage
    path = resolve_sweep(sweep, storage_path=storage_path, cfg=cfg, tracking_uri=tracking_uri)
    base, choices, k_sweep = choose_trials(path, backbones, io)
    if select not in ("best", "all"):
        raise EnsembleBuildError(f"select must be 'best' or 'all', got {select!r}")
    k = folds or k_sweep
    if k > k_sweep or k < 1:
        raise EnsembleBuildError(f"--folds {k}: the sweep has {k_sweep} folds (fixed when the data was prepared)")
    uri = tracking_uri or resolve_tracking_uri(base)
    sweep_name = path.rstrip("/").rsplit("/", 1)[-1]
    sweep_run = trial_runs = None
    if tracking:
        from robustseg.tracking_tags import find_run_id

        sweep_run = find_run_id(uri, base.tracking.experiment, sweep_name)
        trial_runs = {c.trial: find_run_id(uri, base.tracking.experiment, c.trial, sweep_run) for c in choices}
    remote = out_dir is None and durable.is_remote(path)
    out = Path(out_dir) if out_dir else (Path(tempfile.mkdtemp(prefix="robustseg-ensemble-")) if remote else
                                         Path(path) / "ensemble")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    members, preds, by_arch = _load_members(path, choices, k, out, device, weights=weights, locators=locators,
                                            mlflow=({"tracking_uri": uri, "experiment": base.tracking.experiment}
                                                    if tracking else None), trial_runs=trial_runs or {})

    use_tta = bool(choices[0].cfg.inference.tta) if tta is None else bool(tta)
    store = open_store(base.data.shards_uri, base.data.storage)
    manifest = read_manifest(store)
    rows = oof.oof_evaluate(by_arch, store, manifest, tta=use_tta, weights=weights, max_cases=max_oof_cases,
                            progress=progress)
    summary = oof.summarise(rows)
    chosen = oof.select(summary) if select == "best" else summary[-1]  # the last row combines every backbone
    keep = oof.combination_of(chosen["model"])
    if keep != sorted(by_arch):
        dropped = sorted(set(by_arch) - set(keep))
        print(f"  selected {chosen['model']} (out-of-fold Dice {chosen['dice_mean']:.3f}); left out {dropped}: "
              "adding them lowered the out-of-fold Dice", flush=True)
    members, preds = zip(*[(m, p) for m, p in zip(members, preds) if m.backbone in keep])
    spec = _make_spec(register or f"ensemble-{sweep_name}", list(members), preds[0], base, choices, combine=combine,
                      tta=use_tta, centring=centring, metrics=_oof_metrics(summary, chosen, by_arch),
                      provenance={"sweep": sweep_name, "sweep_path": path, "selected": chosen["model"]})
    ens = Ensemble(spec, list(preds))
    folder = ens.save(out / "model")
    # A sweep on S3 keeps its ensemble folder there too: the local one is this node's copy.
    stored = durable.upload_dir(folder, durable.join(path, "ensemble", "model"), io) if remote else str(folder)
    build = EnsembleBuild(ens, folder, choices, summary, rows, sweep_path=path, stored=stored)
    if tracking:
        _track(build, base, uri, sweep_run, register, alias)
    return build


def _load_members(path: str, choices: Sequence[Choice], k: int, out: Path, device: torch.device, *,
                  weights: Optional[Mapping[str, float]], locators: Optional[Sequence[str]],
                  mlflow: Optional[Dict[str, Any]], trial_runs: Mapping[str, Optional[str]]
                  ) -> Tuple[List[MemberSpec], List[Any], Dict[str, Dict[int, Any]]]:
    """Every chosen trial's fold models: member specs, predictors, and ``{backbone: {fold: predictor}}``."""
    from robustseg.engine.predict import load_predictor
    from robustseg.tracking_tags import find_run_id

    members, preds, by_arch = [], [], {}
    for c in choices:
        parent = trial_runs.get(c.trial)
        runs = fold_models(path, c, k, mlflow=dict(mlflow, parent_run_id=parent) if mlflow and parent else None)
        by_arch[c.backbone] = {}
        for j, res in runs.items():
            name = f"{c.backbone}_fold{j}"
            ckpt = fetch_best(res["checkpoint"], out / "checkpoints" / f"{name}.pt", c.cfg.data.storage)
            p = load_predictor(ckpt, device)
            by_arch[c.backbone][j] = p
            preds.append(p)
            run_id = None
            if mlflow:  # fold runs of sweeps before `fold_run_name` carry the storage name
                for run_name in (fold_run_name(c.trial, j), fold_storage_name(c.trial, j)):
                    run_id = run_id or find_run_id(mlflow["tracking_uri"], mlflow["experiment"], run_name, parent)
            members.append(MemberSpec(name=name, backbone=c.backbone, fold=j,
                                      weight=float((weights or {}).get(c.backbone, 1.0)), run_id=run_id or "",
                                      source=f"{res['checkpoint']}/{BEST_FILE}",
                                      locator=not locators or c.backbone in locators))
    return members, preds, by_arch


def _make_spec(name: str, members: List[MemberSpec], first: Any, base: ExperimentConfig, choices: Sequence[Choice], *,
               combine: str, tta: bool, centring: str, metrics: Dict[str, float], provenance: Dict[str, str]
               ) -> EnsembleSpec:
    """The spec of the selected members, with provenance naming what was selected.

    ``selected_backbones`` and ``selection`` (`EnsembleSpec.composition`) say whether the
    selection is one backbone's folds (a *fold ensemble of <backbone>*, whose out-of-fold Dice is
    that backbone's) or an ensemble of architectures.
    """
    from robustseg.tracking_tags import git_commit, manifest_uri

    spec = EnsembleSpec(name=name, task=first.task, class_names=dict(first.class_names), members=members,
                        label_convention=label_convention(first.task, first.class_names), combine=combine, tta=tta,
                        postprocess=bool(first.cfg.inference.postprocess), centring=centring, metrics=metrics,
                        provenance={**provenance, "data_manifest": manifest_uri(base), "git_commit": git_commit(),
                                    "trials": ",".join(f"{c.backbone}={c.trial}" for c in choices)})
    spec.provenance.update(selected_backbones=",".join(spec.backbones), selection=spec.composition())
    return spec


def _oof_metrics(summary: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any], by_arch: Mapping[str, Any]
                 ) -> Dict[str, float]:
    """Out-of-fold Dice of every row, of the selection (``oof_dice_ensemble``) and of the best single backbone."""
    from robustseg.engine import oof

    metrics = {f"oof_dice_{oof.metric_key(r['model'])}": float(r["dice_mean"]) for r in summary}
    metrics["oof_dice_ensemble"] = float(chosen["dice_mean"])
    metrics["oof_dice_best_single"] = max(float(r["dice_mean"]) for r in summary if r["model"] in by_arch)
    return metrics


def _track(build: EnsembleBuild, base: ExperimentConfig, uri: str, sweep_run: Optional[str],
           register: Optional[str], alias: Optional[str]) -> None:
    """The MLflow ``ensemble`` run: params, OOF metrics, comparison table and plot, the model."""
    from mlflow import MlflowClient

    from robustseg.engine import oof
    from robustseg.engine.metrics import to_csv
    from robustseg.ensemble.registry import log_ensemble, register_ensemble
    from robustseg.tracking_runs import end_run
    from robustseg.tracking_store import ensure_experiment
    from robustseg.tracking_tags import PARENT, ROLE, SWEEP

    client = MlflowClient(uri)
    spec = build.ensemble.spec
    oof_dice = spec.metrics
    tags = {ROLE: "ensemble", SWEEP: spec.provenance.get("sweep", ""), "robustseg.ensemble_kind": spec.kind,
            "mlflow.note.content": f"**{spec.composition()}**: out-of-fold Dice {oof_dice['oof_dice_ensemble']:.4f} "
                                   f"(best single backbone {oof_dice['oof_dice_best_single']:.4f}). "
                                   f"Candidates: {', '.join(c.backbone for c in build.choices)}."}
    if build.stored and not durable.is_scratch(build.stored):
        tags["robustseg.ensemble_folder"] = build.stored
    if sweep_run:
        tags[PARENT] = sweep_run
    run = client.create_run(ensure_experiment(base, uri), run_name=f"ensemble-{spec.provenance.get('sweep')}", tags=tags)
    run_id = run.info.run_id
    try:
        for key, value in {"backbones": ",".join(c.backbone for c in build.choices),
                           "selected": spec.provenance.get("selected", ""),
                           "selected_backbones": ",".join(spec.backbones), "selection": spec.composition(),
                           "folds": len(
                {m.fold for m in spec.members}), "members": len(spec.members), "combine": spec.combine, "tta": spec.tta,
                "centring": spec.centring, **{f"trial.{c.backbone}": c.trial for c in build.choices}}.items():
            client.log_param(run_id, key, str(value))
        for c in build.choices:
            client.log_metric(run_id, f"cv_dice_{c.backbone}", c.cv_dice)
        for row in build.summary:
            for key, value in row.items():
                if key.startswith(("dice_", "hd95_")) and isinstance(value, float) and math.isfinite(value):
                    client.log_metric(run_id, f"oof_{key}_{oof.metric_key(row['model'])}", value)
        for key, value in spec.metrics.items():
            client.log_metric(run_id, key, value)
        with tempfile.TemporaryDirectory() as tmp:
            t = Path(tmp)
            to_csv(build.rows, t / "oof_cases.csv")
            to_csv(build.summary, t / "oof_comparison.csv")
            oof.plot_comparison(build.summary, spec.class_names, t / "oof_comparison.png")
            (t / "ensemble_spec.json").write_text(json.dumps(spec.to_dict(), indent=1))
            for f in t.iterdir():
                client.log_artifact(run_id, str(f), "oof")  # not "ensemble": that is the model's name
        build.model_uri = log_ensemble(build.ensemble, tracking_uri=uri, run_id=run_id)
        if register:
            build.version = register_ensemble(build.model_uri, tracking_uri=uri, name=register, alias=alias,
                                              spec=spec.to_dict(), tags={"run_id": run_id})
        end_run(uri, run_id, "FINISHED")
    except BaseException as e:
        end_run(uri, run_id, "FAILED", error=e)
        raise
    build.run_id = run_id


__all__ = ["Choice", "EnsembleBuild", "EnsembleBuildError", "build_ensemble", "choose_trials", "fetch_best",
           "fold_models", "resolve_sweep"]
