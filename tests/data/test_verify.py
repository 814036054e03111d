"""Readers verify shards against the manifest: a changed store is refused, naming shard and manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from robustseg.config import DataConfig, ExperimentConfig, SourceSpec
from robustseg.data.manifest import load_case_volume, load_slices, read_manifest, verify_store
from robustseg.data.prepare import prepare
from robustseg.data.storage import open_store
from robustseg.errors import StorageError


def _cfg(uri, crop=(48, 48)) -> DataConfig:
    cfg = DataConfig(sources=[SourceSpec(name="synthetic_cmr", path="", options={"n_subjects": 4, "motion_levels": [0]})],
                     plan="cmr", shards_uri=str(uri), folds=2, slices_per_shard=24)
    cfg.cmr.target_spacing = [1.5, 1.5]
    cfg.cmr.crop_size = list(crop)
    return cfg


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    prepare(_cfg(root / "a"))
    prepare(_cfg(root / "b", crop=(64, 64)))
    return root


@pytest.fixture
def store_copy(stores, tmp_path):
    shutil.copytree(stores / "a", tmp_path / "a")
    store = open_store(str(tmp_path / "a"))
    return store, read_manifest(store)


def _first(m, fold=0):
    return next(s for s in m.shards if s["fold"] == fold)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_healthy_store_verifies(stores):
    store = open_store(str(stores / "a"))
    m = read_manifest(store)
    assert m.version == 2 and m.generation == 1
    assert all(len(s["sha256"]) == 64 and s["layout"] == m.layout.to_dict() for s in m.shards)
    assert verify_store(store, m, checksums=True) == []


def test_same_size_corruption_is_refused_by_every_reader(store_copy):
    store, m = store_copy
    shard = _first(m)
    _flip_a_byte(Path(store.path(shard["path"])))
    manifest_uri = store.uri_of("manifest.json")
    case = next(c["case_id"] for c in m.cases if c["shard"] == shard["path"])
    for read in (lambda: load_slices(store, m, folds=[0]), lambda: load_case_volume(store, m, case)):
        with pytest.raises(StorageError) as e:
            read()
        assert shard["path"] in str(e.value) and manifest_uri in str(e.value) and "SHA-256" in str(e.value)
    assert load_slices(store, m, folds=[1]).num_rows > 0  # untouched folds still read
    problems = verify_store(store, m, checksums=True)
    assert len(problems) == 1 and shard["path"] in problems[0]
    assert verify_store(store, m, checksums=False) == []  # same size: only --verify sees it


def test_a_shard_of_another_layout_is_refused(stores, store_copy):
    """The reported bug: a 64x64 shard under a 48x48 manifest used to decode as scrambled slices."""
    store, m = store_copy
    other = read_manifest(open_store(str(stores / "b")))
    shard = _first(m)
    src = stores / "b" / _first(other)["path"]
    shutil.copy(src, store.path(shard["path"]))
    with pytest.raises(StorageError, match=r"size \d+ bytes, not \d+"):
        load_slices(store, m, folds=[0])
    # even with the manifest's size and checksum made to match, the layout gives it away
    entry = _first(m)
    data = Path(store.path(shard["path"])).read_bytes()
    import hashlib

    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    with pytest.raises(StorageError, match=r"layout .*'height': 64.*not the manifest's .*'height': 48"):
        load_slices(store, m, folds=[0])


def test_missing_and_truncated_shards(store_copy):
    store, m = store_copy
    a, b = _first(m, 0), _first(m, 1)
    Path(store.path(a["path"])).unlink()
    p = Path(store.path(b["path"]))
    p.write_bytes(p.read_bytes()[:100])
    problems = verify_store(store, m, checksums=False)
    assert any("shard missing" in x and a["path"] in x for x in problems)
    assert any(b["path"] in x and "100 bytes" in x for x in problems)
    with pytest.raises(StorageError, match="shard missing"):
        load_slices(store, m, folds=[0])


def test_inspect_verify_exit_codes(store_copy, capsys):
    from robustseg.cli import main

    store, m = store_copy
    assert main(["inspect", store.root, "--verify"]) == 0
    assert "healthy: size, SHA-256 and layout" in capsys.readouterr().out
    _flip_a_byte(Path(store.path(_first(m)["path"])))
    assert main(["inspect", store.root]) == 0  # presence and size only
    assert main(["inspect", store.root, "--verify"]) == 1
    err = capsys.readouterr().err
    assert "UNHEALTHY" in err and _first(m)["path"] in err


def test_training_and_ray_data_refuse_a_corrupt_shard(store_copy):
    from robustseg.data.streaming import slice_dataset
    from robustseg.engine.train import load_train_data

    store, m = store_copy
    _flip_a_byte(Path(store.path(_first(m, 1)["path"])))
    cfg = ExperimentConfig()
    cfg.data = _cfg(store.root)
    with pytest.raises(StorageError, match="SHA-256"):
        load_train_data(cfg, device=__import__("torch").device("cpu"))
    with pytest.raises(StorageError, match="SHA-256"):
        slice_dataset(cfg.data, exclude_folds=[0])  # checked before Ray Data reads a byte


def test_old_format_manifest_is_flagged_for_rewrite(store_copy):
    store, m = store_copy
    d = json.loads(store.read_bytes("manifest.json"))
    d["version"] = 1
    for s in d["shards"]:
        s.pop("sha256")
    store.write_bytes("manifest.json", json.dumps(d).encode())
    old = read_manifest(store)
    assert any("records no checksums" in p for p in verify_store(store, old))
    s = prepare(_cfg(store.root))  # the same settings: the v1 shards are rewritten as a snapshot
    assert s.committed and s.shards_written == len(m.shards)
    assert verify_store(store, read_manifest(store)) == []


def test_newer_manifest_format_is_refused(store_copy):
    store, _ = store_copy
    d = json.loads(store.read_bytes("manifest.json"))
    d["version"] = 99
    store.write_bytes("manifest.json", json.dumps(d).encode())
    with pytest.raises(Exception, match="newer than this robustseg reads"):
        read_manifest(store)


def test_the_ensemble_builders_out_of_fold_pass_refuses_a_corrupt_shard(store_copy):
    """`robustseg ensemble` scores fold models through `oof_evaluate`, which reads the store."""
    from types import SimpleNamespace

    import torch

    from robustseg.engine.oof import oof_evaluate

    store, m = store_copy
    _flip_a_byte(Path(store.path(_first(m, 0)["path"])))
    model = SimpleNamespace(device=torch.device("cpu"))  # never called: the read fails first
    with pytest.raises(StorageError, match="SHA-256"):
        oof_evaluate({"unet2d": {0: model}}, store, m, tta=False)
