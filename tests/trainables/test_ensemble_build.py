"""`build_ensemble` on a real tiny sweep (Ray Tune + Ray Train + MLflow): best trial per
backbone, fold models reused (or trained when missing), out-of-fold comparison logged under
the sweep run, the ensemble registered as champion."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from tiny import tiny_cfg
from trainables.ensemble_build import EnsembleBuildError, build_ensemble, choose_trials, resolve_sweep
from trainables.tune_driver import SweepError, run_sweep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens_sweep")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        # TPE seed 0 samples unet then unet2d (the tiny space's two backbones).
        res = run_sweep(tiny_cfg(root), space="tiny", trials=2, concurrency=1, fold_concurrency=2,
                        storage_path=str(root / "ray"), sweep_name="s", mlflow=True, seed=0, verbose=False)
        yield root, res
    finally:
        ray.shutdown()


def _uri(root: Path) -> str:
    from robustseg.tracking import resolve_tracking_uri

    return resolve_tracking_uri(tiny_cfg(root))


def test_choose_and_resolve(sweep):
    root, res = sweep
    base, choices, k = choose_trials(res.path)
    assert k == 2 and sorted(c.backbone for c in choices) == ["unet", "unet2d"]
    assert all(c.trial.startswith("trial_00") and c.status == "COMPLETE" for c in choices)
    with pytest.raises(EnsembleBuildError, match="available: \\['unet', 'unet2d'\\]"):
        choose_trials(res.path, ["swin_unetr"])
    assert resolve_sweep("s", storage_path=str(root / "ray")) == res.path
    from mlflow import MlflowClient

    client = MlflowClient(_uri(root))
    exp = client.get_experiment_by_name("robustseg")
    sweep_run = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("robustseg.role") == "sweep"][0]
    assert resolve_sweep(sweep_run.info.run_id, tracking_uri=_uri(root)) == res.path
    # The sweep run names its winner beside the base config, and links its trial run.
    tags = sweep_run.data.tags
    assert sweep_run.data.params["winner.model.name"] == res.best_config.model.name and tags["winner.final"] == "true"
    assert client.get_run(tags["winner.run_id"]).info.run_name == tags["winner.trial"]
    folds = [r for r in client.search_runs([exp.experiment_id], "tags.`robustseg.sweep` = 's'")
             if r.data.tags.get("robustseg.role") == "fold"]
    assert len(folds) == 4 and all(r.info.run_name == f"fold{r.data.tags['fold']} · {r.data.tags['robustseg.trial']}"
                                   for r in folds)
    with pytest.raises(SweepError, match="not found"):
        resolve_sweep("nope", storage_path=str(root / "ray"), tracking_uri=_uri(root))


def test_build_reuses_folds_evaluates_out_of_fold_and_registers(sweep):
    root, res = sweep
    from mlflow import MlflowClient

    import robustseg.ensemble.registry as reg

    build = build_ensemble("s", storage_path=str(root / "ray"), register="tiny-cmr", max_oof_cases=3, select="all")
    spec = build.ensemble.spec
    assert sorted(m.name for m in spec.members) == ["unet2d_fold0", "unet2d_fold1", "unet_fold0", "unet_fold1"]
    client = MlflowClient(_uri(root))
    for m in spec.members:  # each member names the MLflow fold run that trained it
        assert client.get_run(m.run_id).info.run_name.startswith(f"fold{m.fold} · trial_")
    assert [r["model"] for r in build.summary] == ["unet", "unet2d", "ensemble(unet+unet2d)"]
    assert len({r["n"] for r in build.summary}) == 1  # every model scored on the same cases
    assert spec.metrics["oof_dice_best_single"] == max(
        spec.metrics["oof_dice_unet"], spec.metrics["oof_dice_unet2d"])
    assert spec.metrics["oof_dice_ensemble"] == spec.metrics["oof_dice_ensemble_unet-unet2d"]
    assert spec.provenance["selected"] == "ensemble(unet+unet2d)"
    assert spec.provenance["data_manifest"].endswith("/shards/manifest.json") and spec.provenance["sweep"] == "s"
    run = client.get_run(build.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["robustseg.role"] == "ensemble"
    assert "oof_dice_ensemble" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(build.run_id, "oof")}
    assert {"oof/oof_comparison.png", "oof/oof_comparison.csv", "oof/oof_cases.csv"} <= arts
    assert build.version == "1" and reg.alias_version("tiny-cmr", "champion", _uri(root)) == "1"
    # select="best" keeps whichever of unet, unet2d or both scores best out of fold.
    best = build_ensemble("s", storage_path=str(root / "ray"), max_oof_cases=3, tracking=False, out_dir=root / "best")
    top = max(build.summary, key=lambda r: r["dice_mean"])
    assert best.ensemble.spec.provenance["selected"] == top["model"]
    assert best.ensemble.spec.metrics["oof_dice_ensemble"] == pytest.approx(top["dice_mean"])


def test_missing_fold_is_trained_and_folds_bounded(sweep, capsys):
    root, res = sweep
    _, choices, _ = choose_trials(res.path, ["unet"])
    shutil.rmtree(Path(res.path) / "folds" / f"{choices[0].trial}_fold1")
    build = build_ensemble("s", storage_path=str(root / "ray"), backbones=["unet"], tracking=False,
                           out_dir=root / "ens_unet", max_oof_cases=1)
    assert "training unet fold 1" in capsys.readouterr().out
    assert (Path(res.path) / "folds" / f"{choices[0].trial}_fold1").is_dir()
    assert [m.fold for m in build.ensemble.spec.members] == [0, 1] and build.run_id is None
    with pytest.raises(EnsembleBuildError, match="the sweep has 2 folds"):
        build_ensemble("s", storage_path=str(root / "ray"), folds=3, tracking=False)
