import json
import os
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


def _hold_lock_without_a_name(root) -> int:
    """Take the store's writer lock the way a writer does in its first instant: flock, no record yet."""
    import fcntl

    from robustseg.data.storage import LOCK_FILE

    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(root / LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_writer_refused_before_the_holder_wrote_its_name_still_names_it(tmp_path):
    import threading

    fd = _hold_lock_without_a_name(tmp_path / "store")
    record = json.dumps({"what": "prepare", "pid": 4242, "host": "h1", "since": "2026-12-07T01:00:00"}).encode()
    threading.Timer(0.2, lambda: os.pwrite(fd, record, 0)).start()
    try:
        with pytest.raises(StorageError) as e:
            with open_store(str(tmp_path / "store")).writer_lock("prepare"):
                pytest.fail("the lock was granted while held")
    finally:
        os.close(fd)
    assert "another prepare is writing to this store (pid 4242 on h1 since 2026-12-07T01:00:00)" in str(e.value)


def test_a_holder_that_never_names_itself_is_reported_as_unknown(tmp_path, monkeypatch):
    from robustseg.data import storage

    monkeypatch.setattr(storage, "HOLDER_WAIT_S", 0.1)
    fd = _hold_lock_without_a_name(tmp_path / "store")
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError, match=r"another writer is writing to this store \(pid \? on \? since \?\)"):
            with storage.open_store(str(tmp_path / "store")).writer_lock("prepare"):
                pytest.fail("the lock was granted while held")
        assert time.monotonic() - t0 < 1.0  # it waited HOLDER_WAIT_S, not forever
    finally:
        os.close(fd)
