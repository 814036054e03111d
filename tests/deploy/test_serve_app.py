"""The Serve application over real HTTP on 127.0.0.1: a real Ray Serve, the tiny trained ensemble.

One application for the module (1 MB upload limit, small voxel limit), started with
`deploy.serve_app.start_local`. Every bad request must get a 4xx JSON answer naming the
problem, and the service must still answer good requests afterwards.
"""
import asyncio
import gzip
import json
import os
import re
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from robustseg.data.synthetic import make_cardiac_subject
from robustseg.cli.serve import predict_endpoint
from robustseg.serving import EndpointError, ServeSettings, post_volumes, settings_from

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SPACING = (1.25, 1.5, 8.0)
ORIGIN = (10.5, -20.25, 33.0)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
MAX_VOXELS = 200_000


def nifti_bytes(array, *, gz=True):
    """A NIfTI file of ``array`` (3D gets the test geometry and a description)."""
    img = sitk.GetImageFromArray(np.asarray(array), isVector=False)
    if img.GetDimension() == 3:
        img.SetSpacing(SPACING)
        img.SetOrigin(ORIGIN)
        img.SetDirection(DIRECTION)
    img.SetMetaData("ITK_FileNotes", "robustseg serve test")
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / ("v.nii.gz" if gz else "v.nii")
        sitk.WriteImage(img, str(p), useCompression=gz)
        return p.read_bytes()


def read_mask(body: bytes) -> sitk.Image:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.nii.gz"
        p.write_bytes(body)
        return sitk.ReadImage(str(p))


@pytest.fixture(scope="module")
def volumes():
    ed, es = make_cardiac_subject(0, 11, n_slices=6, size=(64, 64))
    return {"ed": ed.image, "es": es.image, "ed_gz": nifti_bytes(ed.image),
            "es_gz": nifti_bytes(es.image), "ed_raw": nifti_bytes(ed.image, gz=False)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_ensemble import tiny_ensemble_folder

    return tiny_ensemble_folder(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="module")
def url(model_dir):
    from tiny_ensemble import local_serve

    settings = ServeSettings(model_uri=str(model_dir), max_upload_mb=1, max_voxels=MAX_VOXELS, device="cpu",
                             max_batch_size=4, batch_wait_timeout_s=0.1)
    with local_serve(settings) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def check_mask(resp, shape):
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/gzip"
    assert resp.headers["x-robustseg-model"] == "tiny"
    mask = read_mask(resp.content)
    arr = sitk.GetArrayFromImage(mask)
    assert arr.shape == shape
    assert np.allclose(mask.GetSpacing(), SPACING) and np.allclose(mask.GetOrigin(), ORIGIN)
    assert np.allclose(mask.GetDirection(), DIRECTION)
    assert mask.GetMetaData("descrip") == "robustseg serve test"
    assert set(np.unique(arr)) <= {0, 1, 2, 3}
    voxels = json.loads(resp.headers["x-robustseg-voxels"])
    assert voxels == {name: int((arr == c).sum()) for c, name in ((1, "LV"), (2, "MYO"), (3, "RV"))}
    return arr


# ---------------------------------------------------------------------------------- config
def test_serve_config_yaml_is_valid():
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    import deploy.serve_app as serve_app

    cfg = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(cfg)
    # The schemas accept unknown keys (forward compatibility): catch typos here instead.
    assert set(cfg) <= set(ServeDeploySchema.model_fields)
    (app,) = cfg["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    module, attr = app["import_path"].split(":")
    assert module == "deploy.serve_app" and callable(getattr(serve_app, attr))
    (dep,) = app["deployments"]
    assert set(dep) <= set(DeploymentSchema.model_fields)
    assert dep["name"] == serve_app.SegmentationService.name
    assert dep["ray_actor_options"]["num_gpus"] == 0
    assert dep["autoscaling_config"]["max_replicas"] >= dep["autoscaling_config"]["min_replicas"] >= 1
    settings = settings_from(app["args"], environ={})
    assert settings.model_uri == "models:/robustseg-cmr@champion" and settings.max_upload_mb == 64
    assert dep["max_ongoing_requests"] >= settings.max_batch_size


# ---------------------------------------------------------------------------------- good
def test_health_and_model(client):
    h = client.get("/v1/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"
    m = client.get("/v1/model").json()
    assert m["name"] == "tiny" and m["task"] == "cardiac"
    assert [x["backbone"] for x in m["members"]] == ["unet2d", "unet"]
    assert {"version", "alias", "metrics", "uri"} <= set(m)
    assert m["limits"]["max_upload_mb"] == 1 and m["class_names"]["1"] == "LV"


def test_segment_raw_and_multipart_agree(client, volumes):
    shape = volumes["ed"].shape
    raw = client.post("/v1/segment?filename=ed.nii.gz", content=volumes["ed_gz"])
    a = check_mask(raw, shape)
    assert 'filename="ed_seg.nii.gz"' in raw.headers["content-disposition"]
    multi = client.post("/v1/segment", files={"file": ("ed.nii", volumes["ed_raw"], "application/octet-stream")})
    assert np.array_equal(check_mask(multi, shape), a)


def test_cardiac_function(client, volumes):
    before = client.get("/v1/health").json()
    r = client.post("/v1/cardiac-function", files={"ed": ("ed.nii.gz", volumes["ed_gz"]),
                                                   "es": ("es.nii.gz", volumes["es_gz"])})
    assert r.status_code == 200, r.text
    out = r.json()
    for key in ("lv_edv", "lv_esv", "lv_sv", "lv_ef", "rv_edv", "rv_esv", "rv_sv", "rv_ef", "myo_mass_ed",
                "myo_volume_ed"):
        assert key in out
    assert out["units"] == "mL" and out["model"]["name"] == "tiny"
    assert set(out["structures"]) == {"LV", "MYO", "RV"}
    assert out["ed"]["shape_zyx"] == list(volumes["ed"].shape)
    assert out["lv_ef"] is not None or any(f.startswith("LV") for f in out["flags"])
    voxel_ml = np.prod(SPACING) / 1000
    assert out["lv_edv"] == pytest.approx(out["structures"]["LV"]["ed_voxels"] * voxel_ml)
    assert out["myo_mass_ed"] == pytest.approx(1.05 * out["structures"]["MYO"]["ed_voxels"] * voxel_ml)
    after = client.get("/v1/health").json()
    assert after["largest_batch"] >= 2 and after["volumes"] - before["volumes"] == 2  # ED + ES in one batch


def test_concurrent_requests_batch(url, volumes, client):
    expected = check_mask(client.post("/v1/segment", content=volumes["es_gz"]), volumes["es"].shape)
    bodies = [volumes["es_gz"], nifti_bytes(ct_like(volumes["es"])), volumes["es_gz"]]

    async def together():
        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
            return await asyncio.gather(*(ac.post(f"/v1/segment?filename=c{i}.nii.gz", content=b)
                                          for i, b in enumerate(bodies)))

    good1, bad, good2 = asyncio.run(together())
    # A volume the model refuses fails alone, even when batched with good ones.
    assert bad.status_code == 400 and "upload 'c1.nii.gz': looks like CT" in bad.json()["error"]
    for r in (good1, good2):
        assert np.array_equal(check_mask(r, volumes["es"].shape), expected)


def test_client_post_volumes(url, volumes, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ed.nii.gz").write_bytes(volumes["ed_gz"])
    (tmp_path / "in" / "es.nii").write_bytes(nifti_bytes(volumes["es"], gz=False))
    assert predict_endpoint(url, tmp_path / "in", tmp_path / "cli_out") in (0, 3)
    assert "2 masks from" in capsys.readouterr().out and (tmp_path / "cli_out" / "es_seg.nii.gz").is_file()
    rows = post_volumes(url, tmp_path / "in", tmp_path / "out")
    assert [Path(r["output"]).name for r in rows] == ["ed_seg.nii.gz", "es_seg.nii.gz"]
    for r in rows:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(r["output"]))
        assert r["LV"] == int((arr == 1).sum()) and r["empty"] == (not arr.any())
    (tmp_path / "in" / "zz_nan.nii.gz").write_bytes(nifti_bytes(np.full((4, 8, 8), np.nan, np.float32)))
    with pytest.raises(EndpointError, match=r"HTTP 400 for .*zz_nan.nii.gz: upload 'zz_nan.nii.gz': .*NaN"):
        post_volumes(url, tmp_path / "in", tmp_path / "out", fail_fast=True)


def test_client_skips_label_maps_and_keeps_going_past_refused_files(url, volumes, tmp_path, capsys):
    """`predict --endpoint` behaves as `predict` with a model: skip label maps, list failures, exit 2."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_ed.nii.gz").write_bytes(volumes["ed_gz"])
    (src / "b_ed_gt.nii.gz").write_bytes(b"not even read: skipped by its name")
    lbl = np.zeros(volumes["es"].shape, np.uint8)
    lbl[:, 10:20, 10:20] = 3
    (src / "c_labels_by_value.nii.gz").write_bytes(nifti_bytes(lbl))  # refused by the service, by its values
    (src / "d_nan.nii.gz").write_bytes(nifti_bytes(np.full((4, 8, 8), np.nan, np.float32)))
    (src / "e_es.nii.gz").write_bytes(nifti_bytes(volumes["es"]))
    rows = post_volumes(url, src, tmp_path / "out")
    assert [Path(r["output"]).name for r in rows] == ["a_ed_seg.nii.gz", "e_es_seg.nii.gz"]
    assert [Path(s["input"]).name for s in rows.skipped] == ["b_ed_gt.nii.gz", "c_labels_by_value.nii.gz"]
    assert [Path(f["input"]).name for f in rows.failed] == ["d_nan.nii.gz"] and "NaN" in rows.failed[0]["reason"]
    assert predict_endpoint(url, src, tmp_path / "cli") == 2
    out = capsys.readouterr()
    assert "skipped 2 input(s) that look like label maps" in out.out and "d_nan.nii.gz" in out.err


# ---------------------------------------------------------------------------------- bad
def ct_like(img):
    """Hounsfield-like values (air -1000, tissue ~ +40..300): what an MR model must refuse."""
    return np.where(img > np.median(img), 300.0, -1000.0).astype(np.float32) + img


def bad_requests(volumes):
    """``(id, request kwargs, path, status, message pattern)`` for every kind of bad request."""
    img = volumes["ed"]
    gz = volumes["ed_gz"]
    nan = img.copy()
    nan[2, 10, 10] = np.nan

    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(3):
            yield os.urandom(512 * 1024)

    return [
        ("not_nifti", {"content": os.urandom(4000), "params": {"filename": "noise.nii.gz"}}, "/v1/segment", 400,
         "upload 'noise.nii.gz': not a NIfTI"),
        ("truncated_gzip", {"content": gz[: len(gz) // 2], "params": {"filename": "cut.nii.gz"}}, "/v1/segment",
         400, "upload 'cut.nii.gz': corrupt or truncated gzip"),
        ("gzip_header_only", {"content": gzip.compress(b"x" * 10)[:12]}, "/v1/segment", 400, "gzip"),
        ("4d", {"files": {"file": ("cine.nii.gz", nifti_bytes(np.stack([img, img])))}}, "/v1/segment", 400,
         "upload 'cine.nii.gz': is 4D with 2 volumes"),
        ("2d", {"content": nifti_bytes(img[0]), "headers": {"X-Filename": "slice.nii.gz"}}, "/v1/segment", 400,
         "upload 'slice.nii.gz': is a 2D image"),
        ("nan", {"content": nifti_bytes(nan), "params": {"filename": "nan.nii.gz"}}, "/v1/segment", 400,
         "1 NaN or infinite"),
        ("constant", {"content": nifti_bytes(np.zeros_like(img))}, "/v1/segment", 400, "constant"),
        ("too_big", {"content": os.urandom(2 * 2**20)}, "/v1/segment", 413,
         "request body of 2.0 MB is over the 1 MB upload limit"),  # refused from Content-Length
        ("too_big_chunked", {"content": chunks()}, "/v1/segment", 413, "request body is over the 1 MB upload limit"),
        ("ct_to_mr_model", {"content": nifti_bytes(ct_like(img)), "params": {"filename": "ct.nii.gz"}},
         "/v1/segment", 400, "upload 'ct.nii.gz': looks like CT in HU"),
        ("too_many_voxels", {"content": nifti_bytes(np.ones((64, 64, 64), np.uint8))}, "/v1/segment", 413,
         f"over the {MAX_VOXELS} voxel limit"),
        ("missing_es", {"files": {"ed": ("ed.nii.gz", gz)}}, "/v1/cardiac-function", 400,
         r"missing multipart file field\(s\) \['es'\]"),
        ("raw_pair", {"content": gz}, "/v1/cardiac-function", 400, "multipart/form-data with the fields ed, es"),
        ("bad_es", {"files": {"ed": ("ed.nii.gz", gz), "es": ("es.nii.gz", b"not a volume")}},
         "/v1/cardiac-function", 400, "upload 'es.nii.gz': not a NIfTI"),
    ]


BAD_IDS = ["not_nifti", "truncated_gzip", "gzip_header_only", "4d", "2d", "nan", "constant", "too_big",
           "too_big_chunked", "ct_to_mr_model", "too_many_voxels", "missing_es", "raw_pair", "bad_es"]


@pytest.mark.parametrize("which", BAD_IDS)
def test_bad_request_is_4xx_json(client, volumes, which):
    cases = {b[0]: b[1:] for b in bad_requests(volumes)}
    assert sorted(cases) == sorted(BAD_IDS)
    kwargs, path, status, pattern = cases[which]
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    msg = r.json()["error"]
    assert re.search(pattern, msg), msg
    assert "robustseg_upload_" not in msg and tempfile.gettempdir() + "/" not in msg


def test_still_serving_after_bad_requests(client, volumes):
    for _, kwargs, path, status, _ in bad_requests(volumes):
        assert client.post(path, **kwargs).status_code == status
    assert client.get("/v1/health").json()["errors"] >= len(BAD_IDS)
    check_mask(client.post("/v1/segment", content=volumes["ed_gz"]), volumes["ed"].shape)


# ---------------------------------------------------------------------------------- issue 12
def test_label_maps_refused_with_400_unless_forced(client, volumes):
    """Ground truth sent as a scan: refused by its name or by its label-only voxels; ?force=true overrides."""
    ed = make_cardiac_subject(0, 11, n_slices=6, size=(64, 64))[0]
    label_gz = nifti_bytes(ed.label.astype(np.uint8))
    refused = [
        client.post("/v1/segment?filename=001_ED_gt.nii.gz", content=volumes["ed_gz"]),
        client.post("/v1/segment", files={"file": ("case_seg.nii.gz", volumes["ed_gz"])}),
        client.post("/v1/segment?filename=ed.nii.gz", content=label_gz),
        client.post("/v1/cardiac-function", files={"ed": ("ed.nii.gz", label_gz), "es": ("es.nii.gz", volumes["es_gz"])}),
    ]
    for r, name in zip(refused, ("001_ED_gt.nii.gz", "case_seg.nii.gz", "ed.nii.gz", "ed.nii.gz")):
        assert r.status_code == 400, r.text
        msg = r.json()["error"]
        assert msg.startswith(f"upload '{name}': looks like a ground-truth label map, not a scan: ") and "?force=true" in msg
    assert "label values [0, 1, 2, 3]" in refused[2].json()["error"]
    check_mask(client.post("/v1/segment?filename=001_ED_gt.nii.gz&force=true", content=volumes["ed_gz"]),
               volumes["ed"].shape)
    forced = client.post("/v1/segment?force=true", files={"file": ("ed.nii.gz", label_gz)})
    assert forced.status_code == 200, forced.text


def test_model_info_exposes_no_server_paths(client, model_dir):
    r = client.get("/v1/model")
    assert r.status_code == 200
    assert str(model_dir) not in r.text and str(model_dir.parent) not in r.text and tempfile.gettempdir() not in r.text
    info = r.json()
    assert info["uri"] == model_dir.name  # the folder's name, not where it lives

    def strings(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)
        elif isinstance(obj, str):
            yield obj

    absolute = [v for v in strings(info) if v.startswith("/") or v.startswith("file:") or re.match(r"^[A-Za-z]:\\", v)]
    assert absolute == []
    assert [m["source"] for m in info["members"]] == ["best.pt", "best.pt"]  # checkpoints outside the folder
