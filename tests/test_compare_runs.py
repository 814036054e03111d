"""benchmarks/compare_runs.py: the table, plot and MLflow run of a grid of finished runs."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "benchmarks" / "compare_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder: Path, dices, key="val_dice"):
    folder.mkdir(parents=True)
    hist = [{"epoch": i + 1, key: d, "epoch_seconds": 30.0, "val_dice_infection": d} for i, d in enumerate(dices)]
    (folder / "history.json").write_text(json.dumps(hist))


def test_compare_runs_table_plot_and_mlflow(tmp_path):
    mod = _module()
    _run(tmp_path / "a", [0.2, 0.5, 0.4])
    _run(tmp_path / "b", [0.3, 0.35])
    _run(tmp_path / "g", [-0.2, -0.1], key="val_score")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = mod.main(["--name", "grid", "--out", str(tmp_path / "out"), "--tracking-uri", uri, "--experiment", "cmp",
                   "--group", "b10", "--runs", f"scratch={tmp_path / 'a'}", f"missing={tmp_path / 'nope'}",
                   "--group", "b40", "--runs", f"scratch={tmp_path / 'b'}", f"genesis={tmp_path / 'g'}"])
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "grid.json").read_text())["rows"]
    got = {(r["group"], r["run"]): (r["best"], r["best_epoch"], r["metric"]) for r in rows}
    assert got == {("b10", "scratch"): (0.5, 2, "val_dice"), ("b40", "scratch"): (0.35, 2, "val_dice"),
                   ("b40", "genesis"): (-0.1, 2, "val_score")}
    assert rows[0]["train_minutes"] == 1.5 and rows[0]["val_dice_infection"] == 0.5
    assert (tmp_path / "out" / "grid.png").stat().st_size > 1000 and (tmp_path / "out" / "grid.csv").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])[0]
    assert run.data.metrics == {"b10_scratch": 0.5, "b40_scratch": 0.35, "b40_genesis": -0.1}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"grid.json", "grid.csv", "grid.png"}
