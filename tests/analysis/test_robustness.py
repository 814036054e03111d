"""Robustness to simulated respiratory motion: corruption, scoring, summary, plot, MLflow, CLI."""
from __future__ import annotations

import argparse
import json
from typing import List

import numpy as np
import pytest
import torch

from robustseg.analysis import robustness as rb
from robustseg.data.synthetic import make_cardiac_dataset
from robustseg.errors import ConfigError, DataError
from robustseg.cli.robustness import register, load_segmenter, parse_levels, parse_models
from tiny_ensemble import tiny_ensemble_folder, tiny_member_checkpoints

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny store (tiny/shards), two member checkpoints and their ensemble folder."""
    root = tmp_path_factory.mktemp("robustness")
    return root, tiny_member_checkpoints(root), tiny_ensemble_folder(root)


@pytest.fixture(scope="module")
def cases():
    """Two labelled synthetic cases (ED and ES of one subject) on their original grid."""
    return make_cardiac_dataset(1, seed=7)


def _run_cli(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="robustseg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["robustness", *argv])
    return args.fn(args)


class Recorder:
    """An oracle segmenter: returns the true label and keeps the images it was given."""

    def __init__(self, truth):
        self.truth = {c.case_id: c.label for c in truth}
        self.seen = []

    def __call__(self, batch):
        self.seen += [(c.case_id, c.motion_level, c.image) for c in batch]
        return [self.truth[c.case_id].copy() for c in batch]


def test_corruption_is_deterministic_and_level_zero_is_the_case(cases):
    case = cases[0]
    assert rb.corrupt_case(case, 0, seed=3) is case
    a, b = rb.corrupt_case(case, 2, seed=3), rb.corrupt_case(case, 2, seed=3)
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, case.image)
    assert not np.array_equal(rb.corrupt_case(case, 2, seed=4).image, a.image)
    assert not np.array_equal(rb.corrupt_case(case, 3, seed=3).image, a.image)
    assert a.label is case.label and a.spacing == case.spacing and a.origin == case.origin
    assert a.motion_level == 2 and a.meta["simulated_motion"] == {"level": 2, "seed": 3, "phase_axis": -2}
    assert a.image.shape == case.image.shape and a.image.dtype == np.float32 and (a.image >= 0).all()
    # Same image, other case id: another breathing trace (the stream is keyed by the case).
    twin = case.with_arrays(case.image, case.label, case_id=case.case_id + "_twin")
    assert not np.array_equal(rb.corrupt_case(twin, 2, seed=3).image, a.image)
    shifted = case.with_arrays(case.image - 100.0, case.label)  # a normalised image, negative values
    moved = rb.corrupt_case(shifted, 3, seed=0)
    assert moved.image.min() >= shifted.image.min() - 1e-3
    # The same motion as on the raw image, up to the rectification of the small offset of their minima.
    assert np.abs(moved.image + 100.0 - rb.corrupt_case(case, 3, seed=0).image).max() < 0.25
    with pytest.raises(ValueError, match="subset of"):
        rb.corrupt_case(case, 4, seed=0)


def test_oracle_scores_one_at_every_level_and_sees_corrupted_images(cases):
    oracle = Recorder(cases)
    rows = rb.evaluate_robustness({"oracle": oracle}, cases, [0, 1, 3], seed=0)
    assert [(r["motion_level"], r["case_id"]) for r in rows] == [(lv, c.case_id) for lv in (0, 1, 3) for c in cases]
    assert all(r["dice_mean"] == 1.0 and r["hd95_mean"] == 0.0 and r["hd95_unit"] == "mm" for r in rows)
    assert [r["motion_amplitude_px"] for r in rows[::2]] == [0.0, 2.0, 9.0]
    assert rows[-1]["motion_amplitude_mm"] == pytest.approx(9.0 * cases[0].spacing[1])
    originals = {c.case_id: c.image for c in cases}
    for case_id, level, image in oracle.seen:
        assert np.array_equal(image, originals[case_id]) == (level == 0)
    with pytest.raises(DataError, match="no label"):
        rb.evaluate_robustness({"oracle": oracle}, [cases[0].with_arrays(cases[0].image, None)], [0])
    with pytest.raises(DataError, match="predicted shape"):
        rb.evaluate_robustness({"bad": lambda cs: [c.label[:, :10] for c in cs]}, cases, [0])


def test_tiny_models_rows_summary_and_plot(tiny, cases, tmp_path):
    _, ckpts, folder = tiny
    from robustseg.ensemble import Ensemble

    unet2d, _ = load_segmenter(str(ckpts[0]), device=CPU)
    ens = Ensemble.load(folder, CPU)
    ens.spec.centring = "image"  # the first stage is test_ensemble's business; here it only costs time
    models = {"ensemble": ens.predict_cases, "unet2d": unet2d, "oracle": Recorder(cases)}
    levels = [0, 1, 3]
    rows = rb.evaluate_robustness(models, cases, levels, seed=0, batch_cases=2)
    assert len(rows) == len(models) * len(levels) * len(cases)
    assert {(r["model"], r["motion_level"], r["case_id"]) for r in rows} == {
        (m, lv, c.case_id) for m in models for lv in levels for c in cases}
    for r in rows:
        assert {"dice_LV", "dice_MYO", "dice_RV", "hd95_LV", "dice_mean", "subject_id", "phase"} <= set(r)
        assert np.isnan(r["dice_mean"]) or 0.0 <= r["dice_mean"] <= 1.0
    summary = rb.summarise(rows)
    assert [(s["model"], s["motion_level"]) for s in summary] == [(m, lv) for m in models for lv in levels]
    assert all(s["n"] == 2 for s in summary)
    assert all(s["dice_mean_drop"] == 0.0 for s in summary if s["motion_level"] == 0)
    assert all(s["dice_mean"] == 1.0 for s in summary if s["model"] == "oracle")
    assert rb.structures(summary) == ["LV", "MYO", "RV"]
    # A second evaluation of the same cases sees the same corruption: identical numbers.
    again = rb.evaluate_robustness({"unet2d": unet2d}, cases, [3], seed=0)
    first = [r for r in rows if r["model"] == "unet2d" and r["motion_level"] == 3]
    assert [r["dice_mean"] for r in again] == [r["dice_mean"] for r in first]
    files = rb.write_outputs(rows, summary, tmp_path / "out", {"seed": 0})
    assert files["plot"].stat().st_size > 5000
    doc = json.loads(files["summary_json"].read_text())
    assert doc["amplitude_px"] == {"0": 0.0, "1": 2.0, "2": 5.0, "3": 9.0} and len(doc["summary"]) == 9
    assert files["cases"].read_text().count("\n") == len(rows) + 1


def _summary(models=("a", "b")):
    rows = [{"model": m, "motion_level": lv, "case_id": f"c{i}", "dice_LV": 0.9 - 0.1 * lv, "dice_RV": 0.8,
             "dice_mean": 0.85 - 0.05 * lv, "hd95_LV": 2.0, "hd95_mean": float("inf") if lv == 3 else 3.0,
             "hd95_unit": "mm"} for m in models for lv in (0, 3) for i in range(2)]
    return rows, rb.summarise(rows)


def test_log_to_mlflow_metrics_artifacts_and_failed_status(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows, summary = _summary(("ens(a+b)", "models:/cmr@champion"))
    run_id = rb.log_to_mlflow(rows, summary, tracking_uri=uri, experiment="rob", params={"seed": 0},
                              workdir=str(tmp_path))
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["robustseg.role"] == "robustness"
    m = run.data.metrics
    assert m["dice_LV_level3_models-cmr-champion"] == pytest.approx(0.6)
    assert m["dice_mean_drop_level3_ens-a-b"] == pytest.approx(0.15) and m["dice_RV_level0_ens-a-b"] == 0.8
    assert m["hd95_mean_level0_ens-a-b"] == 3.0 and "hd95_mean_level3_ens-a-b" not in m  # inf is left out
    assert run.data.params["seed"] == "0"
    names = {f.path for f in client.list_artifacts(run_id, "robustness")}
    assert names == {f"robustness/{n}" for n in ("cases.csv", "summary.csv", "summary.json", "dice_vs_motion.png")}
    rows1, summary1 = _summary(("only",))
    one = client.get_run(rb.log_to_mlflow(rows1, summary1, tracking_uri=uri, experiment="rob")).data.metrics
    assert one["dice_LV_level0"] == pytest.approx(0.9)  # a single model: no suffix
    with pytest.raises(Exception):
        rb.log_to_mlflow(rows1, summary1, tracking_uri=uri, experiment="rob", run_name="broken",
                         files={"x": tmp_path / "missing.csv"})
    broken = client.search_runs([run.info.experiment_id], "attributes.run_name = 'broken'")
    assert len(broken) == 1 and broken[0].info.status == "FAILED"


def test_cli_arguments():
    assert parse_levels("0,2, 3") == [0, 2, 3]
    with pytest.raises(ConfigError, match="--levels"):
        parse_levels("0,5")
    assert parse_models(["runs/a/fold0/best.pt", "x=ens", "models:/cmr@champion", "other/fold0/best.pt"]) == {
        "fold0": "runs/a/fold0/best.pt", "x": "ens", "cmr@champion": "models:/cmr@champion",
        "fold0-2": "other/fold0/best.pt"}
    with pytest.raises(ConfigError, match="not a checkpoint"):
        load_segmenter("nowhere/model.bin")


def test_cli_end_to_end_store_and_source(tiny, tmp_path, capsys):
    root, ckpts, folder = tiny
    out = tmp_path / "out"
    assert _run_cli(["--model", f"unet2d={ckpts[0]}", "--model", str(folder), "--data", str(root / "shards"),
                     "--fold", "0", "--cases", "2", "--levels", "0,3", "--out", str(out), "--no-tracking",
                     "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "2 model(s) x 2 case(s) x levels [0, 3]" in text and "unet2d" in text and "ensemble" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fold"] == 0 and summary["models"] == {"unet2d": str(ckpts[0]), "ensemble": str(folder)}
    assert [(s["model"], s["motion_level"]) for s in summary["summary"]] == [
        ("unet2d", 0), ("unet2d", 3), ("ensemble", 0), ("ensemble", 3)]
    assert (out / "dice_vs_motion.png").is_file() and not (tmp_path / "mlflow.db").exists()

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert _run_cli(["--model", str(ckpts[1]), "--source", "synthetic_cmr:?n_subjects=1&seed=11", "--cases", "1",
                     "--levels", "0,2", "--out", str(tmp_path / "src"), "--tracking-uri", uri,
                     "--experiment", "rob-cli", "--device", "cpu"]) == 0
    assert "MLflow run" in capsys.readouterr().out
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rob-cli")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and {"dice_LV_level0", "dice_mean_level2"} <= set(run.data.metrics)
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the SQLite database, not in the cwd
    assert run.data.params["model.member1"] == str(ckpts[1]) and run.data.params["n_cases"] == "1"


def test_cli_errors(tiny):
    root, ckpts, _ = tiny
    with pytest.raises(ConfigError, match="--fold needs --data"):
        _run_cli(["--model", str(ckpts[0]), "--source", "synthetic_cmr:?n_subjects=1", "--fold", "0", "--no-tracking"])
    with pytest.raises(ConfigError, match="--data STORE"):
        _run_cli(["--model", str(ckpts[0]), "--no-tracking"])
    with pytest.raises(ConfigError, match="has folds 0..1"):
        _run_cli(["--model", str(ckpts[0]), "--data", str(root / "shards"), "--fold", "7", "--no-tracking"])
    # The store's cases come from 4 synthetic subjects; a 1-subject source lacks most of them.
    with pytest.raises(DataError, match="not found in these sources"):
        _run_cli(["--model", str(ckpts[0]), "--data", str(root / "shards" / "manifest.json"), "--source",
                  "synthetic_cmr:?n_subjects=1", "--no-tracking"])


# ---------------------------------------------------------------------------------- save as it goes, resume
def test_journal_keeps_rows_drops_torn_lines_and_other_settings(tmp_path):
    path = tmp_path / rb.JOURNAL
    j = rb.RowJournal(path, {"seed": 0, "models": {"a": "x.pt"}})
    rows = [{"model": "a", "motion_level": 2, "case_id": f"c{i}", "dice_mean": 0.5 + i, "hd95_mean": float("inf"),
             "motion_amplitude_mm": float("nan")} for i in range(2)]
    j.add(rows)
    with path.open("a") as f:
        f.write('{"model": "a", "motion_level": 3, "case_')  # killed mid-line
    again = rb.RowJournal(path, {"seed": 0, "models": {"a": "x.pt"}})
    assert not again.discarded and set(again.rows) == {("a", 2, "c0"), ("a", 2, "c1")}
    assert again.get("a", 2, "c1")["dice_mean"] == 1.5 and again.get("a", 2, "c1")["hd95_mean"] == float("inf")
    assert again.get("a", 3, "c0") is None
    other = rb.RowJournal(path, {"seed": 1, "models": {"a": "x.pt"}})  # another seed: other images, other rows
    assert other.discarded and not other.rows
    assert not rb.RowJournal(path, {"seed": 1, "models": {"a": "x.pt"}}).discarded  # the new run's own journal
    assert rb.RowJournal(path, {"seed": 1, "models": {"a": "x.pt"}}, restart=True).discarded
    other.remove()
    assert not path.exists()


def test_cli_saves_rows_as_it_goes_and_resumes(tiny, tmp_path, monkeypatch, capsys):
    """Interrupted after 4 of 6 batches, a re-run segments only the 2 left and writes the same table."""
    from robustseg.cli import robustness as robustness_cli

    root, ckpts, _ = tiny
    real = robustness_cli.load_segmenter
    calls: List[tuple] = []

    def segmenters(stop_after=None):
        def load(uri, **kw):
            segment, task = real(uri, **kw)

            def counted(batch):
                if stop_after is not None and len(calls) == stop_after:
                    raise KeyboardInterrupt
                calls.append((uri, batch[0].motion_level, tuple(c.case_id for c in batch)))
                return segment(batch)
            return counted, task
        return load

    def run(out, stop_after=None, extra=()):
        calls.clear()
        monkeypatch.setattr(robustness_cli, "load_segmenter", segmenters(stop_after))
        return _run_cli(["--model", f"a={ckpts[0]}", "--model", f"b={ckpts[1]}", "--data", str(root / "shards"),
                         "--fold", "0", "--cases", "2", "--levels", "0,2,3", "--out", str(out), "--no-tracking",
                         "--device", "cpu", *extra])

    assert run(tmp_path / "whole") == 0 and len(calls) == 6  # 3 levels x 2 models, one batch of 2 cases each
    capsys.readouterr()
    out = tmp_path / "resumed"
    assert run(out, stop_after=4) == 130
    assert f"8 scored row(s) are saved in {out / rb.JOURNAL}" in capsys.readouterr().err
    assert not (out / "cases.csv").exists() and len((out / rb.JOURNAL).read_text().splitlines()) == 1 + 8
    assert run(out) == 0
    assert "resuming: 8 row(s) already scored" in capsys.readouterr().out
    assert [(u, lv) for u, lv, _ in calls] == [(str(ckpts[0]), 3), (str(ckpts[1]), 3)]  # only what was left
    assert (out / "cases.csv").read_text() == (tmp_path / "whole" / "cases.csv").read_text()
    assert (out / "summary.csv").read_text() == (tmp_path / "whole" / "summary.csv").read_text()
    assert not (out / rb.JOURNAL).exists()  # finished: a later run scores afresh
    # Rows of an interrupted run with another seed are not mixed in.
    assert run(out, stop_after=1, extra=["--seed", "5"]) == 130
    assert run(out) == 0 and len(calls) == 6
    assert "other settings" in capsys.readouterr().out
