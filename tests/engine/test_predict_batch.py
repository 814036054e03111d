"""`robustseg predict` over a folder: label maps skipped, bad files survived, --output checked first,
masks in the scan's exact physical space.

The model is replaced by a threshold (``predict_case``/``load_predictor`` patched), so these
tests exercise the batch logic and the CLI in well under a second each.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

import robustseg.engine.predict as predict
from data.oblique_nifti import write_oblique_scanner_nifti
from robustseg.cli import main
from robustseg.data.io import write_with_geometry
from robustseg.data.synthetic import make_cardiac_dataset
from robustseg.engine.predict import segment_files
from robustseg.errors import DataError

NAMES = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}


def _threshold(case) -> np.ndarray:
    """Stand-in for a model: bright voxels are "LV"."""
    return (case.image > np.percentile(case.image, 90)).astype(np.uint8)


@pytest.fixture
def fake_model(monkeypatch):
    """Replace model loading and inference: predict_files then runs everything else for real."""
    loaded = []

    def load(checkpoint, device=None, plan=None):
        loaded.append(checkpoint)
        return SimpleNamespace(task="cardiac", class_names=NAMES)

    monkeypatch.setattr(predict, "load_predictor", load)
    monkeypatch.setattr(predict, "predict_case", lambda pred, case, **kw: _threshold(case))
    return loaded


@pytest.fixture
def folder(tmp_path) -> Path:
    """Scans a and c, a broken file b between them, a ground truth, a label map with a scan's name."""
    case = make_cardiac_dataset(1, seed=3)[0]
    root = tmp_path / "in"
    for name in ("a_scan", "c_scan"):
        write_with_geometry(case.image, root / f"{name}.nii.gz", case.geometry())
    (root / "b_broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    # Unreadable on purpose: a *_gt file must be skipped by its name, before it is read.
    (root / "a_scan_gt.nii.gz").write_bytes(b"garbage")
    write_with_geometry(case.label, root / "d_volume.nii.gz", case.geometry())  # values 0-3 only
    return root


def _predict(folder: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--model", "m.pt", "--input", str(folder), "--output", str(out), *extra])


def test_label_maps_are_skipped_with_a_notice(folder, tmp_path):
    rows = segment_files(_threshold, "cardiac", NAMES, folder, tmp_path / "out", fail_fast=False)
    assert sorted(Path(r["input"]).name for r in rows) == ["a_scan.nii.gz", "c_scan.nii.gz"]
    skipped = {Path(s["input"]).name: s["reason"] for s in rows.skipped}
    assert "name marks a label map" in skipped["a_scan_gt.nii.gz"]  # by name, never read
    assert "only the label values [0, 1, 2, 3]" in skipped["d_volume.nii.gz"]  # by its voxels
    assert not (tmp_path / "out" / "a_scan_gt_seg.nii.gz").exists()
    assert not (tmp_path / "out" / "d_volume_seg.nii.gz").exists()


def test_force_segments_label_maps(folder, tmp_path):
    (folder / "a_scan_gt.nii.gz").unlink()
    (folder / "b_broken.nii.gz").unlink()
    rows = segment_files(_threshold, "cardiac", NAMES, folder, tmp_path / "out", force=True)
    assert not rows.skipped and (tmp_path / "out" / "d_volume_seg.nii.gz").is_file()


def test_cli_keeps_going_past_a_bad_file_and_lists_it(folder, tmp_path, fake_model, capsys):
    assert _predict(folder, tmp_path / "out") == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_scan_seg.nii.gz", "c_scan_seg.nii.gz"]
    out, err = capsys.readouterr()
    assert "2 masks written" in out and "(2 skipped, 1 failed, of 5 inputs)" in out
    assert "a_scan_gt.nii.gz: its name marks a label map" in out and "d_volume.nii.gz: its voxels" in out
    assert f"error: {folder / 'b_broken.nii.gz'}: corrupt or truncated gzip data" in err
    assert "1 of 5 inputs failed" in err and "Traceback" not in err


def test_cli_fail_fast_stops_at_the_first_bad_file(folder, tmp_path, fake_model, capsys):
    assert _predict(folder, tmp_path / "out", "--fail-fast") == 2
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_scan_seg.nii.gz"]  # c never reached
    assert "b_broken.nii.gz: corrupt or truncated gzip data" in capsys.readouterr().err


def test_cli_only_label_maps_is_an_error_unless_forced(folder, tmp_path, fake_model, capsys):
    for name in ("a_scan", "c_scan", "b_broken", "a_scan_gt"):
        (folder / f"{name}.nii.gz").unlink()
    assert _predict(folder, tmp_path / "out") == 2
    assert "nothing segmented: every input looks like a label map" in capsys.readouterr().err
    assert _predict(folder, tmp_path / "out", "--force") == 0
    assert (tmp_path / "out" / "d_volume_seg.nii.gz").is_file()


def _assert_output_refused(args, path, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"robustseg predict: error: {path}: " in err and match in err and "Traceback" not in err


def test_bad_output_is_refused_before_the_model_is_loaded(folder, tmp_path, fake_model, capsys):
    a_file = tmp_path / "masks.txt"
    a_file.write_text("not a folder")
    base = ["predict", "--model", "m.pt", "--input", str(folder), "--output"]
    _assert_output_refused(base + [str(a_file)], a_file, capsys, "is an existing file")
    _assert_output_refused(base + [str(a_file / "sub")], a_file / "sub", capsys, f"{a_file} is a file, not a folder")
    # The endpoint path too: no request is sent (nothing listens on port 9).
    _assert_output_refused(["predict", "--endpoint", "http://127.0.0.1:9", "--input", str(folder), "--output",
                            str(a_file)], a_file, capsys, "is an existing file")
    assert fake_model == []  # never loaded
    with pytest.raises(DataError, match="is an existing file"):
        predict.predict_files("m.pt", folder, a_file)
    assert fake_model == []


def test_unwritable_output_is_refused_before_the_model_is_loaded(folder, tmp_path, fake_model, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see a read-only folder
        real = os.access
        monkeypatch.setattr(predict.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    else:
        locked.chmod(0o555)
    try:
        out = locked / "masks"
        _assert_output_refused(["predict", "--model", "m.pt", "--input", str(folder), "--output", str(out)],
                               out, capsys, f"cannot create it: {locked} is not writable")
        _assert_output_refused(["predict", "--model", "m.pt", "--input", str(folder), "--output", str(locked)],
                               locked, capsys, "the output folder is not writable")
    finally:
        locked.chmod(0o755)
    assert fake_model == []


def test_masks_occupy_the_oblique_scans_exact_space(tmp_path):
    scan = tmp_path / "in" / "oblique.nii.gz"
    scan.parent.mkdir()
    write_oblique_scanner_nifti(scan, np.random.default_rng(0).normal(size=(4, 20, 16)).astype(np.float32))
    segment_files(_threshold, "cardiac", NAMES, scan, tmp_path / "out")
    _assert_combines(scan, tmp_path / "out" / "oblique_seg.nii.gz")


def _assert_combines(scan: Path, mask_path: Path) -> None:
    """ITK combines the scan's own label image and the mask at its default tolerance (1e-6)."""
    image = sitk.ReadImage(str(scan))
    mask = sitk.ReadImage(str(mask_path))
    arr = sitk.GetArrayFromImage(image)
    reference = sitk.Cast(image > float(np.percentile(arr, 90)), sitk.sitkUInt8)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(reference, mask)  # raises "Inputs do not occupy the same physical space" otherwise
    assert overlap.GetDiceCoefficient() > 0.99  # float64 vs float32 thresholds may differ at a voxel


@pytest.mark.realdata
def test_masks_occupy_the_real_mnms_scans_space(shared_data, tmp_path):
    for name in ("001_SA_ED.nii.gz", "001_SA_ED_gt.nii.gz"):
        shutil.copy(shared_data(f"mnms2_sample/{name}"), tmp_path / name)
    rows = segment_files(_threshold, "cardiac", NAMES, tmp_path, tmp_path / "out")
    assert [Path(s["input"]).name for s in rows.skipped] == ["001_SA_ED_gt.nii.gz"]  # the real ground truth
    _assert_combines(tmp_path / "001_SA_ED.nii.gz", tmp_path / "out" / "001_SA_ED_seg.nii.gz")
