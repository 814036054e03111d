"""The fit loop on tiny synthetic data: learning, exact resume, early stopping, checkpoint checks."""

import numpy as np
import pytest
import torch

from robustseg.data.io import write_with_geometry
from robustseg.data.synthetic import make_cardiac_dataset, make_ct_subject
from robustseg.engine.checkpoint import CheckpointError, load_checkpoint
from robustseg.engine.predict import load_predictor, predict_files, read_input, predict_case
from robustseg.engine.train import train_from_config
from robustseg.errors import DataError
from tiny import Stop as _Stop, stop_after as _stop_after, tiny_cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    cfg = tiny_cfg(root)
    res = train_from_config(cfg, out_dir=root / "run", device=torch.device("cpu"))
    return root, cfg, res


def test_fit_writes_checkpoints_and_history(trained):
    root, cfg, res = trained
    assert res.epochs_run == 2 and len(res.history) == 2
    assert res.best_checkpoint.exists() and res.last_checkpoint.exists()
    h = res.history[-1]
    for key in ("loss", "ce", "dice_loss", "lr", "slices_per_s", "val_dice", "val_dice_LV", "val_dice_MYO", "val_dice_RV"):
        assert key in h and np.isfinite(h[key])
    ck = load_checkpoint(res.last_checkpoint)
    assert ck["epoch"] == 2 and ck["backbone"] == "unet2d" and ck["plan"]["name"] == "cmr"
    assert ck["config"]["model"]["params"]["filters_base"] == 4
    assert (root / "run" / "history.json").exists()
    import csv

    rows = list(csv.DictReader(open(root / "run" / "val_cases.csv")))
    assert len(rows) == 2 and {"case_id", "dice_LV", "dice_MYO", "dice_RV", "phase"} <= set(rows[0])
    overlays = sorted((root / "run" / "overlays").glob("*.png"))
    assert [p.stem for p in overlays] == sorted(r["case_id"] for r in rows)


def test_resume_is_exact(tmp_path, trained):
    root, cfg, full = trained
    # Same data, fresh run folder: the run "dies" after epoch 1, then resumes for epoch 2.
    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        train_from_config(cfg, out_dir=out, device=torch.device("cpu"), callbacks=[_stop_after(1)])
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    res = train_from_config(cfg, out_dir=out, device=torch.device("cpu"))
    assert [h["epoch"] for h in res.history] == [1, 2]  # continued, not restarted
    a = load_checkpoint(full.last_checkpoint)["model"]
    b = load_checkpoint(out / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)



def test_resume_with_other_model_params_is_refused(tmp_path, trained):
    root, cfg, res = trained
    other = cfg.with_overrides(["model.params.filters_base=8"])
    with pytest.raises(CheckpointError, match="model config differs"):
        train_from_config(other, out_dir=res.last_checkpoint.parent, device=torch.device("cpu"))


def test_early_stopping(tmp_path, trained):
    root, cfg, _ = trained
    stop = cfg.with_overrides(["optim.epochs=6", "optim.patience=1", "optim.lr=1e-9"])
    res = train_from_config(stop, out_dir=tmp_path / "es", device=torch.device("cpu"))
    assert res.stopped_early and res.epochs_run < 6


def test_predict_writes_mask_in_input_geometry(tmp_path, trained):
    _, _, res = trained
    case = make_cardiac_dataset(1, seed=9)[0]
    case.origin, case.spacing = (12.0, -7.0, 3.0), (1.4, 1.4, 9.0)
    write_with_geometry(case.image, tmp_path / "in" / "x.nii.gz", case.geometry())
    rows = predict_files(res.best_checkpoint, tmp_path / "in", tmp_path / "out", device=torch.device("cpu"), tta=False)
    import SimpleITK as sitk

    img = sitk.ReadImage(str(tmp_path / "out" / "x_seg.nii.gz"))
    assert img.GetSize() == case.image.shape[::-1]
    assert np.allclose(img.GetSpacing(), case.spacing) and np.allclose(img.GetOrigin(), case.origin)
    assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 1, 2, 3}
    assert rows[0]["output"].endswith("x_seg.nii.gz")
    pred = load_predictor(res.best_checkpoint, torch.device("cpu"))
    big = make_cardiac_dataset(1, seed=9, size=(160, 150))[0]  # larger than the 64x64 training crop
    for full in (False, True):
        lbl = predict_case(pred, big, tta=False, full_fov=full)
        assert lbl.shape == big.image.shape and lbl.dtype == np.uint8


def test_predict_bad_inputs(tmp_path, trained):
    _, _, res = trained
    pred = load_predictor(res.best_checkpoint, torch.device("cpu"))
    ct = make_ct_subject(0, 0)
    write_with_geometry(ct.image, tmp_path / "ct.nii.gz", ct.geometry())
    with pytest.raises(DataError, match=r"ct.nii.gz: looks like CT in HU"):
        predict_case(pred, read_input(tmp_path / "ct.nii.gz", "cardiac"))
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkFloat32), str(tmp_path / "cine.nii.gz"))
    with pytest.raises(DataError, match=r"cine.nii.gz: .*4D"):
        read_input(tmp_path / "cine.nii.gz", "cardiac")
    with pytest.raises(CheckpointError, match="differs from the one the model was trained with"):
        load_predictor(res.best_checkpoint, torch.device("cpu"), plan={"name": "cmr", "version": 1, "params": {}})
    with pytest.raises(DataError, match="input not found"):
        predict_files(res.best_checkpoint, tmp_path / "missing", tmp_path / "o")
