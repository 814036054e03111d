"""benchmarks/per_case_diff.py: paired per-case comparison of accuracy-budget runs, with patient bootstrap."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("per_case_diff", REPO / "benchmarks" / "per_case_diff.py")
pcd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pcd)  # type: ignore[union-attr]

STRUCTS = ("LV", "MYO", "RV")


def _doc(scores: dict) -> dict:
    """{case: {level: (LV, MYO, RV)}} -> the benchmark's per_case layout."""
    return {c: {lv: {"dice": dict(zip(STRUCTS, v)), "hd95": {}} for lv, v in by.items()} for c, by in scores.items()}


def _base(n_patients: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"acdc_patient{p:03d}_{ph}": {"l0": tuple(rng.uniform(0.8, 0.95, 3)), "l3": tuple(rng.uniform(0.5, 0.8, 3))}
            for p in range(n_patients) for ph in ("ED", "ES")}


def _shift(scores: dict, by: dict) -> dict:
    return {c: {lv: tuple(x + by.get(lv, 0.0) for x in v) for lv, v in levels.items()} for c, levels in scores.items()}


def test_a_uniform_shift_is_reported_exactly_with_a_degenerate_interval():
    base = _base()
    lever = _shift(base, {"l3": 0.05})
    rep = pcd.compare([(_doc(base), _doc(lever))], [0, 3], n_boot=200)
    assert rep["cases"] == 8 and rep["patients"] == 4
    l0, l3 = rep["levels"]["l0"], rep["levels"]["l3"]
    assert l0["diff"] == pytest.approx(0.0) and l0["up"] == l0["down"] == 0
    assert l3["diff"] == pytest.approx(0.05)
    assert l3["ci95"] == pytest.approx([0.05, 0.05])  # every resample moves by the same amount
    assert (l3["up"], l3["down"]) == (8, 0) and l3["median_volume_diff"] == pytest.approx(0.05)
    assert rep["drop"]["diff"] == pytest.approx(-0.05)


def test_level_means_match_the_benchmark_and_skip_absent_structures():
    scores = {"p001_ED": {"l0": (0.9, 0.8, float("nan"))}, "p001_ES": {"l0": (0.7, 0.6, 0.5)}}
    # Per structure over volumes (RV only from p001_ES), then over structures: (0.8 + 0.7 + 0.5) / 3.
    rep = pcd.compare([(_doc(scores), _doc(scores))], [0], n_boot=0)
    assert rep["levels"]["l0"]["base"] == pytest.approx((0.8 + 0.7 + 0.5) / 3)
    assert "ci95" not in rep["levels"]["l0"]


def test_one_patient_moving_widens_the_interval_and_is_listed_first():
    base = _base(n_patients=8)
    lever = {c: ({"l0": v["l0"], "l3": tuple(x + 0.3 for x in v["l3"])} if c.startswith("acdc_patient003") else v)
             for c, v in base.items()}
    rep = pcd.compare([(_doc(base), _doc(lever))], [0, 3], n_boot=500)
    l3 = rep["levels"]["l3"]
    assert l3["diff"] == pytest.approx(0.3 * 2 / 16)
    lo, hi = l3["ci95"]
    assert lo == pytest.approx(0.0) and hi > l3["diff"]  # resamples without patient 3 move nothing
    assert {m["case"] for m in l3["most_moved"][:2]} == {"acdc_patient003_ED", "acdc_patient003_ES"}
    assert (l3["up"], l3["down"]) == (2, 0)


def test_pairs_are_pooled_by_averaging_their_differences():
    b0, b1 = _base(seed=0), _base(seed=1)
    pairs = [(_doc(b0), _doc(_shift(b0, {"l3": 0.04}))), (_doc(b1), _doc(_shift(b1, {"l3": -0.02})))]
    rep = pcd.compare(pairs, [0, 3], n_boot=100)
    assert rep["levels"]["l3"]["diff"] == pytest.approx(0.01)
    assert rep["levels"]["l3"]["ci95"] == pytest.approx([0.01, 0.01])


def test_runs_on_different_volumes_are_refused_by_name():
    base = _base()
    other = {k: v for k, v in base.items() if k != "acdc_patient000_ED"}
    with pytest.raises(ValueError, match="base.json and lever.json score different volumes.*acdc_patient000_ED"):
        pcd.compare([(_doc(base), _doc(other))], [0, 3], names=[("base.json", "lever.json")])
    with_l2 = {c: {**v, "l2": v["l3"]} for c, v in base.items()}
    with pytest.raises(ValueError, match="lever.json: no scores at l2"):
        pcd.compare([(_doc(with_l2), _doc(base))], [0, 2], names=[("base.json", "lever.json")])
    with pytest.raises(ValueError, match="no runs to compare"):
        pcd.compare([], [0])


def test_cli_writes_the_json_and_names_a_bad_file(tmp_path, capsys):
    base = _base()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc(base)))
    b.write_text(json.dumps(_doc(_shift(base, {"l0": -0.01, "l3": 0.02}))))
    out = tmp_path / "cmp" / "diff.json"
    assert pcd.main(["--pair", str(a), str(b), "--levels", "0", "3", "--boot", "50", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["drop"]["diff"] == pytest.approx(-0.03)
    assert "drop" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    assert pcd.main(["--pair", str(a), str(bad)]) == 2
    assert f"{bad}: not a per_case.json" in capsys.readouterr().err
    assert pcd.main(["--pair", str(a), str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read per-case scores" in capsys.readouterr().err
