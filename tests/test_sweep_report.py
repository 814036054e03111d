"""The sweep report renders from a tiny sweep written straight into a SQLite MLflow store."""
from __future__ import annotations

import base64
import math
import re
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from robustseg.sweep_report import SweepNotFound, Trial, load_sweep, param_importance, write_report

PNG_IMG = '<img src="data:image/png;base64,'
# (name, params, per-fold val_dice curves; None = the fold run failed before validating)
TRIALS = [
    ("trial-a", {"optim.lr": "0.01", "model.name": "unet2d"}, {0: [0.3, 0.6, 0.7], 1: [0.2, 0.5, 0.6]}),
    ("trial-b", {"optim.lr": "0.001", "model.name": "dynunet"}, {0: [0.4, 0.7, 0.8], 1: [0.3, 0.7, 0.75]}),
    ("trial-c", {"optim.lr": "0.1", "model.name": "unet2d"}, {0: [0.1, 0.9, 0.95], 1: None}),
    ("trial-d", {"optim.lr": "0.0001", "model.name": "dynunet"}, {0: [0.5, 0.6, 0.65], 1: [0.4, 0.55, 0.6]}),
]


def _make_sweep(uri: str) -> Dict[str, Any]:
    """A 4-trial x 2-fold sweep in the layout robustseg.tracking writes (sweep -> trial -> fold)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("report-test", artifact_location=Path(uri[len("sqlite:///"):]).parent.as_uri())
    client.create_experiment("other")  # the sweep lookup must search every experiment
    sweep = client.create_run(exp, run_name="sweep-demo", tags={"robustseg.role": "sweep", "robustseg.sweep": "sweep-demo"})
    sid = sweep.info.run_id
    now = int(time.time() * 1000)
    for number, (name, params, folds) in enumerate(TRIALS):
        common = {**params, "optim.epochs": "3", "name": f"exp-{name}"}
        trial = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": sid, "robustseg.role": "trial",
                                                             "robustseg.trial_number": str(number)})
        tid = trial.info.run_id
        client.log_batch(tid, params=[Param(k, v) for k, v in common.items()])
        best = {}
        for k, curve in folds.items():
            run = client.create_run(exp, run_name=f"{name}-fold{k}", tags={"mlflow.parentRunId": tid, "fold": str(k),
                                                                           "robustseg.role": "fold"})
            rid = run.info.run_id
            client.log_batch(rid, params=[Param(p, v) for p, v in {**common, "data.val_fold": str(k)}.items()])
            if curve is None:
                client.set_terminated(rid, "FAILED")
                continue
            metrics = [Metric("val_dice", v, now, e + 1) for e, v in enumerate(curve)]
            metrics += [Metric("loss", 1.0 / (e + 1), now, e + 1) for e in range(len(curve))]
            # trial-b fold 1 lacks best_val_dice: the report falls back to the history's maximum.
            if (name, k) != ("trial-b", 1):
                metrics.append(Metric("best_val_dice", max(curve), now, len(curve)))
            client.log_batch(rid, metrics=metrics)
            client.set_terminated(rid, "FINISHED")
            best[k] = max(curve)
        if len(best) == len(folds):
            mean = sum(best.values()) / len(best)
            client.log_batch(tid, metrics=[Metric("cv_val_dice", mean, now, 0)])
            client.set_terminated(tid, "FINISHED")
        else:
            client.set_terminated(tid, "FAILED")
    client.set_terminated(sid, "FINISHED")
    return {"sweep_id": sid}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """One SQLite store per module (schema creation costs seconds)."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return {"uri": uri, "root": root, **_make_sweep(uri)}


@pytest.fixture(scope="module")
def report_html(store: Dict[str, Any]) -> str:
    out = write_report(store["uri"], "sweep-demo", store["root"] / "out" / "report.html")
    assert out.is_file()
    return out.read_text()


def test_load_sweep_ranks_trials(store: Dict[str, Any]) -> None:
    sweep = load_sweep(store["uri"], "sweep-demo")
    assert sweep.run_id == store["sweep_id"] and sweep.experiment == "report-test"
    # trial-c's one finished fold beats everything, but a failed trial has no objective: last.
    assert [t.name for t in sweep.trials] == ["trial-b", "trial-a", "trial-d", "trial-c"]
    b, a, d, c = sweep.trials
    assert b.objective == pytest.approx(0.775) and b.fold_dice == {0: pytest.approx(0.8), 1: pytest.approx(0.75)}
    assert a.objective == pytest.approx(0.65) and a.number == 0 and d.number == 3
    assert c.status == "FAILED" and math.isnan(c.objective) and c.fold_dice[0] == pytest.approx(0.95)
    assert math.isnan(c.fold_dice[1])  # the failed fold never validated
    assert sweep.varying == ["model.name", "optim.lr"]  # not optim.epochs (constant) nor name (ignored)


def test_report_is_self_contained_html(report_html: str) -> None:
    html = report_html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<style>" in html
    assert not re.search(r"https?://|<script|<link|@import|url\(", html), "report must not load anything external"
    images = re.findall(re.escape(PNG_IMG) + r"([A-Za-z0-9+/=]+)\"", html)
    assert len(images) == 4  # per-fold Dice, learning curves, optimisation history, importance
    assert all(base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" for b64 in images)


def test_report_leaderboard(report_html: str) -> None:
    table = report_html[report_html.index("<h2>Leaderboard</h2>"):]
    table = table[: table.index("</table>")]
    for header in ("CV Dice", "fold 0", "fold 1", "model.name", "optim.lr"):
        assert f">{header}</th>" in table
    assert "optim.epochs" not in table
    assert table.index("trial-b") < table.index("trial-a") < table.index("trial-d") < table.index("trial-c")
    assert "0.7750" in table and "0.8000" in table and "FAILED" in table
    assert "Best trial <b>trial-b</b>" in report_html
    assert "Spearman" in report_html  # the documented fallback importance


def test_report_by_run_id_matches_by_name(store: Dict[str, Any], report_html: str, tmp_path: Path) -> None:
    by_id = write_report(store["uri"], store["sweep_id"], tmp_path / "by_id.html").read_text()
    strip = re.compile(re.escape(PNG_IMG) + r"[^\"]*")  # PNG bytes may differ in metadata
    assert strip.sub("", by_id) == strip.sub("", report_html)


def test_unknown_sweep_names_the_known_ones(store: Dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(SweepNotFound, match="sweep-demo"):
        write_report(store["uri"], "no-such-sweep", tmp_path / "x.html")


def test_param_importance_fallback() -> None:
    def trial(i: int, lr: str, opt: str, const: str, objective: float) -> Trial:
        return Trial(run_id=str(i), name=str(i), number=i, status="FINISHED", objective=objective,
                     params={"lr": lr, "opt": opt, "const": const})

    trials = [trial(0, "0.1", "sgd", "1", 0.2), trial(1, "0.01", "sgd", "1", 0.5), trial(2, "0.001", "adam", "1", 0.9),
              trial(3, "0.0001", "adam", "1", 0.95), trial(4, "0.5", "sgd", "1", float("nan"))]
    imp = param_importance(trials, ["lr", "opt", "const"])
    assert imp["lr"] == pytest.approx(1.0)  # perfectly monotone (decreasing) -> |rho| = 1
    assert 0.8 < imp["opt"] <= 1.0 and "const" not in imp
    assert list(imp) == ["lr", "opt"]
    assert param_importance(trials[:2], ["lr"]) == {}  # too few trials to say anything


def test_report_uses_an_optuna_study_when_given(store: Dict[str, Any], tmp_path: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -((t.suggest_float("optim/lr", 1e-4, 1e-1, log=True) - 0.01) ** 2)
                   + 0 * t.suggest_int("model/params/depth", 2, 5), n_trials=8)
    html = write_report(store["uri"], "sweep-demo", tmp_path / "r.html", study=study).read_text()
    assert "fANOVA" in html and "Spearman" not in html
    assert html.count(PNG_IMG) == 4
