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

    from robustseg.cli.serve import cmd_serve, register

    p = argparse.ArgumentParser(prog="robustseg")
    register(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "--model", "models:/m@champion", "--port", "9001", "--gpus", "0.25",
                      "--max-upload-mb", "8", "--max-decoded-mb", "100", "--max-inflight-mb", "300",
                      "--admission-wait-s", "2"])
    assert a.fn is cmd_serve and (a.model, a.port, a.gpus, a.max_upload_mb, a.host) == \
        ("models:/m@champion", 9001, 0.25, 8.0, "127.0.0.1")
    assert (a.max_decoded_mb, a.max_inflight_mb, a.admission_wait_s) == (100.0, 300.0, 2.0)
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--device", "tpu"])


# ---------------------------------------------------------------------------------- issue 12
def nifti1_header(dims, datatype, bitpix, vox_offset=352.0):
    """A bare little-endian NIfTI-1 header (+ 4 extension bytes) declaring ``dims`` of ``datatype``."""
    import struct

    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<ff", h, 108, vox_offset, 1.0)
    h[344:348] = b"n+1\0"
    return bytes(h)


def gzip_bomb(dims, datatype, bitpix, zero_bytes):
    """Multi-member gzip: the header, then ``zero_bytes`` of zeros in 8 MiB members (cheap to build)."""
    member = gzip.compress(bytes(8 << 20), compresslevel=9)
    return gzip.compress(nifti1_header(dims, datatype, bitpix)) + member * (zero_bytes // (8 << 20))


def test_settings_memory_limits_env_and_validation():
    env = {"ROBUSTSEG_MODEL_URI": "m", "ROBUSTSEG_MAX_DECODED_MB": "32", "ROBUSTSEG_MAX_INFLIGHT_MB": "100"}
    s = settings_from({"admission_wait_s": "0.5"}, environ=env)
    assert (s.max_decoded_mb, s.max_inflight_mb, s.admission_wait_s) == (32.0, 100.0, 0.5)
    assert s.max_decoded_bytes == 32 * 2**20 and s.max_inflight_bytes == 100 * 2**20
    d = ServeSettings(model_uri="m")
    assert (d.max_decoded_mb, d.max_inflight_mb, d.admission_wait_s) == (512.0, 2048.0, 5.0)
    with pytest.raises(ConfigError, match=r"max_inflight_mb \(8\) must be at least max_upload_mb \(64\)"):
        ServeSettings(model_uri="m", max_inflight_mb=8)
    with pytest.raises(ConfigError, match="admission_wait_s must be at least 0"):
        ServeSettings(model_uri="m", admission_wait_s=-1)


def test_nifti_header_prices_the_decode_from_the_header_only():
    from robustseg.serving import decode_cost, nifti_header

    vol = np.zeros((2, 5, 7), np.int16)
    vol[0, 0, 0] = 1
    h = nifti_header(nifti_bytes(vol), "x")
    assert (h.dims, h.datatype, h.itemsize) == ((7, 5, 2), 4, 2) and h.decoded_bytes == 140
    assert h.file_bytes == h.vox_offset + 140 and h.vox_offset >= 352
    bomb = gzip_bomb((512, 512, 512), 64, 64, 64 << 20)  # declares 1 GiB, holds 64 MiB: never inflated here
    h = nifti_header(bomb, "b")
    assert (h.voxels, h.itemsize, h.decoded_bytes) == (512**3, 8, 2**30)
    assert decode_cost(h, 100) == 100 + 2 * 2**30 + 4 * 512**3
    with pytest.raises(RequestError, match="unsupported NIfTI datatype code 99"):
        nifti_header(nifti1_header((4, 4, 4), 99, 8), "d")
    with pytest.raises(RequestError, match="vox_offset"):
        nifti_header(nifti1_header((4, 4, 4), 16, 32, vox_offset=1e12), "v")


def test_issue_bomb_is_refused_with_413_naming_the_limit():
    from robustseg.serving import inspect_upload

    bomb = gzip_bomb((512, 512, 512), 64, 64, 2**30)  # the issue's case: ~1 MB declaring 512^3 float64
    assert len(bomb) < 2 * 2**20
    with pytest.raises(RequestError) as e:
        case_from_upload(bomb, "bomb.nii.gz", "cardiac")  # default limits
    assert e.value.status == 413
    assert "decodes to 1024.0 MB" in e.value.message and "512 MB limit on a decoded volume (max_decoded_mb)" in \
        e.value.message
    with pytest.raises(RequestError, match=r"over the 0\.5 MB limit on a decoded volume") as e:
        inspect_upload(nifti_bytes(np.ones((9, 128, 128), np.float32)), "v.nii.gz", max_decoded_mb=0.5)
    assert e.value.status == 413


def test_gunzip_bounded_never_inflates_past_the_limit(tmp_path):
    import io

    from robustseg.serving import gunzip_bounded

    liar = gzip_bomb((8, 8, 4), 16, 32, 256 << 20)  # declares 1 KB of voxels, holds 256 MiB of zeros
    out = io.BytesIO()
    assert gunzip_bounded(liar, out, 352 + 1024, "liar") == 352 + 1024
    assert len(out.getvalue()) == 352 + 1024
    members = gzip.compress(b"abc") + gzip.compress(b"def")  # multi-member (bgzip, pigz) is followed
    out = io.BytesIO()
    assert gunzip_bounded(members + b"trailing junk", out, 100, "m") == 6 and out.getvalue() == b"abcdef"
    full = gzip.compress(os.urandom(50_000))
    for cut in (12, len(full) // 2, len(full) - 3):  # cut in the header, the data, the trailer
        with pytest.raises(RequestError, match="corrupt or truncated gzip data") as e:
            gunzip_bounded(full[:cut], io.BytesIO(), 10**9, "cut")
        assert e.value.status == 400
    # Through case_from_upload: the liar decodes its declared 1 KB (all zeros: a constant volume).
    with pytest.raises(RequestError, match="constant"):
        case_from_upload(liar, "liar.nii.gz", "cardiac")


def test_label_maps_are_refused_unless_forced(subject):
    ed = subject[0]
    scan = nifti_bytes(ed.image)
    with pytest.raises(RequestError, match=r"upload '001_ED_gt.nii.gz': looks like a ground-truth label map.*"
                                           r"\?force=true") as e:
        case_from_upload(scan, "001_ED_gt.nii.gz", "cardiac")
    assert e.value.status == 400 and "--force" not in e.value.message
    assert case_from_upload(scan, "001_ED_gt.nii.gz", "cardiac", force=True).shape == ed.shape
    label = nifti_bytes(ed.label.astype(np.uint8))  # an innocent name, label values only
    with pytest.raises(RequestError, match=r"upload 'ed.nii.gz': .*label values \[0, 1, 2, 3\]") as e:
        case_from_upload(label, "ed.nii.gz", "cardiac")
    assert e.value.status == 400
    assert case_from_upload(label, "ed.nii.gz", "cardiac", force=True).shape == ed.shape
    assert case_from_upload(scan, "ed.nii.gz", "cardiac").shape == ed.shape


def test_byte_budget_admission():
    import asyncio

    from robustseg.serving import ByteBudget

    async def scenario():
        budget = ByteBudget(100, wait_s=0.2)
        first = budget.reservation()
        await first.grow(60, "a")
        second = budget.reservation()
        with pytest.raises(RequestError) as e:  # no room within wait_s: 503 + Retry-After
            await second.grow(50, "upload 'b'")
        assert e.value.status == 503 and e.value.retry_after_s == 1 and "upload 'b'" in e.value.message
        assert budget.used == 60 and second.held == 0
        with pytest.raises(RequestError) as e:  # could never fit: 413 at once, naming the budget
            await budget.reservation().grow(101, "upload 'c'")
        assert e.value.status == 413 and "max_inflight_mb" in e.value.message

        async def release_soon():
            await asyncio.sleep(0.05)
            await first.release()

        waiter = budget.reservation()
        await asyncio.gather(release_soon(), waiter.grow(90, "d"))  # waits, then is admitted
        assert budget.used == 90 and budget.peak == 90
        async with waiter:
            pass
        assert budget.used == 0

    asyncio.run(scenario())


def test_public_model_info_hides_server_paths():
    from robustseg.serving import public_model_info, public_path

    root = "/srv/models/ens"
    assert public_path("/srv/models/ens", root) == "ens"
    assert public_path("/srv/models/ens/members/a.pt", root) == "members/a.pt"
    assert public_path("/home/alice/runs/best.pt", root) == "best.pt"
    assert public_path("file:///data/manifest.json") == "manifest.json"
    assert public_path("sqlite:////home/alice/mlflow.db") == "sqlite:///mlflow.db"
    assert public_path("C:\\Users\\bob\\m.pt") == "m.pt"
    for kept in ("models:/robustseg-cmr@champion", "s3://bucket/shards", "unet2d_fold0", "runs:/abc/model"):
        assert public_path(kept, root) == kept
    info = public_model_info({"uri": root, "members": [{"source": "/x/y/best.pt", "fold": 0}], "n": 1.5}, root)
    assert info == {"uri": "ens", "members": [{"source": "best.pt", "fold": 0}], "n": 1.5}


def test_check_port_free_names_a_busy_port():
    import socket

    from robustseg.serving import ServeStartError, check_port_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServeStartError, match=f"port {port} on 127.0.0.1 is already in use.*--port"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", free_port())


def test_model_load_error_names_the_model():
    from robustseg.serving import ModelLoadError

    e = ModelLoadError.wrap("/srv/ens", ValueError("bad checkpoint"))
    assert str(e) == "cannot load the model /srv/ens: ValueError: bad checkpoint"
    e = ModelLoadError.wrap("/srv/ens", DataError("/srv/ens/spec.json", "invalid ensemble spec"))
    assert str(e) == "cannot load the model: /srv/ens/spec.json: invalid ensemble spec"
