"""Object storage behind one small interface: local folders, ``file://`` and ``s3://`` URIs.

pyarrow's filesystems do the work, so the same store object serves the prepare step, the
Parquet reader and (later) Ray Data. S3 endpoint, region and credentials come from the
`StorageConfig`, then from URI query parameters (``?endpoint_override=...&scheme=http``,
the form Ray accepts), then from the ``AWS_*`` environment variables boto3 users set.

Writes are atomic per object: local files are written to a hidden temporary name, flushed
to disk and renamed; S3 objects become visible only when their upload completes. Two more
primitives make multi-object changes safe (see `robustseg.data.snapshot`):

- `ObjectStore.writer_lock`: one writer at a time on a local store (an ``flock`` that the
  kernel drops when its process dies, so a kill -9 never leaves a stale lock);
- `ObjectStore.put_if`: a conditional write, the compare-and-swap of an S3 commit
  (``If-None-Match: *`` to create, ``If-Match: <ETag>`` to replace), which S3 has offered
  since 2024 and pyarrow does not expose, so it goes through boto3 with the same settings.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from robustseg.config import StorageConfig
from robustseg.errors import StorageError

#: Name of the local writer-lock file at a store's root (hidden from listings).
LOCK_FILE = ".robustseg.lock"


class CommitConflict(StorageError):
    """A conditional commit lost: another writer changed the object since it was read."""


def _env(*names: str) -> Optional[str]:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def s3_options(cfg: StorageConfig, query: Dict[str, str]) -> Dict[str, object]:
    """Keyword arguments for `pyarrow.fs.S3FileSystem` from config, URI query and env.

    Args:
        cfg: Explicit settings (win over everything else).
        query: Query parameters of the ``s3://`` URI.
    """
    endpoint = cfg.endpoint_url or query.get("endpoint_override") or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    scheme = query.get("scheme")
    if endpoint and "://" in endpoint:
        parsed = urlparse(endpoint)
        scheme = scheme or parsed.scheme
        endpoint = parsed.netloc
    opts: Dict[str, object] = {
        "region": cfg.region or query.get("region") or _env("AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": cfg.connect_timeout_s,
        "request_timeout": max(30.0, cfg.connect_timeout_s),
        # Fail fast on an unreachable store: the default retries for minutes.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        "allow_bucket_creation": True,
    }
    if endpoint:
        opts["endpoint_override"] = endpoint
    if scheme:
        opts["scheme"] = scheme
    access = cfg.access_key or _env("AWS_ACCESS_KEY_ID")
    secret = cfg.secret_key or _env("AWS_SECRET_ACCESS_KEY")
    if access and secret:
        opts["access_key"] = access
        opts["secret_key"] = secret
        token = _env("AWS_SESSION_TOKEN")
        if token:
            opts["session_token"] = token
    return opts


@dataclass
class ObjectStore:
    """A pyarrow filesystem rooted at one URI.

    Attributes:
        uri: The canonical URI (``file:///abs/path`` or ``s3://bucket/prefix``).
        fs: The pyarrow filesystem.
        root: The root path inside ``fs`` (no trailing slash).
        s3: Keyword arguments the S3 filesystem was built with (empty for local stores),
            kept so other processes (Ray workers) can rebuild it.
    """

    uri: str
    fs: pafs.FileSystem
    root: str
    s3: Dict[str, object] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        """Whether the store is a local folder."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """Filesystem path of ``rel`` under the root."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        """Full URI of ``rel``, for messages and manifests."""
        return f"{self.uri.rstrip('/')}/{rel.strip('/')}"

    def exists(self, rel: str) -> bool:
        """Whether the object/file ``rel`` exists."""
        info = self._call(lambda: self.fs.get_file_info(self.path(rel)), rel, "could not stat")
        return info.type != pafs.FileType.NotFound

    def size(self, rel: str) -> int:
        """Size in bytes of ``rel`` (raises `StorageError` if missing)."""
        info = self._call(lambda: self.fs.get_file_info(self.path(rel)), rel, "could not stat")
        if info.type == pafs.FileType.NotFound:
            raise StorageError(self.uri_of(rel), "not found")
        return int(info.size or 0)

    def list(self, rel: str = "", suffix: str = "") -> List[str]:
        """Relative paths of files under ``rel`` (recursive), sorted."""
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        infos = self._call(lambda: self.fs.get_file_info(sel), rel, "could not list")
        base = self.root + "/"
        out = [
            i.path[len(base):] if i.path.startswith(base) else i.path
            for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix) and "/.tmp-" not in i.path
            and not i.path.endswith("/" + LOCK_FILE)
        ]
        return sorted(out)

    def read_bytes(self, rel: str) -> bytes:
        """Whole content of ``rel``."""
        def _read() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        return self._call(_read, rel, "could not read")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically: readers see the old object or the whole new one."""
        target = self.path(rel)
        if self.is_local:
            self._write_local(rel, target, data)
            return

        def _put() -> None:
            # An S3 PUT/multipart upload is visible only once complete: atomic by itself.
            with self.fs.open_output_stream(target) as f:
                f.write(data)

        self._call(_put, rel, "could not write")

    def _write_local(self, rel: str, target: str, data: bytes) -> None:
        parent, name = target.rsplit("/", 1)
        self._call(lambda: os.makedirs(parent, exist_ok=True), rel, "could not create folder")
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                # On disk before it gets its name: a crash after the rename never leaves a
                # named file with missing bytes (the manifest may already point at it).
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as e:
            self._silent_delete(tmp)
            raise StorageError(self.uri_of(rel), "could not write", e) from e

    def version(self, rel: str) -> Optional[str]:
        """An opaque version of ``rel`` for `put_if` (the S3 ETag; local: None), None if absent."""
        if self.is_local:
            return None
        client, bucket, key = self._s3_client(rel)
        try:
            return str(client.head_object(Bucket=bucket, Key=key)["ETag"])
        except client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(self.uri_of(rel), "could not stat", e) from e

    def put_if(self, rel: str, data: bytes, expected: Optional[str], exists: bool) -> None:
        """Write ``rel`` only if it is still as it was read: the commit of a snapshot.

        Args:
            rel: Object to write.
            data: Its new content.
            expected: `version` read before the change (S3 ETag), when ``exists``.
            exists: Whether the object existed when read (False: create only if absent).

        Raises:
            CommitConflict: another writer created or replaced the object in between.
            StorageError: the write failed.
        """
        if self.is_local:
            # Local writers are serialised by `writer_lock`: a plain atomic write suffices.
            self.write_bytes(rel, data)
            return
        client, bucket, key = self._s3_client(rel)
        cond = {"IfMatch": expected} if exists else {"IfNoneMatch": "*"}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, **cond)
        except client.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey"):
                raise CommitConflict(self.uri_of(rel), "another writer committed to this store first; "
                                     "this run's snapshot was not made visible") from None
            raise StorageError(self.uri_of(rel), "could not write", e) from e
        except Exception as e:  # botocore connection errors are not ClientError
            raise StorageError(self.uri_of(rel), "could not write", e) from e

    @contextlib.contextmanager
    def writer_lock(self, what: str = "prepare") -> Iterator[None]:
        """Hold the store's writer lock for a block (local stores; S3 relies on `put_if`).

        Raises:
            StorageError: another process holds the lock (its pid, host and start time named).
        """
        if not self.is_local:
            yield
            return
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _wait_for_holder(fd)
                raise StorageError(self.uri, f"another {holder.get('what', 'writer')} is writing to this store "
                                   f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                                   f"{holder.get('since', '?')}); wait for it to finish or stop it") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing drops the flock; the kernel does the same for a killed process

    def _s3_client(self, rel: str) -> Any:
        """A boto3 client built from the same settings as the pyarrow filesystem."""
        import boto3
        from botocore.config import Config

        o = self.s3
        endpoint = o.get("endpoint_override")
        url = f"{o.get('scheme', 'https')}://{endpoint}" if endpoint else None
        client = boto3.client(
            "s3", endpoint_url=url, region_name=str(o.get("region") or "us-east-1"),
            aws_access_key_id=o.get("access_key"), aws_secret_access_key=o.get("secret_key"),
            aws_session_token=o.get("session_token"),
            config=Config(connect_timeout=float(o.get("connect_timeout", 5.0)), retries={"max_attempts": 2}),
        )
        bucket, _, prefix = self.path(rel).partition("/")
        return client, bucket, prefix

    def delete(self, rel: str) -> None:
        """Delete ``rel`` if present."""
        self._silent_delete(self.path(rel))

    def check_reachable(self) -> None:
        """Raise `StorageError` naming the URI if the store cannot be listed or created."""
        if self.is_local:
            try:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(self.uri, "local store folder cannot be created", e) from e
            if not os.access(self.root, os.W_OK):
                raise StorageError(self.uri, "local store folder is not writable")
            return
        bucket = self.root.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
            if info.type == pafs.FileType.NotFound:
                self.fs.create_dir(bucket)
        except OSError as e:
            raise StorageError(self.uri, "object store unreachable or access denied", e) from e

    def _silent_delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:
            pass

    def _call(self, fn, rel: str, what: str):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except FileNotFoundError as e:
            raise StorageError(self.uri_of(rel), f"{what}: not found", e) from e
        except OSError as e:
            raise StorageError(self.uri_of(rel), what, e) from e


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


#: How long a refused writer waits for the lock holder to write its name (seconds).
HOLDER_WAIT_S = 1.0


def _wait_for_holder(fd: int) -> Dict[str, Any]:
    """The lock holder's record; empty only if none appears within `HOLDER_WAIT_S`.

    The holder writes its record just after taking the lock, so a writer refused in that
    instant reads an empty file. It waits briefly so that its error can name the holder.
    """
    deadline = time.monotonic() + HOLDER_WAIT_S
    holder = _read_holder(fd)
    while not holder and time.monotonic() < deadline:
        time.sleep(0.02)
        holder = _read_holder(fd)
    return holder


def open_store(uri: str, cfg: Optional[StorageConfig] = None) -> ObjectStore:
    """Open the store at ``uri`` (a local path, ``file://`` or ``s3://`` URI).

    Args:
        uri: Where the store lives. Relative local paths are made absolute, because Ray
            workers run in other directories.
        cfg: S3 settings; defaults come from the environment.

    Raises:
        StorageError: unsupported scheme or an S3 filesystem that cannot be built.
    """
    cfg = cfg or StorageConfig()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        local = parsed.path if parsed.scheme == "file" else uri
        root = str(Path(os.path.expanduser(local)).resolve())
        return ObjectStore(uri=Path(root).as_uri(), fs=pafs.LocalFileSystem(), root=root)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(uri, "s3 URI needs a bucket: s3://bucket/prefix")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        opts = s3_options(cfg, query)
        try:
            fs = pafs.S3FileSystem(**opts)  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            raise StorageError(uri, "cannot configure the S3 filesystem", e) from e
        root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        clean = f"s3://{root}"
        return ObjectStore(uri=clean, fs=fs, root=root, s3={k: v for k, v in opts.items() if k != "retry_strategy"})
    raise StorageError(uri, f"unsupported URI scheme {parsed.scheme!r}; use a local path, file:// or s3://")
