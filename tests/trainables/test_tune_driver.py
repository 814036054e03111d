"""Optuna sweeps over folds on Ray Tune: stub fold runner end to end, interruption + resume,
a failing fold, ASHA, and one tiny sweep with real Ray Train folds.

The stub fold runners are module-level functions; they reach the trial actors pickled by
value (``register_pickle_by_value``) because this test module is not importable there.
"""
from __future__ import annotations

import math
import os
import pickle
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml
from ray.tune import Callback

from robustseg.config import ExperimentConfig
from trainables.tune_driver import (SpaceInTrialConfig, SweepError, absolute_paths, default_fold_concurrency,
                                    run_sweep, storage_root, trial_name)
from trainables.tune_trial import fold_config, trial_config
from tiny import tiny_cfg as shared_tiny_cfg


# --------------------------------------------------------------------------- stubs
def _record(cfg: ExperimentConfig, run_name: str) -> None:
    calls = Path(cfg.tracking.workdir) / "calls"
    calls.mkdir(parents=True, exist_ok=True)
    with open(calls / run_name, "a") as f:
        f.write("x")


def stub_dice(lr: float, fold: int) -> float:
    """Deterministic Dice: grows with log lr over the unet2d range, a little per fold."""
    return 0.5 + 0.2 * math.log10(lr / 1e-3) + 0.01 * fold


def stub_runner(cfg: ExperimentConfig, *, storage_path: str, run_name: str, mlflow: Any = None) -> Dict[str, Any]:
    _record(cfg, run_name)
    time.sleep(0.1)
    return {"val_dice": stub_dice(cfg.optim.initial_lr, cfg.data.val_fold), "best_epoch": 1, "metrics": {},
            "checkpoint": None, "error": None}


def failing_runner(cfg: ExperimentConfig, *, storage_path: str, run_name: str, mlflow: Any = None) -> Dict[str, Any]:
    if cfg.data.val_fold == 1:
        return {"val_dice": math.nan, "best_epoch": -1, "metrics": {}, "checkpoint": None,
                "error": "RuntimeError: out of memory (stub)"}
    return stub_runner(cfg, storage_path=storage_path, run_name=run_name, mlflow=mlflow)


class InterruptAfter(Callback):
    """Tune callback sending the driver SIGUSR1 (Tune's graceful stop, as on Ctrl+C) once the
    ``n``-th fold checkpoint is registered (``on_trial_result`` would be too early: a function
    trainable's checkpoint is saved in a later step). Tune pickles callbacks with the sweep and
    restores them on resume, so it fires only while ``marker`` does not exist yet."""

    def __init__(self, n: int, marker: str) -> None:
        self.n, self.marker, self.seen = n, marker, 0

    def on_checkpoint(self, iteration: int, trials: Any, trial: Any, checkpoint: Any, **info: Any) -> None:
        self.seen += 1
        if self.seen >= self.n and not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


def base_cfg(root: Path, folds: int = 2) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"name": "stub", "data": {"folds": folds, "shards_uri": str(root / "shards")},
                                       "model": {"name": "unet2d"}, "tracking": {"workdir": str(root)}})


def calls(root: Path) -> Dict[str, int]:
    d = root / "calls"
    return {p.name: len(p.read_text()) for p in d.iterdir()} if d.exists() else {}


# --------------------------------------------------------------------------- fast (no Ray session)
def test_trial_config_accepts_sample_nested_flat_and_top_level():
    base = ExperimentConfig().to_dict()
    a = trial_config({"base": base, "sample": {"optim": {"lr": 0.003}, "model/params/filters_base": 16}})
    b = trial_config({"base": base, "optim/lr": 0.003, "model": {"params": {"filters_base": 16}}, "choice": {"x": 1},
                      "fold_concurrency": 2})
    assert a.optim.lr == b.optim.lr == 0.003 and a.model.params == b.model.params == {"filters_base": 16}
    assert fold_config(a, 1).data.val_fold == 1 and a.data.val_fold == 0


def test_space_wrapper_namespaces_and_pickles():
    import optuna

    wrapper = pickle.loads(pickle.dumps(SpaceInTrialConfig("unet2d")))
    point = wrapper(optuna.create_study().ask())
    assert point and all(k.startswith("sample/") for k in point)
    with pytest.raises(KeyError, match="unet2d"):
        SpaceInTrialConfig("nope")


def test_paths_made_absolute_for_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = ExperimentConfig.from_dict({"data": {"shards_uri": "rel/shards",
                                               "sources": [{"name": "acdc_h5", "path": "data/acdc"}]},
                                      "tracking": {"workdir": "work"}})
    out = absolute_paths(cfg)
    assert out.data.shards_uri == str(tmp_path / "rel" / "shards")
    assert out.data.sources[0].path == str(tmp_path / "data" / "acdc")
    assert out.tracking.workdir == str(tmp_path / "work")
    assert absolute_paths(cfg.with_overrides(["data.shards_uri=s3://b/p"])).data.shards_uri == "s3://b/p"
    assert storage_root(out, None) == str(tmp_path / "work" / "ray_results")
    assert storage_root(out, "r") == str(tmp_path / "r") and storage_root(out, "s3://b/r") == "s3://b/r"


def test_trial_names_carry_the_trial_number():
    class T:
        experiment_tag, trial_id = "7_base=...", "ab12cd34"

    assert trial_name(T()) == "trial_007_ab12cd34"
    T.experiment_tag = ""
    assert trial_name(T()) == "trial_ab12cd34"


def test_bad_arguments_fail_before_ray(tmp_path):
    cfg = base_cfg(tmp_path)
    with pytest.raises(SweepError, match="sweep_name"):
        run_sweep(cfg, space="unet2d", trials=1, resume=True)
    with pytest.raises(ValueError, match="scheduler"):
        run_sweep(cfg, space="unet2d", trials=1, scheduler="hyperband")
    with pytest.raises(KeyError, match="unknown search space"):
        run_sweep(cfg, space="nope", trials=1)


# --------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_session():
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_default_fold_concurrency_leaves_room_for_data(ray_session):
    cfg = ExperimentConfig.from_dict({"data": {"folds": 5}, "scaling": {"num_workers": 1, "cpus_per_worker": 1}})
    # 4 logical CPUs, 1.5 per fold (worker + Ray Data headroom): 2 folds at once in all.
    assert default_fold_concurrency(cfg, 1) == 2
    assert default_fold_concurrency(cfg, 2) == 1 and default_fold_concurrency(cfg, 8) == 1
    assert default_fold_concurrency(cfg.with_overrides(["scaling.cpus_per_worker=0.5"]), 1) == 4


@pytest.mark.slow
def test_stub_sweep_end_to_end(ray_session, tmp_path):
    t0 = time.time()
    res = run_sweep(base_cfg(tmp_path), space="unet2d", trials=4, concurrency=2, storage_path=str(tmp_path / "ray"),
                    sweep_name="e2e", fold_runner=stub_runner, fold_concurrency=2, seed=3)
    assert res.complete and len(res.table) == 4
    for row in res.table:
        folds = [row["fold0_dice"], row["fold1_dice"]]
        assert row["status"] == "COMPLETE" and row["done_folds"] == 2
        assert folds == pytest.approx([stub_dice(row["optim/lr"], 0), stub_dice(row["optim/lr"], 1)])
        assert row["cv_dice"] == pytest.approx(sum(folds) / 2)
    best = max(res.table, key=lambda r: r["cv_dice"])
    assert res.best_cv_dice == pytest.approx(best["cv_dice"])
    assert res.per_fold == pytest.approx([best["fold0_dice"], best["fold1_dice"]])
    path = Path(res.path) / "best_config.yaml"
    assert path.exists()
    reloaded = ExperimentConfig.from_yaml(path)
    assert reloaded.optim.lr == pytest.approx(best["optim/lr"]) and reloaded == res.best_config
    assert reloaded.model.params["filters_base"] == best["model/params/filters_base"]
    assert yaml.safe_load(path.read_text())["data"]["val_fold"] == 0
    # Every (trial, fold) trained exactly once, under its own run name.
    assert sorted(calls(tmp_path).values()) == [1] * 8
    # Same seed, same sampled points: a sweep is reproducible.
    with pytest.raises(SweepError, match="already holds a sweep"):
        run_sweep(base_cfg(tmp_path), space="unet2d", trials=4, storage_path=str(tmp_path / "ray"), sweep_name="e2e",
                  fold_runner=stub_runner)
    print(f"stub sweep 4 trials x 2 folds: {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_interrupted_sweep_resumes_remaining_trials(ray_session, tmp_path):
    import optuna

    storage, marker = str(tmp_path / "ray"), tmp_path / "interrupted"
    # Interrupt at the 5th fold checkpoint: two trials done, the third one fold in.
    first = run_sweep(base_cfg(tmp_path), space="unet2d", trials=4, concurrency=1, storage_path=storage,
                      sweep_name="resumable", fold_runner=stub_runner, fold_concurrency=1,
                      callbacks=[InterruptAfter(5, str(marker))])
    assert marker.exists() and not first.complete
    done_first = {r["trial"]: r for r in first.table if r["status"] == "COMPLETE"}
    assert len(done_first) == 2, first.table
    cut = marker.read_text()
    assert {r["trial"]: r["status"] for r in first.table}[cut] == "INTERRUPTED"

    second = run_sweep(base_cfg(tmp_path), space="unet2d", trials=4, storage_path=storage, sweep_name="resumable",
                       fold_runner=stub_runner, resume=True)
    assert second.complete and len(second.table) == 4
    assert all(r["status"] == "COMPLETE" and r["done_folds"] == 2 for r in second.table)
    by_id = {r["trial"]: r for r in second.table}
    for tid, row in done_first.items():  # finished trials are kept, not re-run
        assert by_id[tid]["cv_dice"] == pytest.approx(row["cv_dice"])
    ran = calls(tmp_path)
    assert len(ran) == 8
    for run_name, n in ran.items():
        if any(f"_{t}_fold" in run_name for t in done_first) or run_name.endswith(f"_{cut}_fold0"):
            # Completed trials and the interrupted trial's checkpointed fold never train again.
            assert n == 1, run_name
    # The restored Optuna searcher continued its sequence (a re-seeded one would repeat the
    # first points): the four points are those of one uninterrupted seeded study.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    expected = sorted(SpaceInTrialConfig("unet2d")(study.ask())["sample/optim/lr"] for _ in range(4))
    assert sorted(r["optim/lr"] for r in second.table) == pytest.approx(expected)
    assert Path(second.path, "best_config.yaml").exists()
    assert second.best_cv_dice == pytest.approx(max(r["cv_dice"] for r in second.table))


@pytest.mark.slow
def test_failing_fold_fails_the_trial_clearly(ray_session, tmp_path):
    with pytest.raises(SweepError, match="out of memory") as exc:
        run_sweep(base_cfg(tmp_path), space="supervised", trials=1, storage_path=str(tmp_path / "ray"),
                  sweep_name="fails", fold_runner=failing_runner, fold_concurrency=1)
    assert "fold 1" in str(exc.value)


@pytest.mark.slow
def test_asha_stops_or_completes_every_trial(ray_session, tmp_path):
    res = run_sweep(base_cfg(tmp_path, folds=3), space="unet2d", trials=4, concurrency=1, scheduler="asha",
                    storage_path=str(tmp_path / "ray"), sweep_name="asha", fold_runner=stub_runner, fold_concurrency=1)
    statuses = {r["status"] for r in res.table}
    assert statuses == {"COMPLETE", "STOPPED"}  # seeded and sequential: deterministic
    for r in res.table:
        done = [r[f"fold{j}_dice"] for j in range(3) if r[f"fold{j}_dice"] is not None]
        assert len(done) == r["done_folds"] and r["cv_dice"] == pytest.approx(sum(done) / len(done))
        assert (r["done_folds"] == 3) == (r["status"] == "COMPLETE")
    assert res.best_cv_dice == max(r["cv_dice"] for r in res.table if r["status"] == "COMPLETE")


# --------------------------------------------------------------------------- real folds
def tiny_cfg(root: Path) -> ExperimentConfig:
    """The shared tiny config with half a CPU per Train worker, so two folds of two trials fit
    next to their Ray Data streams on num_cpus=4."""
    return shared_tiny_cfg(root, **{"scaling.cpus_per_worker": 0.5})


@pytest.mark.slow
def test_real_folds_tiny_sweep_with_mlflow(ray_session, tmp_path):
    try:
        from trainables.train_fold import run_fold  # noqa: F401
    except ImportError as e:
        pytest.skip(f"trainables.train_fold.run_fold is not importable yet: {e}")
    t0 = time.time()
    res = run_sweep(tiny_cfg(tmp_path), space="supervised", trials=2, concurrency=2, fold_concurrency=2,
                    storage_path=str(tmp_path / "ray"), sweep_name="real", mlflow=True, seed=0)
    wall = time.time() - t0
    assert res.complete and len(res.table) == 2
    for row in res.table:
        assert row["status"] == "COMPLETE", row
        folds = [row["fold0_dice"], row["fold1_dice"]]
        assert all(0.0 <= d <= 1.0 for d in folds) and row["cv_dice"] == pytest.approx(sum(folds) / 2)
    assert ExperimentConfig.from_yaml(Path(res.path) / "best_config.yaml").regime.name == "supervised"

    from mlflow.tracking import MlflowClient

    from robustseg.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tiny_cfg(tmp_path)))
    exp = client.get_experiment_by_name("robustseg")
    runs = client.search_runs([exp.experiment_id])
    by_role: Dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("robustseg.role"), []).append(r)
    assert len(by_role["sweep"]) == 1 and len(by_role["trial"]) == 2 and len(by_role["fold"]) == 4, \
        {k: len(v) for k, v in by_role.items()}
    sweep_id = by_role["sweep"][0].info.run_id
    trial_ids = {r.info.run_id for r in by_role["trial"]}
    assert all(r.data.tags.get("mlflow.parentRunId") == sweep_id for r in by_role["trial"])
    assert all(r.data.tags.get("mlflow.parentRunId") in trial_ids for r in by_role["fold"])
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert all("cv_val_dice" in r.data.metrics for r in by_role["trial"])
    print(f"real sweep 2 trials x 2 folds: {wall:.1f} s, best cv_dice {res.best_cv_dice:.4f}")
