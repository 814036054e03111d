"""One fold on Ray Train: a 1-worker run, 2-worker gloo DDP, and a killed worker that resumes."""
import importlib.util
import math
from pathlib import Path

import pytest

from robustseg.engine.checkpoint import load_checkpoint
from robustseg.engine.train import ensure_prepared
from ray_local import local_ray
from tiny import tiny_cfg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           # The controller polls workers this often: faster run ends, and the previous
           # report is collected well before the failure drill kills a worker.
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    with local_ray(env) as ray:
        yield ray


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainfold")
    ensure_prepared(tiny_cfg(root))
    return root


def _mlflow(root: Path, run_name: str):
    """FitTracker arguments when robustseg.tracking is there (built in parallel), else None."""
    if importlib.util.find_spec("robustseg.tracking") is None:
        return None
    return {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "trainfold", "run_name": run_name}


def _mlflow_runs(mlflow_args):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_args["tracking_uri"])
    exp = client.get_experiment_by_name(mlflow_args["experiment"])
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{mlflow_args['run_name']}'")


def _check_completed(out, epochs=2):
    assert out["error"] is None
    assert math.isfinite(out["val_dice"]) and 0.0 <= out["val_dice"] <= 1.0
    assert 1 <= out["best_epoch"] <= epochs
    m = out["metrics"]
    assert m["epoch"] == epochs and all(isinstance(v, float) for v in m.values())
    for key in ("loss", "lr", "val_dice", "val_dice_LV", "best_val_dice"):
        assert math.isfinite(m[key])
    ckpt = Path(out["checkpoint"])
    assert (ckpt / "last.pt").exists() and (ckpt / "best.pt").exists()
    return load_checkpoint(ckpt / "last.pt")


def test_one_worker_run_and_rerun(ray_session, root):
    from trainables.train_fold import can_resume, history_of, run_fold

    cfg = tiny_cfg(root)
    storage = str(root / "ray")
    out = run_fold(cfg, storage_path=storage, run_name="one")
    ck = _check_completed(out)
    assert ck["epoch"] == 2 and ck["config"]["model"]["params"]["filters_base"] == 4
    assert [h["epoch"] for h in history_of(out["checkpoint"])] == [1, 2]
    assert out["metrics"]["resumed_from"] == 0.0
    assert can_resume(storage, "one") and not can_resume(storage, "other")
    assert Path(out["checkpoint"]).parent == root / "ray" / "one"

    with pytest.raises(FileExistsError, match="resume=True"):
        run_fold(cfg, storage_path=storage, run_name="one", resume=False)
    # Re-running a finished run returns the stored result without training.
    again = run_fold(cfg, storage_path=storage, run_name="one")
    assert again["val_dice"] == out["val_dice"] and again["checkpoint"] == out["checkpoint"]


def test_two_worker_gloo_ddp(ray_session, root):
    from trainables.train_fold import run_fold

    cfg = tiny_cfg(root, **{"scaling.num_workers": 2, "scaling.cpus_per_worker": 1})
    out = run_fold(cfg, storage_path=str(root / "ray"), run_name="ddp")
    ck = _check_completed(out)
    # rank 0 saved the plain module (no DDP "module." prefix)
    assert not any(k.startswith("module.") for k in ck["model"])


def test_killed_worker_resumes_from_checkpoint(ray_session, root, tmp_path):
    from trainables.train_fold import history_of, run_fold
    from trainables.train_worker import FailOnce

    cfg = tiny_cfg(root, **{"scaling.max_failures": 1})
    marker = tmp_path / "killed"
    mlflow = _mlflow(root, "killed")
    out = run_fold(cfg, storage_path=str(root / "ray"), run_name="killed", mlflow=mlflow,
                   worker_callbacks=[FailOnce(epoch=2, marker=str(marker), hard=True)])
    assert marker.exists()  # the worker process really died once
    _check_completed(out)
    # The second attempt restored epoch 1 and trained epoch 2: the counter continued.
    assert out["metrics"]["resumed_from"] == 1.0
    assert [h["epoch"] for h in history_of(out["checkpoint"])] == [1, 2]
    if mlflow:  # one MLflow run across both attempts (the killed one left it RUNNING)
        runs = _mlflow_runs(mlflow)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert [m.step for m in _metric_history(mlflow, runs[0], "val_dice")] == [1, 2]


def test_failure_without_retries_is_reported(ray_session, root, tmp_path):
    from trainables.train_fold import run_fold
    from trainables.train_worker import FailOnce

    # Streamed from Ray Data on every pass (no worker cache): that path, too, trains and reports.
    cfg = tiny_cfg(root, **{"scaling.max_failures": 0, "optim.epochs": 2, "data.worker_cache_mb": 0})
    mlflow = _mlflow(root, "fails")
    out = run_fold(cfg, storage_path=str(root / "ray"), run_name="fails", mlflow=mlflow,
                   worker_callbacks=[FailOnce(epoch=2, marker=str(tmp_path / "m"), hard=False)])
    assert out["error"] and "failure drill" in out["error"]
    assert out["metrics"]["epoch"] == 1.0  # the last reported epoch survives
    assert (Path(out["checkpoint"]) / "last.pt").exists()
    if mlflow:  # marked FAILED by the driver once Ray gave up, never left RUNNING
        runs = _mlflow_runs(mlflow)
        assert len(runs) == 1 and runs[0].info.status == "FAILED"


def _metric_history(mlflow_args, run, key):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_args["tracking_uri"]).get_metric_history(run.info.run_id, key)


def test_sampling_weights_reach_the_stream(ray_session, root):
    """Pooled training under Ray Train: the workers get per-dataset acceptance rates."""
    from robustseg.errors import ConfigError
    from trainables.train_fold import build_trainer

    manifest = ensure_prepared(tiny_cfg(root))
    datasets = sorted({c["dataset"] for c in manifest.cases})
    cfg = tiny_cfg(root, **{"data.sampling_weights": {datasets[0]: 2.0}, "data.worker_cache_mb": 0})
    trainer = build_trainer(cfg, storage_path=str(root / "ray"), run_name="weighted")
    loop = trainer.train_loop_config
    assert loop["dataset_accept"] == {d: 1.0 for d in datasets} and not loop["cache"]  # one dataset: every row kept
    assert "dataset" in trainer.datasets["train"].schema().names
    # Cached in the worker (the default for small data): the in-memory batcher weighs datasets itself.
    cached = build_trainer(cfg.with_overrides(["data.worker_cache_mb=2048"]), storage_path=str(root / "ray"),
                           run_name="weighted-cached").train_loop_config
    assert cached["cache"] and "dataset_accept" not in cached
    bad = tiny_cfg(root, **{"data.sampling_weights": {"nowhere": 1.0}})
    with pytest.raises(ConfigError, match="nowhere"):
        build_trainer(bad, storage_path=str(root / "ray"), run_name="weighted-bad")


def test_self_supervised_regime_streams_every_slice(ray_session, root, tmp_path):
    """data="images" regimes (genesis) get labelled and unlabelled training slices alike."""
    from trainables.train_fold import build_trainer

    cfg = tiny_cfg(tmp_path, **{"data.label_budget": 3})
    manifest = ensure_prepared(cfg)
    train = [c for c in manifest.cases if c["fold"] != cfg.data.val_fold]
    every = sum(c["n_slices"] for c in train)
    labelled = sum(c["n_slices"] for c in train if c["train_labelled"])
    assert 0 < labelled < every
    supervised = build_trainer(cfg, storage_path=str(tmp_path / "ray"), run_name="sup")
    genesis = build_trainer(cfg.with_overrides(["regime.name=genesis"]), storage_path=str(tmp_path / "ray"),
                            run_name="gen")
    assert supervised.datasets["train"].count() == labelled
    assert genesis.datasets["train"].count() == every


def test_worker_cache_decision(root):
    """A worker caches its share when it decodes to at most data.worker_cache_mb MiB; 0 always streams."""
    from robustseg.data.shards import SliceLayout
    from trainables.train_fold import worker_cache

    layout = SliceLayout(height=256, width=256)  # 5 bytes a pixel decoded: 0.3125 MiB a slice
    cfg = tiny_cfg(root, **{"data.worker_cache_mb": 100})
    assert worker_cache(cfg, 320, layout) and not worker_cache(cfg, 321, layout)
    two = cfg.with_overrides(["scaling.num_workers=2"])
    assert worker_cache(two, 640, layout)  # each of two workers holds half
    assert not worker_cache(cfg.with_overrides(["data.worker_cache_mb=0"]), 1, layout)


def test_cached_batches_sample_like_robustseg_train(ray_session, root):
    """One pass over the shard, then in-memory batches: source patches, foreground oversampling."""
    import torch

    from robustseg.data.manifest import read_manifest
    from robustseg.data.storage import open_store
    from robustseg.data.streaming import TRAIN_COLUMNS, slice_dataset
    from trainables.train_worker import cached_batches

    cfg = tiny_cfg(root, **{"data.fg_fraction": 1.0})
    manifest = read_manifest(open_store(cfg.data.shards_uri))
    ds = slice_dataset(cfg.data, manifest, exclude_folds=[cfg.data.val_fold],
                       columns=TRAIN_COLUMNS + ("case_id", "dataset"))
    patch = (32, 32)
    batches = cached_batches(ds, manifest.layout, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), patch)
    assert len(batches.data) == ds.count()  # every training slice, read once
    train_cases = {c["case_id"] for c in manifest.cases if c["fold"] != cfg.data.val_fold}
    assert set(batches.data.case_ids) <= train_cases
    b = next(batches)
    margin = batches.margin
    assert b["image"].shape == (cfg.optim.batch_size, 1, patch[0] + 2 * margin[0], patch[1] + 2 * margin[1])
    assert margin[0] > 0  # source patches for the augmenter (augment.source_patch)
    centre = b["label"][:, :, margin[0]:margin[0] + patch[0], margin[1]:margin[1] + patch[1]]
    assert bool((centre.flatten(1) > 0).any(1).all())  # fg_fraction 1: every patch shows foreground
