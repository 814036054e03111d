"""MLflow pyfunc + registry: log, register with tags, aliases (promote / rollback), and loading
``models:/name@champion`` in a fresh process reproduces the in-process masks bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustseg.ensemble import registry as reg
from robustseg.ensemble import Ensemble
from robustseg.ensemble.pyfunc import case_from_arrays, input_example
from tiny_ensemble import tiny_ensemble_folder

CPU = torch.device("cpu")
NAME = "tiny-cmr"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Two registered versions of the tiny ensemble; v2 is the champion."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("reg")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ens", artifact_location=(root / "artifacts").as_uri())
    ens = Ensemble.load(tiny_ensemble_folder(root), CPU)
    ens.spec.metrics = {"oof_dice_ensemble": 0.75, "oof_dice_best_single": 0.7}
    ens.spec.provenance = {"data_manifest": "file:///data/manifest.json", "git_commit": "abc123"}
    versions = []
    for _ in range(2):
        run = client.create_run(exp)
        model_uri = reg.log_ensemble(ens, tracking_uri=uri, run_id=run.info.run_id)
        versions.append(reg.register_ensemble(model_uri, tracking_uri=uri, name=NAME, spec=ens.spec.to_dict()))
    return uri, ens, versions, root


def test_versions_carry_metrics_provenance_and_description(registered):
    from mlflow import MlflowClient

    uri, ens, versions, _ = registered
    assert versions == ["1", "2"]
    mv = MlflowClient(uri).get_model_version(NAME, "2")
    assert mv.tags["metric.oof_dice_ensemble"] == "0.75" and mv.tags["git_commit"] == "abc123"
    assert mv.tags["data_manifest"] == "file:///data/manifest.json" and mv.tags["members"] == "2"
    assert "| unet2d_0 | unet2d | 0 |" in mv.description and "oof_dice_ensemble 0.7500" in mv.description
    rows = reg.list_versions(NAME, uri)
    assert [r["version"] for r in rows] == ["2", "1"] and rows[0]["aliases"] == "champion"
    assert rows[0]["oof_dice_ensemble"] == "0.75"


def test_promote_and_rollback(registered):
    uri, _, _, _ = registered
    assert reg.alias_version(NAME, "champion", uri) == "2"
    assert reg.promote(NAME, "1", alias="champion", tracking_uri=uri) == "2"
    assert reg.alias_version(NAME, "champion", uri) == "1"
    assert reg.rollback(NAME, alias="champion", tracking_uri=uri) == "2"  # undo the promotion of 1
    assert reg.rollback(NAME, alias="champion", tracking_uri=uri) == "1"  # the registration of 2 moved it from 1
    with pytest.raises(reg.RegistryError, match="no earlier version"):
        reg.rollback(NAME, alias="champion", tracking_uri=uri)
    reg.promote(NAME, "2", tracking_uri=uri)
    with pytest.raises(reg.RegistryError, match="has no version 9"):
        reg.promote(NAME, "9", tracking_uri=uri)
    with pytest.raises(reg.RegistryError, match="no registered model 'nope'"):
        reg.list_versions("nope", uri)


def test_fresh_process_reproduces_in_process_masks_bit_exactly(registered, tmp_path):
    uri, ens, _, _ = registered
    example = input_example(shape=(3, 96, 96))
    expected = ens.predict_cases([case_from_arrays(example["image"], example["spacing"], "cardiac")])[0]
    np.save(tmp_path / "image.npy", example["image"])
    np.save(tmp_path / "spacing.npy", example["spacing"])
    script = (
        "import sys, numpy as np, torch, mlflow\n"
        "torch.set_num_threads(int(sys.argv[3]))\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "d = sys.argv[2]\n"
        "out = m.predict({'image': np.load(d + '/image.npy'), 'spacing': np.load(d + '/spacing.npy')})\n"
        "np.save(d + '/label.npy', out)\n")
    env = {**os.environ, "ROBUSTSEG_DEVICE": "cpu"}
    subprocess.run([sys.executable, "-c", script, uri, str(tmp_path), str(torch.get_num_threads())], check=True,
                   env=env, cwd=tmp_path, timeout=300)
    got = np.load(tmp_path / "label.npy")
    assert got.dtype == np.uint8 and got.shape == example["image"].shape
    assert np.array_equal(got, expected)


def test_loading_leaves_no_global_tracking_uri_behind(registered):
    uri, _, _, _ = registered
    before = os.environ.get("MLFLOW_TRACKING_URI")
    reg.load_ensemble(f"models:/{NAME}@champion", uri, CPU)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before != uri


def test_load_ensemble_by_alias_and_bad_uris(registered, tmp_path):
    uri, ens, _, _ = registered
    loaded, info = reg.load_ensemble(f"models:/{NAME}@champion", uri, CPU)
    assert info == {"uri": f"models:/{NAME}@champion", "name": NAME, "version": "2", "alias": "champion"}
    assert [m.name for m in loaded.spec.members] == [m.name for m in ens.spec.members]
    _, info = reg.load_ensemble(f"models:/{NAME}/1", uri, CPU)
    assert info["version"] == "1" and info["alias"] == ""
    with pytest.raises(reg.RegistryError, match="not an ensemble folder"):
        reg.load_ensemble(str(tmp_path), uri, CPU)
    with pytest.raises(reg.RegistryError, match="cannot load"):
        reg.load_ensemble(f"models:/{NAME}@nobody", uri, CPU)


def test_pyfunc_rejects_bad_input(registered):
    uri, _, _, _ = registered
    import mlflow

    with reg.mlflow_uri(uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(Exception, match="NaN|non-finite"):
        bad = input_example()
        bad["image"][0, 0, 0] = np.nan
        model.predict(bad)


def test_cli_registry_and_predict_with_a_models_uri(registered, tmp_path, capsys):
    from robustseg.cli import main
    from robustseg.data.io import read_image, write_with_geometry
    from robustseg.data.synthetic import make_cardiac_dataset

    uri, _, _, _ = registered
    assert main(["registry", "list", "--name", NAME, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "oof_dice_ensemble" in out
    case = make_cardiac_dataset(1, seed=3)[0]
    write_with_geometry(case.image, tmp_path / "in" / "p1.nii.gz", case.geometry())
    code = main(["predict", "--model", f"models:/{NAME}@champion", "--tracking-uri", uri, "--input",
                 str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code in (0, 3)  # 3: the tiny model found nothing (reported, not hidden)
    mask = read_image(tmp_path / "out" / "p1_seg.nii.gz", dtype=None)
    assert mask.array.shape == case.image.shape and mask.spacing == pytest.approx(case.spacing)
    assert main(["registry", "promote", "--name", NAME, "--version", "7", "--tracking-uri", uri]) == 2
    assert "has no version 7" in capsys.readouterr().err


def test_lookups_name_the_store_and_never_create_one(registered, tmp_path, monkeypatch):
    """A mistyped or default tracking URI is an error naming the store searched, not a new empty store."""
    from robustseg.tracking import TrackingStoreError

    uri, _, _, _ = registered
    with pytest.raises(reg.RegistryError, match=f"no registered model 'nope' in {uri}"):
        reg.list_versions("nope", uri)
    with pytest.raises(reg.RegistryError, match=f"cannot load from {uri}"):
        reg.load_ensemble(f"models:/{NAME}@nobody", uri, CPU)
    missing = tmp_path / "typo" / "mlflow.db"
    lookups = [lambda u: reg.list_versions(NAME, u), lambda u: reg.alias_version(NAME, "champion", u),
               lambda u: reg.promote(NAME, "1", tracking_uri=u), lambda u: reg.rollback(NAME, tracking_uri=u),
               lambda u: reg.load_ensemble(f"models:/{NAME}@champion", u, CPU)]
    for lookup in lookups:
        with pytest.raises(TrackingStoreError, match=f"{missing} does not exist"):
            lookup(f"sqlite:///{missing}")
    assert not missing.parent.exists()
    # No URI at all: MLflow's own default is mlflow.db in the working folder; it is named, not made.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingStoreError, match=f"{tmp_path / 'mlflow.db'} does not exist"):
        reg.load_ensemble(f"models:/{NAME}@champion", None, CPU)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
