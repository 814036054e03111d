"""What the MLflow UI shows of a sweep, read back from a real SQLite store (no Ray session):
the winner on the sweep run, summary metrics at step 0, grouping tags and names of trial and
fold runs, and the link the demo prints."""
from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import pytest

from robustseg.config import ExperimentConfig
from robustseg.tracking_fit import FitTracker
from robustseg.tracking_runs import end_run
from robustseg.tracking_tags import SWEEP, TRIAL
from trainables.tune_tracking import (WINNER_METRIC, SweepTracking, TrialTracking, Winner, fold_run_name,
                                      fold_storage_name, winner_params)
from trainables.tune_trial import fold_config

EXPERIMENT = "views"
#: The winner of the issue: the base is unet2d/SGD at lr 0.01, the winner unet/Adam at lr 0.00276.
SAMPLE = {"model/name": "unet", "model/params/base": 8, "model/params/depth": 3, "optim/name": "adam",
          "optim/lr": 0.00276}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """One store per module: creating the SQLite schema costs seconds."""
    work = tmp_path_factory.mktemp("views")
    return ExperimentConfig.from_dict({
        "name": "views", "data": {"folds": 2, "shards_uri": str(work / "shards")}, "model": {"name": "unet2d"},
        "optim": {"name": "sgd_nesterov", "lr": 0.01},
        "tracking": {"workdir": str(work), "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
                     "experiment": EXPERIMENT}})


@pytest.fixture(scope="module")
def client(base: ExperimentConfig) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=base.tracking.tracking_uri)


def _winner_cfg(base: ExperimentConfig) -> ExperimentConfig:
    from search_spaces import apply_sample

    return ExperimentConfig.from_dict(apply_sample(base.to_dict(), SAMPLE))


def _grid(tmp: Path, trials: List[Dict[str, Any]]) -> List[SimpleNamespace]:
    """Tune results as `trainables.tune_driver._summarise` reads them (metrics, config, path, error)."""
    out = []
    for t in trials:
        metrics = {"trial_id": t["id"], "cv_dice": t["cv"], "fold0_dice": t["cv"], "fold1_dice": t["cv"],
                   "done_folds": t.get("done", 2), "mlflow_run_id": t.get("run_id")}
        out.append(SimpleNamespace(metrics=metrics, config={"sample": t["sample"]}, error=None,
                                   path=str(tmp / t["name"])))
    return out


# --------------------------------------------------------------------------- 1. the winner on the sweep run
def test_sweep_run_shows_the_winner_beside_the_base_config(base: ExperimentConfig, client: Any,
                                                           tmp_path: Path) -> None:
    from trainables.tune_driver import _summarise

    sweep = SweepTracking(base, "sweep-w", "demo", resume=False, path=str(tmp_path))
    winner_cfg = _winner_cfg(base)
    loser_cfg = ExperimentConfig.from_dict({**base.to_dict(), "optim": {**base.to_dict()["optim"], "lr": 0.02}})
    runs = {}
    for name, cfg in (("trial_000_aaaa0000", loser_cfg), ("trial_001_bbbb1111", winner_cfg)):
        runs[name] = TrialTracking(sweep.info, cfg, name).run_id
    grid = _grid(tmp_path, [
        {"id": "aaaa0000", "name": "trial_000_aaaa0000", "cv": 0.70, "run_id": runs["trial_000_aaaa0000"],
         "sample": {"optim": {"lr": 0.02}}},
        # No run id in the result (a trial reported without tracking): found by name under the sweep run.
        {"id": "bbbb1111", "name": "trial_001_bbbb1111", "cv": 0.83, "sample": SAMPLE}])
    res = _summarise(grid, base, name="sweep-w", path=str(tmp_path), trials=2, tracker=sweep)
    assert res.best_config.model.name == "unet" and res.complete

    run = client.get_run(sweep.run_id)
    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED"
    assert params["model.name"] == "unet2d" and params["optim.lr"] == "0.01"  # the base, as before
    assert params["winner.model.name"] == "unet" and params["winner.optim.lr"] == "0.00276"
    assert params["winner.optim.name"] == "adam" and params["winner.model.params.depth"] == "3"
    assert "winner.name" not in params and "winner.data.val_fold" not in params
    assert "winner.optim.epochs" not in params  # same as the base and not sampled
    assert run.data.metrics[WINNER_METRIC] == pytest.approx(0.83)
    assert tags["winner.trial"] == "trial_001_bbbb1111" and tags["winner.trial_id"] == "bbbb1111"
    assert tags["winner.run_id"] == runs["trial_001_bbbb1111"] and tags["winner.final"] == "true"
    link = f"(#/experiments/{run.info.experiment_id}/runs/{runs['trial_001_bbbb1111']})"
    assert link in tags["mlflow.note.content"] and "0.8300" in tags["mlflow.note.content"]


def test_interrupted_sweep_names_its_best_so_far_without_fixing_params(base: ExperimentConfig, client: Any,
                                                                      tmp_path: Path) -> None:
    sweep = SweepTracking(base, "sweep-cut", "demo", resume=False, path=str(tmp_path))
    trial = TrialTracking(sweep.info, _winner_cfg(base), "trial_000_cccc2222").run_id
    sweep.end("KILLED", winner=Winner("trial_000_cccc2222", "cccc2222", 0.8, _winner_cfg(base), SAMPLE, trial))
    run = client.get_run(sweep.run_id)
    assert run.info.status == "KILLED" and run.data.tags["winner.final"] == "false"
    assert run.data.tags["winner.run_id"] == trial and run.data.metrics[WINNER_METRIC] == pytest.approx(0.8)
    # MLflow params cannot change: a resumed sweep may still find another winner.
    assert not [k for k in run.data.params if k.startswith("winner.")]
    assert "Best so far" in run.data.tags["mlflow.note.content"]


def test_winner_params_are_sampled_or_changed_keys() -> None:
    base = ExperimentConfig.from_dict({"model": {"name": "unet2d"}, "optim": {"lr": 0.01}})
    got = winner_params(base, _winner_cfg(base), SAMPLE)
    assert {"winner.model.name", "winner.optim.lr", "winner.optim.name", "winner.model.params.base"} <= set(got)
    same = winner_params(base, base, {"optim/lr": 0.01})
    assert same == {"winner.optim.lr": "0.01"}  # sampled, so shown even when it equals the base


# --------------------------------------------------------------------------- 2. summary metrics at step 0
def test_summary_metrics_are_single_values_at_step_0(base: ExperimentConfig, client: Any, tmp_path: Path) -> None:
    history = [{"epoch": e, "loss": 1.0 / e, "val_dice": 0.5 + 0.1 * e, "val_dice_LV": 0.6 + 0.1 * e}
               for e in (1, 2, 3, 4)]
    tracker = FitTracker(base, base.tracking.tracking_uri, EXPERIMENT, "summary-steps")
    for h in history:
        tracker.on_epoch(h["epoch"], h, None)
    result = SimpleNamespace(best_score=0.8, best_epoch=3, epochs_run=4, stopped_early=True, history=history,
                             last_checkpoint=None, best_checkpoint=None)
    tracker.finish(result, tmp_path)
    summary = ("best_val_dice", "best_val_dice_LV", "best_epoch", "epochs_run", "stopped_early")
    for key in summary:
        points = client.get_metric_history(tracker.run_id, key)
        assert [p.step for p in points] == [0], (key, [(p.step, p.value) for p in points])
    assert client.get_run(tracker.run_id).data.metrics["best_epoch"] == 3
    # The per-epoch series stay series, at step = epoch.
    assert sorted(p.step for p in client.get_metric_history(tracker.run_id, "val_dice")) == [1, 2, 3, 4]


def test_installed_mlflow_ui_draws_step_0_as_a_bar() -> None:
    """The rule the step choice relies on, read from the installed UI bundle: line chart iff the latest step >= 1."""
    bundle = _ui_bundle()
    assert re.search(r"\.step\)>=1\)\}", bundle) or ".step>=1" in bundle, "chart-type rule not found"
    assert 'e.BAR="BAR",e.LINE="LINE"' in bundle


# --------------------------------------------------------------------------- 3. grouping tags and names
def test_trial_and_fold_runs_carry_sweep_trial_and_fold(base: ExperimentConfig, client: Any, tmp_path: Path) -> None:
    sweep = SweepTracking(base, "sweep-tags", "demo", resume=False, path=str(tmp_path))
    name = "trial_002_a6e19da6"
    trial = TrialTracking(sweep.info, base, name)
    folds = {}
    for k in (0, 1):
        kw = trial.fold_kwargs(k)
        tracker = FitTracker(fold_config(base, k), **kw)
        folds[k] = tracker.run_id
        end_run(base.tracking.tracking_uri, tracker.run_id, "FINISHED")
    sweep_tags = client.get_run(sweep.run_id).data.tags
    for k, run_id in folds.items():
        run = client.get_run(run_id)
        assert run.info.run_name == f"fold{k} · {name}"
        assert run.data.tags[SWEEP] == sweep_tags[SWEEP] == "sweep-tags"  # the sweep run's own tag key
        assert run.data.tags[TRIAL] == name and run.data.tags["fold"] == str(k)
        assert run.data.tags["mlflow.parentRunId"] == trial.run_id
    trial_run = client.get_run(trial.run_id)
    assert trial_run.data.tags[SWEEP] == "sweep-tags" and trial_run.data.tags[TRIAL] == name
    # Filtering by sweep finds the sweep, its trial and both folds; by trial and fold, one fold.
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    found = {r.info.run_id for r in client.search_runs([exp], f"tags.`{SWEEP}` = 'sweep-tags'")}
    assert found == {sweep.run_id, trial.run_id, *folds.values()}
    one = client.search_runs([exp], f"tags.`{TRIAL}` = '{name}' and tags.fold = '1'")
    assert [r.info.run_id for r in one] == [folds[1]]
    # Ray's storage folder keeps its name (a resumed sweep looks its folds up by it).
    assert fold_storage_name(name, 1) == f"{name}_fold1" and fold_run_name(name, 1) == f"fold1 · {name}"


def test_trials_of_sweeps_started_before_the_name_travelled_still_tag_their_folds(base: ExperimentConfig,
                                                                                 client: Any, tmp_path: Path) -> None:
    sweep = SweepTracking(base, "sweep-old", "demo", resume=False, path=str(tmp_path))
    old_info = {k: v for k, v in sweep.info.items() if k != "sweep"}  # as pickled in an older tuner.pkl
    trial = TrialTracking(old_info, base, "trial_000_00000000")
    assert trial.fold_kwargs(0)["tags"][SWEEP] == "sweep-old"


# --------------------------------------------------------------------------- 6. the demo's link
def test_demo_hint_links_the_runs_page_in_the_ml_view(base: ExperimentConfig) -> None:
    from robustseg.cli.demo import mlflow_hint
    from robustseg.tracking_store import ensure_experiment

    exp = ensure_experiment(base, base.tracking.tracking_uri)
    hint = mlflow_hint(base)
    assert f"mlflow ui --backend-store-uri {base.tracking.tracking_uri}" in hint
    assert f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning" in hint


def test_installed_mlflow_ui_picks_its_view_from_the_workflow_type_parameter() -> None:
    bundle = _ui_bundle()
    # The provider reads ?workflowType=genai|machine_learning, then local storage, default GenAI ...
    assert 'e.get("workflowType")' in bundle and 'MACHINE_LEARNING="machine_learning"' in bundle
    assert '"/experiments/:experimentId/runs"' in bundle
    # ... and the experimentKind tag is only consulted when the (hard-wired on) switch is off.
    assert re.search(r'\?\w+\(\w+\):\(\w+=>\{[^}]*"mlflow\.experimentKind"', bundle)


def _ui_bundle() -> str:
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    mains = sorted(js.glob("main.*.js"))
    if not mains:
        pytest.skip(f"no MLflow UI bundle under {js}")
    return mains[0].read_text(errors="replace")


def test_a_fit_without_a_score_still_logs_its_length_at_step_0(base: ExperimentConfig, client: Any,
                                                              tmp_path: Path) -> None:
    tracker = FitTracker(base, base.tracking.tracking_uri, EXPERIMENT, "no-score")
    result = SimpleNamespace(best_score=math.nan, best_epoch=-1, epochs_run=2, stopped_early=False, history=[],
                             last_checkpoint=None, best_checkpoint=None)
    tracker.finish(result, tmp_path)
    metrics = client.get_run(tracker.run_id).data.metrics
    assert metrics["epochs_run"] == 2 and "best_val_dice" not in metrics
    assert [p.step for p in client.get_metric_history(tracker.run_id, "epochs_run")] == [0]
