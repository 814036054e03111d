"""`robustseg.durable`: where durable things go (config > env > default) and how every node reaches
them (local paths, file:// and s3:// through the configured endpoint: a moto server on 127.0.0.1)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from robustseg import durable
from robustseg.config import ExperimentConfig, StorageConfig
from robustseg.errors import ConfigError, StorageError


def _cfg(tmp_path: Path, storage_uri=None) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"tracking": {"workdir": str(tmp_path / "work"), "storage_uri": storage_uri}})


def test_storage_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(durable.ENV, raising=False)
    assert durable.storage_uri(_cfg(tmp_path)) == str(tmp_path / "work" / "ray_results")  # default
    monkeypatch.setenv(durable.ENV, "s3://env-bucket/runs/")
    assert durable.storage_uri(_cfg(tmp_path)) == "s3://env-bucket/runs"  # env beats the default
    assert durable.storage_uri(_cfg(tmp_path, "s3://cfg-bucket/x")) == "s3://cfg-bucket/x"  # config beats env
    assert durable.storage_uri(_cfg(tmp_path, "s3://cfg-bucket/x"), "s3://flag/y") == "s3://flag/y"  # a CLI flag wins


def test_local_storage_made_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv(durable.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert durable.storage_uri(_cfg(tmp_path, "rel/store")) == str(tmp_path / "rel" / "store")
    assert durable.storage_uri(_cfg(tmp_path, (tmp_path / "u").as_uri())) == str(tmp_path / "u")
    monkeypatch.setenv(durable.ENV, "envrel")
    assert durable.storage_uri(_cfg(tmp_path)) == str(tmp_path / "envrel")


def test_config_field_is_documented_and_checked(tmp_path):
    from dataclasses import fields

    from robustseg.config import TrackingConfig

    doc = {f.name: f.metadata["doc"] for f in fields(TrackingConfig)}["storage_uri"]
    assert "ROBUSTSEG_STORAGE_URI" in doc and "data.storage" in doc
    ExperimentConfig().to_yaml(tmp_path / "c.yaml")
    assert ExperimentConfig.from_yaml(tmp_path / "c.yaml").tracking.storage_uri is None
    assert ExperimentConfig.from_yaml(tmp_path / "c.yaml", ["tracking.storage_uri=s3://b/p"]).tracking.storage_uri == \
        "s3://b/p"
    with pytest.raises(ConfigError, match="tracking.storage_uri"):
        _cfg(tmp_path, " ")


def test_filesystem_local_and_file_uri(tmp_path):
    fs, path = durable.filesystem(str(tmp_path / "a"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    fs, path = durable.filesystem((tmp_path / "b").as_uri())
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "b")
    assert durable.ray_storage((tmp_path / "b").as_uri()) == (str(tmp_path / "b"), None)
    with pytest.raises(StorageError, match="needs a bucket"):
        durable.filesystem("s3:///x")


def test_local_round_trip(tmp_path):
    root = str(tmp_path / "store")
    target = durable.join(root, "sweep", "sweep.json")
    assert not durable.exists(target)
    durable.write_text(target, '{"a": 1}')
    durable.write_text(target, '{"a": 2}')  # replaced whole
    assert durable.read_json(target) == {"a": 2} and durable.exists(target)
    assert not list((tmp_path / "store" / "sweep").glob(".tmp-*"))
    src = tmp_path / "w.bin"
    src.write_bytes(b"\x00weights")
    durable.upload_file(src, durable.join(root, "ck", "best.pt"))
    assert durable.download_file(durable.join(root, "ck", "best.pt"), tmp_path / "back" / "w.bin").read_bytes() == \
        b"\x00weights"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        durable.read_json(durable.join(root, "nope.json"))


def test_join_uri_of_and_scratch(tmp_path):
    assert durable.join("s3://b/p/", "x", "/y/") == "s3://b/p/x/y"
    assert durable.join("s3://b/p?scheme=http", "x") == "s3://b/p/x?scheme=http"
    s3 = pafs.S3FileSystem(region="us-east-1", anonymous=True)
    assert durable.uri_of(s3, "bucket/run/checkpoint_000001") == "s3://bucket/run/checkpoint_000001"
    assert durable.uri_of(pafs.LocalFileSystem(), "/data/run") == "/data/run"
    assert durable.is_scratch(Path(tempfile.gettempdir()) / "robustseg-x-rank0-abc" / "best.pt")
    assert not durable.is_scratch("s3://bucket/x/last.pt") and not durable.is_scratch(None)
    assert not durable.is_scratch("/srv/robustseg_work/ray_results/run/last.pt")


def test_s3_with_endpoint_from_config_only(s3_endpoint, tmp_path, monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    storage = StorageConfig(endpoint_url=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1")
    fs, path = durable.filesystem("s3://durable-unit/prefix", storage)
    assert isinstance(fs, pafs.S3FileSystem) and path == "durable-unit/prefix"
    fs.create_dir("durable-unit")
    ray_path, ray_fs = durable.ray_storage("s3://durable-unit/prefix", storage)
    assert ray_path == "durable-unit/prefix" and isinstance(ray_fs, pafs.S3FileSystem)

    root = "s3://durable-unit/prefix"
    durable.write_text(durable.join(root, "sweep", "sweep.json"), '{"trials": 3}', storage)
    assert durable.read_json(durable.join(root, "sweep", "sweep.json"), storage) == {"trials": 3}
    assert durable.exists(durable.join(root, "sweep"), storage)
    src = tmp_path / "best.pt"
    src.write_bytes(b"weights" * 1000)
    durable.upload_file(src, durable.join(root, "ck", "best.pt"), storage)
    back = durable.download_file(durable.join(root, "ck", "best.pt"), tmp_path / "back.pt", storage)
    assert back.read_bytes() == src.read_bytes()
    (tmp_path / "folder" / "members").mkdir(parents=True)
    (tmp_path / "folder" / "spec.json").write_text("{}")
    (tmp_path / "folder" / "members" / "m.pt").write_bytes(b"m")
    durable.upload_dir(tmp_path / "folder", durable.join(root, "ensemble", "model"), storage)
    keys = sorted(i.path for i in fs.get_file_info(pafs.FileSelector("durable-unit/prefix/ensemble", recursive=True))
                  if i.type == pafs.FileType.File)
    assert keys == ["durable-unit/prefix/ensemble/model/members/m.pt", "durable-unit/prefix/ensemble/model/spec.json"]
    with pytest.raises(FileNotFoundError):
        durable.read_bytes(durable.join(root, "missing.json"), storage)
