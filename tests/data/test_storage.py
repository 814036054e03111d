import time

import pytest

from robustseg.config import StorageConfig
from robustseg.data.storage import open_store, s3_options
from robustseg.errors import StorageError
from conftest import free_port


def test_local_store_atomic_write_read_list(tmp_path):
    store = open_store(str(tmp_path / "a" / "b"))
    assert store.is_local and store.uri.startswith("file:///")
    store.check_reachable()
    store.write_bytes("x/one.bin", b"123")
    store.write_bytes("x/one.bin", b"4567")  # overwrite is atomic too
    assert store.read_bytes("x/one.bin") == b"4567"
    assert store.size("x/one.bin") == 4
    assert store.list("x") == ["x/one.bin"]
    assert not list((tmp_path / "a" / "b" / "x").glob(".tmp-*"))
    store.delete("x/one.bin")
    assert not store.exists("x/one.bin")


def test_file_uri_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = open_store("rel/store")
    assert rel.root == str((tmp_path / "rel" / "store").resolve())
    uri = open_store((tmp_path / "u").as_uri())
    assert uri.root == str(tmp_path / "u")


def test_missing_object_names_uri(tmp_path):
    store = open_store(str(tmp_path))
    with pytest.raises(StorageError, match=r"file://.*/nope.bin: could not read: not found"):
        store.read_bytes("nope.bin")


def test_unwritable_local_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot be created"):
        open_store(str(blocker / "sub")).check_reachable()


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        open_store("s3:///x")


def test_s3_options_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.9.9.9:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    o = s3_options(StorageConfig(), {})
    assert o["endpoint_override"] == "10.9.9.9:1" and o["scheme"] == "http"
    assert o["access_key"] == "envkey" and o["region"] == "eu-west-1"
    o = s3_options(StorageConfig(), {"endpoint_override": "127.0.0.1:5", "scheme": "http", "region": "x"})
    assert o["endpoint_override"] == "127.0.0.1:5" and o["region"] == "x"  # URI query beats env
    o = s3_options(StorageConfig(endpoint_url="https://h:9", region="r"), {"endpoint_override": "127.0.0.1:5"})
    assert o["endpoint_override"] == "h:9" and o["scheme"] == "https" and o["region"] == "r"  # config wins


def test_unreachable_s3_fails_fast_naming_uri(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    port = free_port()
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", access_key="k", secret_key="s", connect_timeout_s=1)
    store = open_store("s3://bucket/prefix", cfg)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://bucket/prefix: object store unreachable"):
        store.check_reachable()
    assert time.monotonic() - t0 < 60
