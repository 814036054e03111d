"""MLflow tracking against a real SQLite store in a temporary folder (no server)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import pytest
import yaml

from robustseg import tracking
from robustseg.config import ExperimentConfig, SourceSpec

EXPERIMENT = "robustseg-test"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """One store per module: creating the SQLite schema costs seconds."""
    work = tmp_path_factory.mktemp("tracking")
    c = ExperimentConfig(name="track")
    c.tracking.workdir = str(work)
    c.tracking.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    c.tracking.experiment = EXPERIMENT
    c.model.params = {"filters_base": 8, "max_stages": 3}
    c.data.shards_uri = str(work / "shards")
    return c


@pytest.fixture(scope="module")
def client(cfg: ExperimentConfig) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking.tracking_uri)


def _artifacts(client: Any, run_id: str, path: str = "") -> List[str]:
    out = []
    for f in client.list_artifacts(run_id, path or None):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _expected_commit() -> str:
    here = Path(tracking.__file__).parent
    try:
        return subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --------------------------------------------------------------------------- no store needed
def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = ExperimentConfig()
    c.tracking.workdir = str(tmp_path / "w")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(c) == f"sqlite:///{(tmp_path / 'w').resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri(c).startswith("sqlite:////")  # absolute path
    assert tracking.artifact_location(c) == (tmp_path / "w" / "mlartifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(c) == "http://127.0.0.1:5000"
    c.tracking.tracking_uri = "sqlite:////elsewhere/m.db"
    assert tracking.resolve_tracking_uri(c) == "sqlite:////elsewhere/m.db"


def test_flatten_config_dotted_stringified_redacted(cfg: ExperimentConfig) -> None:
    c = ExperimentConfig.from_dict(cfg.to_dict())
    c.data.storage.secret_key = "very-secret"
    c.data.shards_uri = "s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&secret_key=abc"
    c.data.sources = [SourceSpec(name="synthetic_cmr", path="", options={"blob": "x" * 10000})]
    flat = tracking.flatten_config(c)
    assert all(isinstance(v, str) for v in flat.values())
    assert flat["optim.lr"] == "0.002" and flat["model.name"] == "unet2d"  # AdamW's default rate
    assert flat["model.params.filters_base"] == "8"
    assert json.loads(flat["data.cmr.crop_size"]) == list(c.data.cmr.crop_size)  # lists as JSON
    assert flat["regime.params"] == "{}"
    assert flat["data.storage.secret_key"] == "***" and "abc" not in flat["data.shards_uri"]
    assert "very-secret" not in json.dumps(flat)
    assert len(flat["data.sources"]) == tracking.MAX_PARAM_VALUE and flat["data.sources"].endswith("...")
    # optim.lr null = the optimiser's default: the param says which number trained.
    assert tracking.flatten_config(c.with_overrides(["optim.lr=null", "optim.name=adamw"]))["optim.lr"] == "0.002"
    assert tracking.flatten_config(c.with_overrides(["optim.lr=null", "optim.name=sgd"]))["optim.lr"] == "0.01"


def test_run_tags(cfg: ExperimentConfig) -> None:
    tags = tracking.run_tags(cfg, trial="t1", dropped=None)
    assert tags["backbone"] == "unet2d" and tags["regime"] == "supervised" and tags["fold"] == "0"
    assert tags["data_manifest_uri"] == (Path(cfg.data.shards_uri) / "manifest.json").as_uri()
    assert {f"version.{p}" for p in ("robustseg", "torch", "monai", "ray", "mlflow")} <= set(tags)
    assert tags["trial"] == "t1" and "dropped" not in tags
    commit = _expected_commit()
    assert tags.get("git_commit", "") == commit
    if commit:
        assert tags["mlflow.source.git.commit"] == commit and tags["git_dirty"] in ("true", "false")


# --------------------------------------------------------------------------- runs
def test_tracked_run_logs_params_tags_and_config(cfg: ExperimentConfig, client: Any) -> None:
    with tracking.tracked_run(cfg, "plain", nested_tags={"purpose": "test"}) as run:
        run_id = run.info.run_id
        assert run.info.status == "RUNNING"
    run = client.get_run(run_id)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == EXPERIMENT and exp.artifact_location == tracking.artifact_location(cfg)
    assert run.info.status == "FINISHED" and run.info.run_name == "plain"
    assert run.data.params == tracking.flatten_config(cfg)
    assert run.data.tags["purpose"] == "test" and run.data.tags["backbone"] == "unet2d"
    assert run.data.tags["version.mlflow"] and run.data.tags.get("git_commit", "") == _expected_commit()
    path = client.download_artifacts(run_id, "config/config.yaml")
    assert ExperimentConfig.from_dict(yaml.safe_load(Path(path).read_text())).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("exc, status", [(ValueError("bad input"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_tracked_run_never_left_running(cfg: ExperimentConfig, client: Any, exc: BaseException, status: str) -> None:
    with pytest.raises(type(exc)):
        with tracking.tracked_run(cfg, f"dies-{status}") as run:
            run_id = run.info.run_id
            raise exc
    run = client.get_run(run_id)
    assert run.info.status == status and run.info.end_time is not None
    assert run.data.tags["error"].startswith(type(exc).__name__)
    assert "error.txt" in _artifacts(client, run_id)


def _history() -> List[Dict[str, float]]:
    return [{"epoch": e, "loss": 1.0 / e, "ce": 0.5 / e, "dice_loss": 0.5 / e, "lr": 0.01 / e, "slices_per_s": 100.0 + e,
             "epoch_seconds": 2.0, "val_dice": 0.5 + 0.1 * e, "val_dice_LV": 0.6 + 0.1 * e, "val_dice_MYO": float("nan"),
             "is_best": 1.0} for e in (1, 2, 3)]


def _result(tmp: Path, cfg: ExperimentConfig, history: List[Dict[str, float]]) -> SimpleNamespace:
    from robustseg.engine.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp / "best.pt", {"model": {}, "config": cfg.to_dict(), "layout": {"height": 64},
                                             "plan": {"plan": "cmr", "target_spacing": [1.5, 1.5]}})
    return SimpleNamespace(best_score=0.8, best_epoch=3, epochs_run=3, stopped_early=False, history=history,
                           last_checkpoint=ckpt, best_checkpoint=ckpt)


def test_fit_tracker_logs_epochs_and_artifacts(cfg: ExperimentConfig, client: Any, tmp_path: Path) -> None:
    uri = cfg.tracking.tracking_uri
    tracker = tracking.FitTracker(cfg, uri, EXPERIMENT, "fit-run", tags={"trial": "t0"})
    on_epoch = tracking.callback(tracker)
    history = _history()
    for h in history:
        on_epoch(int(h["epoch"]), dict(h, note="text"), tmp_path / "last.pt")
    (tmp_path / "val_cases.csv").write_text("case,dice\na,0.8\n")
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "case_a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    tracker.finish(_result(tmp_path, cfg, history), tmp_path)

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial"] == "t0"
    steps = [(m.step, round(m.value, 6)) for m in client.get_metric_history(tracker.run_id, "val_dice")]
    assert sorted(steps) == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert {"loss", "ce", "dice_loss", "lr", "slices_per_s", "val_dice_LV", "is_best"} <= set(run.data.metrics)
    assert "epoch" not in run.data.metrics and "note" not in run.data.metrics
    assert "val_dice_MYO" not in run.data.metrics  # NaN is not logged
    assert run.data.metrics["best_val_dice"] == pytest.approx(0.8)
    assert run.data.metrics["best_val_dice_LV"] == pytest.approx(0.9)
    assert run.data.metrics["best_epoch"] == 3 and run.data.metrics["epochs_run"] == 3
    assert run.data.tags["epochs_done"] == "3" and run.data.tags["best_checkpoint"].endswith("best.pt")
    arts = set(_artifacts(client, tracker.run_id))
    assert {"config/config.yaml", "history.json", "plots/learning_curve.png", "metrics/val_cases.csv",
            "overlays/case_a.png", "preprocessing/plan.json", "preprocessing/layout.json"} <= arts
    plan = json.loads(Path(client.download_artifacts(tracker.run_id, "preprocessing/plan.json")).read_text())
    assert plan["target_spacing"] == [1.5, 1.5]
    assert "artifact_errors" not in run.data.tags


def test_fit_tracker_survives_a_logging_failure(cfg: ExperimentConfig, client: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = tracking.FitTracker(cfg, cfg.tracking.tracking_uri, EXPERIMENT, "flaky")
    shared = tracking._client(cfg.tracking.tracking_uri)
    real = shared.log_batch
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("tracking server unreachable")
        return real(*args, **kwargs)

    monkeypatch.setattr(shared, "log_batch", flaky)
    tracker.on_epoch(1, {"loss": 1.0}, tmp_path / "last.pt")  # fails in the background, kept and sent again
    tracker.on_epoch(2, {"loss": 0.5}, tmp_path / "last.pt")
    assert tracker.flush(30)
    monkeypatch.undo()
    assert calls["n"] >= 2
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == [1, 2]
    assert client.get_run(tracker.run_id).data.tags["epochs_done"] == "2"
    tracker.fail(RuntimeError("worker lost"))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "worker lost" in run.data.tags["error"]


def test_nested_sweep_trial_fold_runs(cfg: ExperimentConfig, client: Any, tmp_path: Path) -> None:
    uri = cfg.tracking.tracking_uri
    sweep = tracking.sweep_parent(cfg, "sweep-a", tags={"space": "unet2d"})
    trial_cfg = cfg.with_overrides(["optim.lr=0.001"])
    trial = tracking.child_run(trial_cfg, sweep, "trial-0", trial_number=0)
    folds = {}
    for k in (0, 1):
        fold_cfg = trial_cfg.with_overrides([f"data.val_fold={k}"])
        folds[k] = tracking.FitTracker(fold_cfg, uri, EXPERIMENT, f"trial-0-fold{k}", parent_run_id=trial)
        folds[k].on_epoch(1, {"val_dice": 0.5 + k / 10}, tmp_path / "last.pt")
    # A restarted worker re-attaches to its unfinished fold run instead of starting a new one.
    again = tracking.FitTracker(trial_cfg.with_overrides(["data.val_fold=1"]), uri, EXPERIMENT, "trial-0-fold1",
                                parent_run_id=trial)
    assert again.run_id == folds[1].run_id
    assert tracking.child_run(trial_cfg, sweep, "trial-0", trial_number=0) == trial
    mean = tracking.finish_trial(uri, trial, {0: 0.5, 1: 0.6})
    assert mean == pytest.approx(0.55)

    s, t = client.get_run(sweep), client.get_run(trial)
    assert s.data.tags[tracking.ROLE] == "sweep" and s.data.tags["space"] == "unet2d" and s.info.run_name == "sweep-a"
    assert t.data.tags[tracking.PARENT] == sweep and t.data.tags[tracking.ROLE] == "trial"
    assert t.data.tags[tracking.SWEEP] == "sweep-a" and t.data.tags[tracking.TRIAL_NUMBER] == "0"
    assert t.data.params["optim.lr"] == "0.001" and t.info.status == "FINISHED"
    assert t.data.metrics["cv_val_dice"] == pytest.approx(0.55) and t.data.metrics["val_dice_fold1"] == pytest.approx(0.6)
    for k, tr in folds.items():
        f = client.get_run(tr.run_id)
        assert f.data.tags[tracking.PARENT] == trial and f.data.tags["fold"] == str(k)
        assert f.data.tags[tracking.ROLE] == "fold" and f.data.params["data.val_fold"] == str(k)
    children = client.search_runs([s.info.experiment_id], f"tags.`mlflow.parentRunId` = '{trial}'")
    assert {r.info.run_id for r in children} == {tr.run_id for tr in folds.values()}
    # A finished trial is not re-opened; a resumed sweep is.
    partial = tracking.child_run(trial_cfg, sweep, "trial-0")
    assert partial != trial
    assert math.isnan(tracking.finish_trial(uri, partial, {0: 0.9, 1: float("nan")}, status="FAILED"))
    p = client.get_run(partial)
    assert p.info.status == "FAILED" and "cv_val_dice" not in p.data.metrics and "val_dice_fold0" in p.data.metrics
    assert tracking.sweep_parent(cfg, "sweep-a", resume=True) == sweep
    assert tracking.sweep_parent(cfg, "sweep-a") != sweep


def test_require_store_never_creates_and_names_the_path(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "mlflow.db"
    assert tracking.local_store_path(f"sqlite:///{db}") == db
    assert tracking.local_store_path(f"sqlite:///{db}?timeout=5") == db
    assert tracking.local_store_path((tmp_path / "mlruns").as_uri()) == tmp_path / "mlruns"
    for remote in ("http://127.0.0.1:5000", "https://mlflow.example.org", "databricks", "sqlite://"):
        assert tracking.local_store_path(remote) is None
        assert tracking.require_store(remote) == remote  # a server is asked, not checked here
    for uri in (f"sqlite:///{db}", (tmp_path / "sub" / "mlruns").as_uri()):
        with pytest.raises(tracking.TrackingStoreError, match=f"{tmp_path / 'sub'}.* does not exist"):
            tracking.require_store(uri)
    assert not (tmp_path / "sub").exists()
    db.parent.mkdir()
    db.touch()
    assert tracking.require_store(f"sqlite:///{db}") == f"sqlite:///{db}"


def test_fit_tracker_logs_best_weights_and_no_scratch_paths(cfg: ExperimentConfig, client: Any, tmp_path: Path) -> None:
    """The best weights become the run artifact ``checkpoints/best.pt`` (what ``regime.init: runs:/<id>``
    loads); a checkpoint folder under the temp folder (a worker's scratch) is never recorded."""
    import tempfile

    import torch

    from robustseg.engine.checkpoint import CheckpointError, save_checkpoint
    from robustseg.engine.init import apply_init, resolve_init
    from robustseg.models import build_model

    assert str(tmp_path).startswith(str(Path(tempfile.gettempdir()).resolve()))  # scratch, as a worker's is
    model = build_model(cfg.model, (64, 64), None)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = save_checkpoint(tmp_path / "last.pt", {"model": weights, "config": cfg.to_dict(), "backbone": cfg.model.name})
    result = SimpleNamespace(best_score=0.7, best_epoch=1, epochs_run=1, stopped_early=False, history=_history()[:1],
                             last_checkpoint=ckpt, best_checkpoint=None)  # no best.pt: last.pt is logged as best
    tracker = tracking.FitTracker(cfg, cfg.tracking.tracking_uri, EXPERIMENT, "weights-run")
    tracker.on_epoch(1, {"loss": 1.0}, tmp_path / "last.pt")
    tracker.finish(result, tmp_path)
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["best_checkpoint"] == f"runs:/{tracker.run_id}/checkpoints/best.pt"
    assert "last_checkpoint" not in tags and not any(str(tmp_path) in v for v in tags.values())
    assert "checkpoints/best.pt" in _artifacts(client, tracker.run_id)

    # Durable copies are recorded as given.
    other = tracking.FitTracker(cfg, cfg.tracking.tracking_uri, EXPERIMENT, "durable-run")
    other.finish(result, tmp_path, last_checkpoint="s3://bucket/runs/fold0/checkpoint_000001/last.pt")
    assert client.get_run(other.run_id).data.tags["last_checkpoint"] == \
        "s3://bucket/runs/fold0/checkpoint_000001/last.pt"

    # regime.init: runs:/<id> downloads the artifact, even once the fit's folder is gone.
    (tmp_path / "last.pt").unlink()
    init_cfg = cfg.with_overrides([f"regime.init=runs:/{tracker.run_id}"])
    fresh = build_model(cfg.model, (64, 64), None)
    state = apply_init(fresh, resolve_init(init_cfg), init_cfg)
    assert "checkpoints/best.pt" in state.where
    assert all(torch.equal(fresh.state_dict()[k], weights[k]) for k in weights)

    # A run without the artifact whose tags name nothing that exists: every attempt is listed.
    bare = tracking.FitTracker(cfg, cfg.tracking.tracking_uri, EXPERIMENT, "bare-run")
    tracking.end_run(cfg.tracking.tracking_uri, bare.run_id, "FINISHED")
    client.set_tag(bare.run_id, "best_checkpoint", str(tmp_path / "gone" / "best.pt"))
    with pytest.raises(CheckpointError, match=r"checkpoint not found; tried artifact checkpoints/best.pt.*"
                                              r"best_checkpoint tag .*gone/best.pt: not found"):
        resolve_init(cfg.with_overrides([f"regime.init=runs:/{bare.run_id}"]))
