"""One place for durable things: where whatever must outlive a node is stored, and how to reach it.

On a cluster every node has its own disks: a checkpoint in a worker's temp folder, or Ray
results under a node's ``<workdir>``, are gone (or unreachable) once that node is. Ray
Train/Tune results, sweep bookkeeping (``sweep.json``, ``trials.json``), ensemble folders and
the checkpoint URIs recorded in MLflow therefore live under one storage URI,
``tracking.storage_uri`` (`storage_uri`): a local folder (one node, or a shared mount) or
``s3://bucket/prefix``.

S3 is reached with the endpoint, region and credentials of ``data.storage`` (then the URI's
query, then the ``AWS_*`` variables; `robustseg.data.storage.s3_options`), never with
``pyarrow.fs.FileSystem.from_uri`` alone, which would ignore a configured endpoint such as a
MinIO or moto server. Ray gets the same filesystem: `ray_storage` returns the
``(storage_path, storage_filesystem)`` pair for a ``RunConfig``, the path without its scheme as
Ray expects when a filesystem is given.

URIs passed around between processes are always complete (``s3://bucket/key`` or an absolute
local path), so any node can open them with `filesystem`.

Ray-free: the ML core and the tracking modules use it too.
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Tuple, Union
from urllib.parse import parse_qs, urlparse

import pyarrow.fs as pafs

from robustseg.config import ExperimentConfig, StorageConfig, absolute_workdir
from robustseg.errors import StorageError

#: Environment variable naming the storage URI when the config leaves it out.
ENV = "ROBUSTSEG_STORAGE_URI"
#: Folder under the workdir used when neither the config nor the environment names one.
DEFAULT_FOLDER = "ray_results"


def is_uri(path: Union[str, Path]) -> bool:
    """Whether ``path`` carries a scheme (``s3://``, ``file://``, ...)."""
    return "://" in str(path)


def is_remote(uri: Union[str, Path]) -> bool:
    """Whether ``uri`` names storage that is not a local path (a URI other than ``file://``)."""
    return is_uri(uri) and urlparse(str(uri)).scheme != "file"


def _local(path: Union[str, Path]) -> str:
    """Absolute local path of a path or ``file://`` URI."""
    text = str(path)
    if text.startswith("file://"):
        text = urlparse(text).path
    return str(Path(os.path.expanduser(text)).resolve())


def absolute(uri: Union[str, Path]) -> str:
    """A remote URI as given (no trailing slash); a local path or ``file://`` URI as an absolute path."""
    return str(uri).rstrip("/") if is_remote(uri) else _local(uri)


def storage_uri(cfg: ExperimentConfig, override: Optional[str] = None) -> str:
    """The durable storage root: ``override``, else ``tracking.storage_uri``, else ``$ROBUSTSEG_STORAGE_URI``,
    else ``<workdir>/ray_results``.

    Local folders (and ``file://`` URIs) come back as absolute paths: Ray workers run in other
    working directories. Remote URIs come back as given, without a trailing slash.

    Args:
        cfg: Experiment config.
        override: A command-line value (``tune --storage``, ``ensemble --storage-path``) that wins.
    """
    uri = override or cfg.tracking.storage_uri or os.environ.get(ENV)
    if not uri:
        return str(absolute_workdir(cfg) / DEFAULT_FOLDER)
    return absolute(uri)


def filesystem(uri: Union[str, Path], storage: Optional[StorageConfig] = None) -> Tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path in it for a local path, ``file://`` or ``s3://`` URI.

    Args:
        uri: Where.
        storage: S3 endpoint/credentials (``data.storage``); default: the environment's.

    Raises:
        StorageError: an S3 URI without a bucket, an S3 filesystem that cannot be built, or a
            scheme pyarrow does not know.
    """
    text = str(uri)
    if not is_remote(text):
        return pafs.LocalFileSystem(), _local(text)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        from robustseg.data.storage import s3_options

        if not parsed.netloc:
            raise StorageError(text, "s3 URI needs a bucket: s3://bucket/prefix")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        try:
            fs = pafs.S3FileSystem(**s3_options(storage or StorageConfig(), query))  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            raise StorageError(text, "cannot configure the S3 filesystem", e) from e
        return fs, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    try:  # gs://, hdfs://, ...: pyarrow's own resolution (no robustseg settings apply)
        return pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as e:
        raise StorageError(text, "unsupported storage URI", e) from e


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The complete URI of ``path`` in ``fs``: ``s3://bucket/key`` for S3, the plain path for local disks.

    Ray hands out paths without a scheme when it was given a filesystem (checkpoints, results):
    this restores what another process needs to find them.
    """
    if isinstance(fs, pafs.LocalFileSystem) or is_uri(path):
        return str(path)
    return f"{fs.type_name}://{str(path).lstrip('/')}"


def ray_storage(uri: str, storage: Optional[StorageConfig] = None) -> Tuple[str, Optional[pafs.FileSystem]]:
    """``(storage_path, storage_filesystem)`` for a Ray ``RunConfig``, ``Tuner.restore`` or ``can_restore``.

    Local storage: the absolute path and None (Ray's own local handling). Remote storage: the
    path without its scheme and the filesystem built with ``storage``, so a custom endpoint
    reaches Ray too.
    """
    if not is_remote(uri):
        return _local(uri), None
    fs, path = filesystem(uri, storage)
    return path, fs


def join(uri: Union[str, Path], *parts: str) -> str:
    """``uri`` with ``parts`` appended by ``/`` (a URI's query string stays at the end)."""
    text = str(uri)
    base, sep, query = text.partition("?") if is_remote(text) else (text, "", "")
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    joined = f"{base.rstrip('/')}/{tail}" if tail else base
    return joined + sep + query


def exists(uri: Union[str, Path], storage: Optional[StorageConfig] = None) -> bool:
    """Whether a file or folder exists at ``uri``."""
    fs, path = filesystem(uri, storage)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(str(uri), "could not stat", e) from e


def write_bytes(uri: Union[str, Path], data: bytes, storage: Optional[StorageConfig] = None) -> None:
    """Write a file whole: readers see it complete or not at all (parents created).

    Local files are written under a temporary name and renamed; an S3 object becomes visible
    only when its upload completes.
    """
    fs, path = filesystem(uri, storage)
    parent = path.rsplit("/", 1)[0]
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise StorageError(str(uri), "could not write", e) from e


def write_text(uri: Union[str, Path], text: str, storage: Optional[StorageConfig] = None) -> None:
    """Write a small text file (UTF-8) whole; see `write_bytes`."""
    write_bytes(uri, text.encode(), storage)


def read_bytes(uri: Union[str, Path], storage: Optional[StorageConfig] = None) -> bytes:
    """A file's content.

    Raises:
        FileNotFoundError: nothing at ``uri`` (the message names it).
        StorageError: the store could not be read.
    """
    fs, path = filesystem(uri, storage)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not found") from None
    except OSError as e:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri}: not found") from None
        raise StorageError(str(uri), "could not read", e) from e


def read_json(uri: Union[str, Path], storage: Optional[StorageConfig] = None) -> Any:
    """A JSON file's content (`read_bytes` errors)."""
    return json.loads(read_bytes(uri, storage).decode())


def upload_file(local: Union[str, Path], uri: Union[str, Path], storage: Optional[StorageConfig] = None) -> str:
    """Copy a local file to ``uri`` (written whole, parents created); returns ``uri``."""
    write_bytes(uri, Path(local).read_bytes(), storage)
    return str(uri)


def upload_dir(local: Union[str, Path], uri: Union[str, Path], storage: Optional[StorageConfig] = None) -> str:
    """Copy a local folder (recursively) to ``uri``; returns ``uri``."""
    fs, path = filesystem(uri, storage)
    try:
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    except OSError as e:
        raise StorageError(str(uri), f"could not copy {local} here", e) from e
    return str(uri)


def download_file(uri: Union[str, Path], local: Union[str, Path], storage: Optional[StorageConfig] = None) -> Path:
    """Copy the file at ``uri`` to the local path ``local`` (parents created); returns ``local``.

    Raises:
        FileNotFoundError: nothing at ``uri``.
        StorageError: the store could not be read.
    """
    dest = Path(local)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(read_bytes(uri, storage))
    return dest


def is_scratch(path: Union[str, Path, None]) -> bool:
    """Whether ``path`` is node-local scratch: a local path under this machine's temp folder.

    Such paths (a Ray worker's ``robustseg-<name>-rank0-*`` folder) are deleted when the
    process ends and mean nothing on another node: they must never be recorded as where a
    model is. URIs other than ``file://`` are never scratch.
    """
    if path is None or is_remote(str(path)):
        return False
    try:
        Path(_local(path)).relative_to(Path(tempfile.gettempdir()).resolve())
    except ValueError:
        return False
    return True


__all__ = ["DEFAULT_FOLDER", "ENV", "absolute", "download_file", "exists", "filesystem", "is_remote", "is_scratch", "is_uri",
           "join", "ray_storage", "read_bytes", "read_json", "storage_uri", "upload_dir", "upload_file", "uri_of",
           "write_bytes", "write_text"]
