"""Object storage behind one small interface: local folders, ``file://`` and ``s3://`` URIs.

pyarrow's filesystems do the work, so the same store object serves the prepare step, the
Parquet reader and (later) Ray Data. S3 endpoint, region and credentials come from the
`StorageConfig`, then from URI query parameters (``?endpoint_override=...&scheme=http``,
the form Ray accepts), then from the ``AWS_*`` environment variables boto3 users set.

Writes are atomic per object: local files are written to a hidden temporary name and
renamed; S3 objects become visible only when their upload completes.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from robustseg.config import StorageConfig
from robustseg.errors import StorageError


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
        parent = target.rsplit("/", 1)[0]
        if self.is_local:
            self._call(lambda: self.fs.create_dir(parent, recursive=True), rel, "could not create folder")
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{target.rsplit('/', 1)[1]}"
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, target)
            except OSError as e:
                self._silent_delete(tmp)
                raise StorageError(self.uri_of(rel), "could not write", e) from e
            return

        def _put() -> None:
            # An S3 PUT/multipart upload is visible only once complete: atomic by itself.
            with self.fs.open_output_stream(target) as f:
                f.write(data)

        self._call(_put, rel, "could not write")

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
