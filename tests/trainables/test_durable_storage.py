"""Durable storage on S3 (a moto server on 127.0.0.1 reached only through ``data.storage``): a fold
run on Ray Train with MLflow leaves nothing recorded on node-local disk and its weights load
through ``regime.init: runs:/<id>``; a sweep keeps its Tune results and bookkeeping in the bucket
and resumes from there."""
from __future__ import annotations

import fnmatch
import math
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import pytest

from robustseg import durable
from robustseg.config import ExperimentConfig
from ray_local import local_ray
from tiny import tiny_cfg

pytestmark = pytest.mark.slow

BUCKET = "robustseg-durable"
_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def ray_session():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the stub fold runner, in trial actors
    # The endpoint and keys reach Ray only through the config: nothing in the environment.
    with local_ray({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}, unset=_AWS_ENV) as ray:
        yield ray


def _storage(endpoint: str) -> Dict[str, str]:
    return {"data.storage.endpoint_url": endpoint, "data.storage.access_key": "testing",
            "data.storage.secret_key": "testing", "data.storage.region": "us-east-1"}


def _keys(cfg: ExperimentConfig, prefix: str) -> List[str]:
    """Every object under ``s3://BUCKET/<prefix>`` (keys relative to the bucket)."""
    import pyarrow.fs as pafs

    fs, root = durable.filesystem(f"s3://{BUCKET}/{prefix}", cfg.data.storage)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + 1:] for i in infos if i.type == pafs.FileType.File)


# --------------------------------------------------------------------------- one fold, MLflow
def test_fold_on_s3_records_only_durable_places(ray_session, s3_endpoint, tmp_path):
    import torch
    from mlflow import MlflowClient

    from robustseg.engine.checkpoint import load_checkpoint
    from robustseg.engine.init import apply_init, resolve_init
    from robustseg.engine.train import ensure_prepared
    from robustseg.models import build_model
    from trainables.ensemble_build import fetch_best
    from trainables.train_fold import history_of, run_fold, stored_result

    t0 = time.time()
    name = f"durable{uuid.uuid4().hex[:8]}"  # the worker's scratch folder is robustseg-<name>-rank0-*
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_cfg(tmp_path, **_storage(s3_endpoint), **{
        "name": name, "data.shards_uri": f"s3://{BUCKET}/shards", "tracking.storage_uri": f"s3://{BUCKET}/runs",
        "tracking.tracking_uri": db, "tracking.experiment": "durable"})
    ensure_prepared(cfg)  # the shards are in the bucket too: every node streams them from there
    storage = durable.storage_uri(cfg)
    assert storage == f"s3://{BUCKET}/runs"
    mlflow = {"tracking_uri": db, "experiment": "durable", "run_name": "fold0"}
    out = run_fold(cfg, storage_path=storage, run_name="fold0", mlflow=mlflow)
    assert out["error"] is None and math.isfinite(out["val_dice"])
    ckpt = out["checkpoint"]
    assert ckpt.startswith(f"s3://{BUCKET}/runs/fold0/checkpoint_"), ckpt

    # Ray Train wrote the run into the bucket (through the configured endpoint).
    keys = _keys(cfg, "runs/fold0")
    assert "runs/fold0/checkpoint_manager_snapshot.json" in keys
    for f in ("best.pt", "last.pt", "history.json"):
        assert any(fnmatch.fnmatch(k, f"runs/fold0/checkpoint_*/{f}") for k in keys), keys
    assert [h["epoch"] for h in history_of(ckpt, storage=cfg.data.storage)] == [1, 2]
    assert stored_result(storage, "fold0", storage=cfg.data.storage) is not None
    assert stored_result(storage, "other", storage=cfg.data.storage) is None
    again = run_fold(cfg, storage_path=storage, run_name="fold0")  # finished: read back, not retrained
    assert again["checkpoint"] == ckpt and again["val_dice"] == out["val_dice"]

    # MLflow: the weights are an artifact, the tags name places every node reaches.
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("durable")
    runs = client.search_runs([exp.experiment_id])
    (run,) = [r for r in runs if r.info.run_name == "fold0"]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["best_checkpoint"] == f"runs:/{run.info.run_id}/checkpoints/best.pt"
    assert tags["last_checkpoint"] == f"{ckpt}/last.pt" and durable.exists(tags["last_checkpoint"], cfg.data.storage)
    tmp = str(Path(tempfile.gettempdir()).resolve())
    for r in runs:
        for k, v in r.data.tags.items():
            assert tmp not in v and not fnmatch.fnmatch(v, "*robustseg-*-rank*"), (r.info.run_name, k, v)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]

    # The worker's scratch folder is gone; the run still initialises a new model with its weights.
    assert not list(Path(tempfile.gettempdir()).glob(f"robustseg-{name}-rank*"))
    best = load_checkpoint(fetch_best(ckpt, tmp_path / "from_bucket" / "best.pt", cfg.data.storage))["model"]
    init_cfg = cfg.with_overrides([f"regime.init=runs:/{run.info.run_id}"])
    model = build_model(init_cfg.model, (64, 64), None)
    state = apply_init(model, resolve_init(init_cfg), init_cfg)
    assert "checkpoints/best.pt" in state.where
    own = model.state_dict()
    assert own.keys() == best.keys() and all(torch.equal(own[k], best[k]) for k in best)
    print(f"fold on S3 with MLflow: {time.time() - t0:.1f} s")


# --------------------------------------------------------------------------- a sweep
def s3_stub_runner(cfg: ExperimentConfig, *, storage_path: str, run_name: str, mlflow: Any = None) -> Dict[str, Any]:
    """Writes a marker where the fold run would live (proves the trial got a full s3:// URI and
    reaches the bucket with the config's settings) and returns a Dice that grows with lr."""
    durable.write_text(durable.join(storage_path, run_name, "stub.json"), '{"ok": true}', cfg.data.storage)
    return {"val_dice": 0.5 + 0.1 * math.log10(cfg.optim.initial_lr / 1e-3) + 0.01 * cfg.data.val_fold, "best_epoch": 1,
            "metrics": {}, "checkpoint": None, "error": None}


def test_sweep_bookkeeping_and_tune_results_in_the_bucket(ray_session, s3_endpoint, tmp_path):
    from trainables.ensemble_build import choose_trials, resolve_sweep
    from trainables.tune_driver import SweepError, run_sweep

    t0 = time.time()
    cfg = ExperimentConfig.from_dict({"name": "stub", "data": {"folds": 2, "shards_uri": str(tmp_path / "shards")},
                                      "model": {"name": "unet2d"}, "tracking": {"workdir": str(tmp_path)}})
    cfg = cfg.with_overrides([f"{k}={v}" for k, v in _storage(s3_endpoint).items()] +
                             [f"tracking.storage_uri=s3://{BUCKET}/sweeps"])
    kw = dict(space="unet2d", trials=2, concurrency=1, fold_runner=s3_stub_runner, fold_concurrency=1,
              sweep_name="s3sweep", verbose=False)
    res = run_sweep(cfg, **kw)
    assert res.complete and res.path == f"s3://{BUCKET}/sweeps/s3sweep"
    keys = _keys(cfg, "sweeps/s3sweep")
    for f in ("sweep.json", "trials.json", "best_config.yaml", "tuner.pkl"):
        assert f"sweeps/s3sweep/{f}" in keys, keys
    assert any(fnmatch.fnmatch(k, "sweeps/s3sweep/experiment_state-*.json") for k in keys), keys
    # Each trial's fold checkpoint (Tune) and each fold's folder are in the bucket.
    assert sum(fnmatch.fnmatch(k, "sweeps/s3sweep/trial_*/checkpoint_*/folds.json") for k in keys) >= 4, keys
    assert sum(fnmatch.fnmatch(k, "sweeps/s3sweep/folds/trial_*_fold*/stub.json") for k in keys) == 4, keys
    assert not (tmp_path / "ray_results").exists()  # nothing went to the default local folder

    # Found again through the config, resumed from the bucket (Tuner.restore with the filesystem).
    assert resolve_sweep("s3sweep", cfg=cfg) == res.path
    base, choices, k = choose_trials(res.path, storage=cfg.data.storage)
    assert k == 2 and base.tracking.storage_uri == f"s3://{BUCKET}/sweeps" and choices[0].backbone == "unet2d"
    with pytest.raises(SweepError, match="already holds a sweep"):
        run_sweep(cfg, **kw)
    resumed = run_sweep(cfg, resume=True, **kw)
    assert resumed.complete and resumed.best_cv_dice == pytest.approx(res.best_cv_dice)
    print(f"stub sweep on S3 (run + resume): {time.time() - t0:.1f} s")
