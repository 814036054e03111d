"""What the ensemble comparison calls its selection, printed and in MLflow (no Ray, no training):
one backbone's folds are a *fold ensemble of <backbone>*, not an ensemble of architectures."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import pytest

from robustseg.cli.ensemble import print_ensemble_summary, selection_line
from robustseg.config import ExperimentConfig
from robustseg.ensemble import EnsembleSpec, MemberSpec
from trainables.ensemble_build import Choice, _make_spec, _oof_metrics, _track

NAMES = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}


def _summary() -> List[Dict[str, Any]]:
    rows = [("unet", 0.85), ("unet2d", 0.80), ("ensemble(unet+unet2d)", 0.84)]
    return [{"model": m, "n": 6, "dice_mean": d, "dice_LV": d + 0.05, "dice_MYO": d - 0.05, "dice_RV": d,
             "hd95_mean": 3.0} for m, d in rows]


def _spec(backbones: List[str], base: ExperimentConfig, chosen: str) -> EnsembleSpec:
    members = [MemberSpec(f"{b}_fold{k}", b, fold=k) for b in backbones for k in (0, 1)]
    first = SimpleNamespace(task="cardiac", class_names=NAMES, cfg=base)
    choices = [Choice("unet", "trial_001_b", base, 0.86, "COMPLETE"), Choice("unet2d", "trial_000_a", base, 0.81,
                                                                             "COMPLETE")]
    summary = _summary()
    picked = next(r for r in summary if r["model"] == chosen)
    return _make_spec("robustseg-cmr", members, first, base, choices, combine="mean", tta=False, centring="image",
                      metrics=_oof_metrics(summary, picked, {"unet": {}, "unet2d": {}}),
                      provenance={"sweep": "demo", "sweep_path": "/x/demo", "selected": chosen})


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    work = tmp_path_factory.mktemp("naming")
    return ExperimentConfig.from_dict({"name": "naming", "data": {"shards_uri": str(work / "shards")},
                                       "tracking": {"workdir": str(work), "experiment": "naming",
                                                    "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}})


def test_one_selected_backbone_is_a_fold_ensemble(base: ExperimentConfig) -> None:
    spec = _spec(["unet"], base, "unet")
    assert spec.kind == "fold ensemble" and spec.composition() == "fold ensemble of unet (2 folds)"
    assert spec.provenance["selected_backbones"] == "unet" and spec.provenance["selection"] == spec.composition()
    # Its out-of-fold Dice is the backbone's own: said so, not compared with itself as a combination.
    assert spec.metrics["oof_dice_ensemble"] == spec.metrics["oof_dice_best_single"] == pytest.approx(0.85)
    line = selection_line(spec)
    assert line.startswith("selected: fold ensemble of unet (2 folds), 2 members; out-of-fold Dice 0.850")
    assert "the best of unet, unet2d" in line and "architecture" not in line.split(";")[0]


def test_several_backbones_are_an_architecture_ensemble(base: ExperimentConfig) -> None:
    spec = _spec(["unet", "unet2d"], base, "ensemble(unet+unet2d)")
    assert spec.kind == "architecture ensemble"
    assert spec.composition() == "architecture ensemble of unet+unet2d (2 backbones x 2 folds = 4 members)"
    assert spec.provenance["selected_backbones"] == "unet,unet2d"
    assert selection_line(spec) == ("selected: architecture ensemble of unet+unet2d (2 backbones x 2 folds = 4 "
                                    "members); out-of-fold Dice 0.840 vs best single architecture 0.850")


def test_the_ensemble_run_names_its_selection(base: ExperimentConfig, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import robustseg.ensemble.registry as reg
    from mlflow import MlflowClient

    monkeypatch.setattr(reg, "log_ensemble", lambda ens, tracking_uri, run_id: f"runs:/{run_id}/ensemble")
    spec = _spec(["unet"], base, "unet")
    build = SimpleNamespace(ensemble=SimpleNamespace(spec=spec), choices=[
        Choice("unet", "trial_001_b", base, 0.86, "COMPLETE"), Choice("unet2d", "trial_000_a", base, 0.81, "COMPLETE")],
        summary=_summary(), rows=[{"model": "unet", "case_id": "c1", "dice_mean": 0.85}], stored="",
        folder=tmp_path / "model", model_uri=None, version=None, run_id=None)
    uri = base.tracking.tracking_uri
    _track(build, base, uri, None, None, None)
    run = MlflowClient(uri).get_run(build.run_id)
    assert run.data.params["selected_backbones"] == "unet"
    assert run.data.params["selection"] == "fold ensemble of unet (2 folds)"
    assert run.data.tags["robustseg.ensemble_kind"] == "fold ensemble"
    assert run.data.tags["mlflow.note.content"].startswith("**fold ensemble of unet (2 folds)**: out-of-fold Dice")
    assert run.data.metrics["oof_dice_ensemble"] == pytest.approx(0.85)
    print_ensemble_summary(build)
    assert "selected: fold ensemble of unet (2 folds)" in capsys.readouterr().out
