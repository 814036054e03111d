import json

import h5py
import numpy as np
import pytest

from robustseg.cli import main
from robustseg.data.io import write_with_geometry
from robustseg.data.synthetic import make_cardiac_dataset
from robustseg.engine.evaluate import evaluate_folder, stem_meta
from robustseg.errors import DataError


@pytest.fixture
def pairs(tmp_path):
    cases = make_cardiac_dataset(2, seed=1)  # ED, ES of 2 subjects
    for c in cases:
        write_with_geometry(c.label, tmp_path / "gt" / f"{c.case_id}_gt.nii.gz", c.geometry())
        write_with_geometry(c.label, tmp_path / "pred" / f"{c.case_id}_seg.nii.gz", c.geometry())
    return tmp_path, cases


def test_perfect_predictions_score_one_and_zero_ef_error(pairs):
    root, cases = pairs
    res = evaluate_folder(root / "pred", root / "gt")
    assert len(res["rows"]) == 4
    for r in res["rows"]:
        assert r["dice_LV"] == 1 and r["dice_MYO"] == 1 and r["hd95_RV"] == 0 and r["hd95_unit"] == "mm"
    assert set(res["summary"]["phase"]) == {"ED", "ES"}
    assert len(res["function"]) == 2
    f = res["function"][0]
    assert f["lv_ef_abs_error"] == 0 and 30 < f["lv_ef_gt"] < 80 and f["units"] == "mL"
    assert res["csv"].exists() and res["plot"].exists() and res["function_csv"].exists()


def test_worse_prediction_scores_lower(pairs):
    root, cases = pairs
    c = cases[0]
    eroded = c.label.copy()
    eroded[:, :, : eroded.shape[2] // 2] = 0  # cut half the heart away
    write_with_geometry(eroded, root / "pred" / f"{c.case_id}_seg.nii.gz", c.geometry())
    rows = {r["case_id"]: r for r in evaluate_folder(root / "pred", root / "gt")["rows"]}
    assert rows[c.case_id]["dice_mean"] < 0.9 and rows[cases[1].case_id]["dice_mean"] == 1


def test_errors_name_files(pairs, tmp_path):
    root, cases = pairs
    c = cases[0]
    moved = dict(c.geometry(), origin=[5.0, 0.0, 0.0])
    write_with_geometry(c.label, root / "pred" / f"{c.case_id}_seg.nii.gz", moved)
    with pytest.raises(DataError, match=rf"{c.case_id}_seg.nii.gz: prediction and ground truth .* different grids"):
        evaluate_folder(root / "pred", root / "gt")
    (root / "gt" / f"{cases[1].case_id}_gt.nii.gz").unlink()
    write_with_geometry(c.label, root / "pred" / f"{c.case_id}_seg.nii.gz", c.geometry())
    with pytest.raises(DataError, match=rf"no ground truth for case '{cases[1].case_id}'"):
        evaluate_folder(root / "pred", root / "gt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no predicted masks"):
        evaluate_folder(tmp_path / "empty", root / "gt")


def test_acdc_h5_ground_truth_is_remapped(tmp_path):
    canon = np.zeros((2, 16, 16), np.uint8)
    canon[:, 4:8, 4:8] = 1  # LV
    canon[:, 10:12, 10:12] = 3  # RV
    acdc = np.choose(canon, [0, 3, 2, 1]).astype(np.uint8)  # ACDC stores 1 RV, 3 LV
    (tmp_path / "gt").mkdir()
    with h5py.File(tmp_path / "gt" / "patient001_frame01.h5", "w") as fh:
        fh["image"] = np.random.rand(2, 16, 16).astype(np.float32)
        fh["label"] = acdc
    write_with_geometry(canon, tmp_path / "pred" / "patient001_frame01_seg.nii.gz", {"spacing": [1, 1, 1], "origin": [0, 0, 0],
                                                                                  "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]})
    r = evaluate_folder(tmp_path / "pred", tmp_path / "gt")["rows"][0]
    assert r["dice_LV"] == 1 and r["dice_RV"] == 1 and r["hd95_unit"] == "px"


def test_stem_meta():
    assert stem_meta("syn0003_ES_m2") == {"case_id": "syn0003_ES_m2", "phase": "ES", "subject": "syn0003#_m2",
                                          "motion_level": 2}
    assert stem_meta("P001-1-ED")["phase"] == "ED"
    assert "phase" not in stem_meta("covid_12")


def test_cli_evaluate_and_empty_prediction_exit_code(pairs, capsys, monkeypatch):
    root, _ = pairs
    assert main(["evaluate", "--pred", str(root / "pred"), "--gt", str(root / "gt")]) == 0
    out = capsys.readouterr().out
    assert "cardiac function (2 ED/ES pairs)" in out and "4 predicted / 4 ground truth" in out
    import robustseg.engine.predict as predict

    monkeypatch.setattr(predict, "predict_files", lambda *a, **k: [
        {"input": "/x/blank.nii.gz", "output": "/o/blank_seg.nii.gz", "empty": True, "LV": 0}])
    inputs = root / "gt"  # any folder of volumes: predict_files is replaced
    assert main(["predict", "--model", "m.pt", "--input", str(inputs), "--output", str(root / "o")]) == 3
    assert "blank.nii.gz: empty prediction (no structure found)" in capsys.readouterr().err


def test_missing_prediction_is_an_error_naming_the_case(pairs, capsys):
    root, cases = pairs
    for c in cases:  # scans beside their ground truth (M&Ms layout) are not cases of their own
        write_with_geometry(c.image, root / "gt" / f"{c.case_id}.nii.gz", c.geometry())
    gone = cases[1].case_id
    (root / "pred" / f"{gone}_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=rf"no prediction for 1 of 4 ground-truth cases in .*: {gone} .*--allow-missing"):
        evaluate_folder(root / "pred", root / "gt")
    assert main(["evaluate", "--pred", str(root / "pred"), "--gt", str(root / "gt")]) == 2
    err = capsys.readouterr().err
    assert f"robustseg evaluate: error: {root / 'pred'}: no prediction for 1 of 4" in err and gone in err
    assert not (root / "pred" / "summary.json").exists()  # no partial score left behind


def test_allow_missing_scores_an_empty_mask_and_says_so(pairs, capsys):
    root, cases = pairs
    gone = cases[1].case_id
    (root / "pred" / f"{gone}_seg.nii.gz").unlink()
    res = evaluate_folder(root / "pred", root / "gt", allow_missing=True)
    rows = {r["case_id"]: r for r in res["rows"]}
    assert len(rows) == 4 and res["missing"] == [gone]
    assert rows[gone]["prediction"] == "missing" and rows[gone]["dice_mean"] == 0
    assert rows[cases[0].case_id]["prediction"] == "found" and rows[cases[0].case_id]["dice_mean"] == 1
    summary = json.loads(res["json"].read_text())
    assert (summary["n_predicted"], summary["n_ground_truth"], summary["missing_predictions"]) == (3, 4, [gone])
    assert summary["overall"]["dice_mean"] == pytest.approx(0.75)  # the missing case counts as Dice 0
    assert len(res["function"]) == 1  # EF only where both phases were predicted
    assert main(["evaluate", "--pred", str(root / "pred"), "--gt", str(root / "gt"), "--allow-missing"]) == 0
    out, err = capsys.readouterr()
    assert "3 predicted / 4 ground truth" in out
    assert f"1 case(s) have no prediction and were scored as empty masks (Dice 0, --allow-missing): {gone}" in err
