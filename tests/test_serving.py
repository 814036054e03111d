"""`robustseg.serving` without Ray: settings, upload validation, response bodies, the client's errors."""
import gzip
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import free_port
from robustseg.data.synthetic import make_cardiac_subject
from robustseg.errors import ConfigError, DataError
from robustseg.serving import (EndpointError, RequestError, ServeSettings, case_from_upload, cardiac_json,
                               error_response, json_safe, mask_to_nifti_bytes, nifti_dims, post_volumes,
                               safe_stem, settings_from, structure_voxels)

SPACING = (1.25, 1.5, 8.0)
ORIGIN = (10.5, -20.25, 33.0)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def nifti_bytes(array, *, gz=True, spacing=SPACING, origin=ORIGIN, direction=DIRECTION, descrip="robustseg test"):
    """Bytes of a NIfTI file holding ``array`` (3D gets the test geometry)."""
    img = sitk.GetImageFromArray(np.asarray(array), isVector=False)
    if img.GetDimension() == 3:
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        img.SetDirection(direction)
    img.SetMetaData("ITK_FileNotes", descrip)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / ("v.nii.gz" if gz else "v.nii")
        sitk.WriteImage(img, str(p), useCompression=gz)
        return p.read_bytes()


@pytest.fixture(scope="module")
def subject():
    return make_cardiac_subject(0, 7, n_slices=4, size=(64, 64))


def test_settings_env_fallback_and_precedence():
    env = {"ROBUSTSEG_MODEL_URI": "models:/m@champion", "MLFLOW_TRACKING_URI": "sqlite:////x.db",
           "ROBUSTSEG_MAX_UPLOAD_MB": "12.5"}
    s = settings_from({}, environ=env)
    assert (s.model_uri, s.tracking_uri, s.max_upload_mb) == ("models:/m@champion", "sqlite:////x.db", 12.5)
    assert s.max_upload_bytes == int(12.5 * 2**20)
    s = settings_from({"model_uri": "/ens", "max_upload_mb": 3, "tracking_uri": None, "device": "auto",
                       "max_batch_size": "6"}, environ=env)
    assert (s.model_uri, s.max_upload_mb, s.tracking_uri, s.device, s.max_batch_size) == \
        ("/ens", 3.0, "sqlite:////x.db", None, 6)
    assert ServeSettings(**s.to_dict()) == s


def test_settings_errors():
    with pytest.raises(ConfigError, match=r"unknown serve settings \['modle_uri'\].*model_uri"):
        settings_from({"modle_uri": "x"}, environ={})
    with pytest.raises(ConfigError, match="no model to serve.*ROBUSTSEG_MODEL_URI"):
        settings_from({}, environ={})
    with pytest.raises(ConfigError, match="max_upload_mb: cannot read 'lots'"):
        settings_from({"model_uri": "x"}, environ={"ROBUSTSEG_MAX_UPLOAD_MB": "lots"})
    with pytest.raises(ConfigError, match="max_upload_mb must be at least"):
        ServeSettings(model_uri="x", max_upload_mb=-1)
    with pytest.raises(ConfigError, match="device"):
        ServeSettings(model_uri="x", device="tpu")


def test_safe_stem():
    assert safe_stem("../../etc/a b.nii.gz") == "a_b"
    assert safe_stem("C:\\data\\case01.NII") == "case01"
    assert safe_stem("") == "upload" and safe_stem("...") == "upload"


def test_nifti_dims_and_rejections():
    vol = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    assert nifti_dims(nifti_bytes(vol), "x") == (7, 5, 2)
    assert nifti_dims(nifti_bytes(vol, gz=False), "x") == (7, 5, 2)
    with pytest.raises(RequestError, match="not a NIfTI") as e:
        nifti_dims(os.urandom(1000), "upload 'r.nii'")
    assert e.value.status == 400
    with pytest.raises(RequestError, match="not a NIfTI"):
        nifti_dims(gzip.compress(os.urandom(1000)), "g")
    with pytest.raises(RequestError, match="truncated gzip") as e:
        nifti_dims(nifti_bytes(vol)[:30], "t")
    assert e.value.status == 400


def test_case_from_upload_good(subject):
    ed = subject[0]
    data = nifti_bytes(ed.image)
    case = case_from_upload(data, "dir/ED case.nii", "cardiac")  # gzip found by magic, not the name
    assert case.shape == ed.image.shape and np.array_equal(case.image, ed.image)
    assert np.allclose(case.spacing, SPACING) and np.allclose(case.origin, ORIGIN)
    assert np.allclose(case.direction, DIRECTION)
    assert case.source_path == "upload 'dir/ED case.nii'" and case.case_id == "ED_case"
    assert case.meta["nifti_header"]["descrip"] == "robustseg test"


@pytest.mark.parametrize("what,status,pattern", [
    ("too_big", 413, r"over the 0\.01 MB upload limit"),
    ("too_many_voxels", 413, "over the 100 voxel limit"),
    ("empty", 400, "empty upload"),
    ("truncated", 400, "truncated gzip"),
    ("truncated_raw", 400, "truncated NIfTI"),
    ("nan", 400, "NaN"),
    ("2d", 400, "2D"),
    ("4d", 400, "4D with 2 volumes"),
    ("constant", 400, "constant"),
])
def test_case_from_upload_rejects(subject, what, status, pattern):
    img = subject[0].image
    limits = {"max_upload_mb": 64, "max_voxels": 10**8}
    if what == "too_big":
        data, limits["max_upload_mb"] = nifti_bytes(img, gz=False), 0.01
    elif what == "too_many_voxels":
        data, limits["max_voxels"] = nifti_bytes(img), 100
    elif what == "empty":
        data = b""
    elif what == "truncated":
        full = nifti_bytes(img)
        data = full[: len(full) // 2]
    elif what == "truncated_raw":
        full = nifti_bytes(img, gz=False)
        data = full[: len(full) - 100]
    elif what == "nan":
        bad = img.copy()
        bad[1, 3, 4] = np.nan
        data = nifti_bytes(bad)
    elif what == "2d":
        data = nifti_bytes(img[0])
    elif what == "4d":
        data = nifti_bytes(np.stack([img, img]))
    else:
        data = nifti_bytes(np.full_like(img, 5.0))
    with pytest.raises(RequestError, match=pattern) as e:
        case_from_upload(data, "my scan.nii.gz", "cardiac", **limits)
    assert e.value.status == status
    assert e.value.message.startswith("upload 'my scan.nii.gz': ")
    assert "robustseg_upload_" not in e.value.message and tempfile.gettempdir() not in e.value.message


def test_mask_to_nifti_bytes_keeps_geometry_and_header(subject, tmp_path):
    ed = subject[0]
    case = case_from_upload(nifti_bytes(ed.image), "ed.nii.gz", "cardiac")
    body = mask_to_nifti_bytes(ed.label, case)
    assert body[:2] == b"\x1f\x8b"
    p = tmp_path / "m.nii.gz"
    p.write_bytes(body)
    m = sitk.ReadImage(str(p))
    assert m.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(m), ed.label)
    assert np.allclose(m.GetSpacing(), SPACING) and np.allclose(m.GetOrigin(), ORIGIN)
    assert np.allclose(m.GetDirection(), DIRECTION)
    assert m.GetMetaData("descrip") == "robustseg test"
    with pytest.raises(ValueError, match="mask shape"):
        mask_to_nifti_bytes(ed.label[:2], case)


def test_cardiac_json_values_and_flags(subject):
    ed, es = subject
    out = cardiac_json(ed.label, es.label, ed, es)
    voxel_ml = np.prod(ed.spacing) / 1000
    assert out["units"] == "mL" and out["mass_units"] == "g" and out["ef_units"] == "%"
    assert out["lv_edv"] == pytest.approx((ed.label == 1).sum() * voxel_ml)
    assert out["lv_ef"] == pytest.approx(100 * (out["lv_edv"] - out["lv_esv"]) / out["lv_edv"])
    assert out["myo_mass_ed"] == pytest.approx(1.05 * (ed.label == 2).sum() * voxel_ml)
    assert out["structures"]["RV"]["es_voxels"] == int((es.label == 3).sum())
    assert out["structures"]["LV"]["ed_components"] == 1 and out["flags"] == []
    assert out["ed"]["shape_zyx"] == list(ed.shape)
    json.dumps(out, allow_nan=False)

    empty_lv = np.where(ed.label == 1, 0, ed.label).astype(np.uint8)
    split_rv = es.label.copy()
    split_rv[:, :, :2] = 0
    split_rv[0, 0, 0] = 3  # a stray RV voxel far from the rest: a second component
    out = cardiac_json(empty_lv, split_rv, ed, es)
    assert out["lv_ef"] is None and out["lv_edv"] == 0.0
    assert "LV empty at ED" in out["structures"]["LV"]["flags"]
    assert out["structures"]["RV"]["es_components"] == 2
    assert any(f.startswith("RV has 2 components at ES") for f in out["structures"]["RV"]["flags"])
    json.dumps(out, allow_nan=False)


def test_cardiac_json_flags_grid_mismatch_and_unknown_spacing(subject):
    ed, es = subject
    other = es.with_arrays(es.image, es.label, spacing=(1.0, 1.0, 8.0))
    out = cardiac_json(ed.label, es.label, ed, other)
    assert any("ED and ES grids differ" in f for f in out["flags"])
    unknown = ed.with_arrays(ed.image, ed.label, spacing_known=False)
    with pytest.raises(RequestError, match="not comparable") as e:
        cardiac_json(ed.label, es.label, unknown, other)
    assert e.value.status == 400


def test_error_response_and_json_safe():
    assert error_response(RequestError(413, "big")) == (413, {"error": "big"})
    assert error_response(DataError("upload 'a'", "looks like CT")) == (400, {"error": "upload 'a': looks like CT"})
    status, body = error_response(KeyError("boom"))
    assert status == 500 and "KeyError" in body["error"]
    assert json_safe({"a": float("nan"), "b": [np.float32(1.5), np.int64(2), math.inf], "c": "x"}) == \
        {"a": None, "b": [1.5, 2, None], "c": "x"}
    lab = np.array([[[0, 1, 1, 3]]], np.uint8)
    assert structure_voxels(lab, {0: "background", 1: "LV", 2: "MYO", 3: "RV"}) == {"LV": 2, "MYO": 0, "RV": 1}


def test_client_errors(tmp_path, subject):
    vol = tmp_path / "in" / "a.nii.gz"
    vol.parent.mkdir()
    vol.write_bytes(nifti_bytes(subject[0].image))
    with pytest.raises(EndpointError, match=r"/v1/segment: cannot reach the service.*robustseg serve"):
        post_volumes(f"http://127.0.0.1:{free_port()}", vol.parent, tmp_path / "out", timeout=5)
    h5 = tmp_path / "in" / "b.h5"
    h5.write_bytes(b"x")
    with pytest.raises(DataError, match="only NIfTI"):
        post_volumes("http://127.0.0.1:1", vol.parent, tmp_path / "out")


def test_serve_parser():
    import argparse

    from robustseg.serve_cli import add_serve_parser, cmd_serve

    p = argparse.ArgumentParser(prog="robustseg")
    add_serve_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "--model", "models:/m@champion", "--port", "9001", "--gpus", "0.25",
                      "--max-upload-mb", "8"])
    assert a.fn is cmd_serve and (a.model, a.port, a.gpus, a.max_upload_mb, a.host) == \
        ("models:/m@champion", 9001, 0.25, 8.0, "127.0.0.1")
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--device", "tpu"])
