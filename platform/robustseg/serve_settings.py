"""Settings, start-up checks and request errors of the segmentation service: no heavy imports.

`robustseg.cli.serve` builds the ``serve`` parser from these names, so ``robustseg --help``
imports nothing beyond the standard library here. `robustseg.serving` re-exports them.

* `ServeSettings` / `settings_from`: what the service loads and the limits it enforces, from
  explicit arguments (the ``args:`` of ``serve_config.yaml``) falling back to environment
  variables;
* `RequestError` (an HTTP status and a message naming the upload), `ModelLoadError`,
  `ServeStartError`;
* `check_port_free` / `port_error`: the friendly "port in use" of ``robustseg serve``.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from robustseg.errors import ConfigError, RobustsegError

ENV_MODEL_URI = "ROBUSTSEG_MODEL_URI"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_MAX_UPLOAD_MB = "ROBUSTSEG_MAX_UPLOAD_MB"
ENV_MAX_DECODED_MB = "ROBUSTSEG_MAX_DECODED_MB"
ENV_MAX_INFLIGHT_MB = "ROBUSTSEG_MAX_INFLIGHT_MB"
DEFAULT_MAX_UPLOAD_MB = 64.0
#: 2**27 voxels = 512 MB of float32: a 512 x 512 x 512 CT still fits, a gzip bomb does not.
DEFAULT_MAX_VOXELS = 2**27
#: Decoded voxel bytes (dtype itemsize x voxels) of one volume: a 512^3 int16 CT (256 MB) or a
#: 512 x 512 x 512 float32 volume fits; the 1 GB of a 512^3 float64 gzip bomb does not.
DEFAULT_MAX_DECODED_MB = 512.0
#: Estimated decode memory (`decode_cost`) of all requests a replica holds at once.
DEFAULT_MAX_INFLIGHT_MB = 2048.0
#: How long a request waits for room in the in-flight budget before it gets 503.
DEFAULT_ADMISSION_WAIT_S = 5.0


@dataclass
class ServeSettings:
    """What the service loads and the limits it enforces.

    Attributes:
        model_uri: Ensemble folder or MLflow URI (``models:/name@alias``).
        tracking_uri: MLflow tracking URI for ``models:/`` URIs (None: MLflow's default).
        max_upload_mb: Largest accepted volume file, in MB (a larger one gets HTTP 413).
        max_voxels: Largest accepted voxel count, read from the NIfTI header before decoding.
        max_decoded_mb: Largest decoded volume (dtype itemsize x voxels, from the header) in
            MB; a larger one gets HTTP 413 before anything is inflated.
        max_inflight_mb: Memory budget of one replica in MB: the estimated decode memory
            (`decode_cost`) of every request it holds at once. Must hold at least one
            largest upload.
        admission_wait_s: How long a request waits for room in that budget before it gets
            HTTP 503 with Retry-After.
        device: "cpu", "cuda" or None (CUDA when the replica sees one).
        max_batch_size: Most volumes batched into one ensemble call.
        batch_wait_timeout_s: How long a batch waits for more requests.
    """

    model_uri: str
    tracking_uri: Optional[str] = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_voxels: int = DEFAULT_MAX_VOXELS
    max_decoded_mb: float = DEFAULT_MAX_DECODED_MB
    max_inflight_mb: float = DEFAULT_MAX_INFLIGHT_MB
    admission_wait_s: float = DEFAULT_ADMISSION_WAIT_S
    device: Optional[str] = None
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise ConfigError(f"no model to serve: set model_uri (or ${ENV_MODEL_URI}) to an ensemble folder "
                              "or a models:/name@alias URI")
        for name, least in (("max_upload_mb", 1e-9), ("max_voxels", 1), ("max_decoded_mb", 1e-9),
                            ("max_inflight_mb", 1e-9), ("admission_wait_s", 0.0), ("max_batch_size", 1),
                            ("batch_wait_timeout_s", 0.0)):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= least):
                raise ConfigError(f"serve setting {name} must be at least {least:g}, got {getattr(self, name)!r}")
        if self.max_inflight_mb < self.max_upload_mb:
            # Otherwise the largest accepted upload could never be admitted.
            raise ConfigError(f"serve setting max_inflight_mb ({self.max_inflight_mb:g}) must be at least "
                              f"max_upload_mb ({self.max_upload_mb:g})")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"serve setting device must be cpu, cuda, cuda:N or unset, got {self.device!r}")

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes (1 MB = 2**20 bytes)."""
        return int(self.max_upload_mb * 2**20)

    @property
    def max_decoded_bytes(self) -> int:
        """The decoded-volume limit in bytes."""
        return int(self.max_decoded_mb * 2**20)

    @property
    def max_inflight_bytes(self) -> int:
        """The in-flight memory budget in bytes."""
        return int(self.max_inflight_mb * 2**20)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (what a Serve deployment receives)."""
        return dataclasses.asdict(self)


_CASTS = {"model_uri": str, "tracking_uri": str, "max_upload_mb": float, "max_voxels": int,
          "max_decoded_mb": float, "max_inflight_mb": float, "admission_wait_s": float, "device": str,
          "max_batch_size": int, "batch_wait_timeout_s": float}
_ENV = (("model_uri", ENV_MODEL_URI), ("tracking_uri", ENV_TRACKING_URI), ("max_upload_mb", ENV_MAX_UPLOAD_MB),
        ("max_decoded_mb", ENV_MAX_DECODED_MB), ("max_inflight_mb", ENV_MAX_INFLIGHT_MB))


def settings_from(args: Optional[Mapping[str, Any]] = None,
                  environ: Optional[Mapping[str, str]] = None) -> ServeSettings:
    """Settings from explicit arguments, falling back to environment variables.

    A key given (not None or "") in ``args`` wins; else ``$ROBUSTSEG_MODEL_URI``,
    ``$MLFLOW_TRACKING_URI``, ``$ROBUSTSEG_MAX_UPLOAD_MB``, ``$ROBUSTSEG_MAX_DECODED_MB``,
    ``$ROBUSTSEG_MAX_INFLIGHT_MB``; else the default. Strings are
    converted (``serve run deploy.serve_app:build_app key=value`` passes strings).

    Args:
        args: Setting values by `ServeSettings` field name.
        environ: Environment to read (default ``os.environ``).

    Raises:
        ConfigError: unknown keys (listing the valid ones), unconvertible or invalid values,
            or no model URI anywhere.
    """
    env = os.environ if environ is None else environ
    given = {k: v for k, v in dict(args or {}).items() if v is not None and v != ""}
    unknown = sorted(set(given) - set(_CASTS))
    if unknown:
        raise ConfigError(f"unknown serve settings {unknown}; valid: {sorted(_CASTS)}")
    for key, var in _ENV:
        if key not in given and env.get(var):
            given[key] = env[var]
    values: Dict[str, Any] = {}
    for key, value in given.items():
        try:
            values[key] = _CASTS[key](value)
        except (TypeError, ValueError):
            raise ConfigError(f"serve setting {key}: cannot read {value!r} as {_CASTS[key].__name__}") from None
    if values.get("device") == "auto":
        values["device"] = None
    values.setdefault("model_uri", "")
    return ServeSettings(**values)


class RequestError(RobustsegError):
    """A request the service refuses, with the HTTP status to answer.

    Args:
        status: HTTP status code (4xx, or 503 when the replica is full).
        message: What is wrong, naming the upload.
        retry_after_s: Seconds a client should wait before retrying (the ``Retry-After``
            header of a 503), or None.
    """

    def __init__(self, status: int, message: str, retry_after_s: Optional[int] = None) -> None:
        self.status = int(status)
        self.message = message
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ModelLoadError(RobustsegError):
    """The served model cannot be loaded; the message names its URI and the real cause."""

    @classmethod
    def wrap(cls, uri: str, exc: BaseException) -> "ModelLoadError":
        """The error for ``exc`` raised while loading ``uri`` (its text, naming the URI once)."""
        text = str(exc) if isinstance(exc, RobustsegError) else f"{type(exc).__name__}: {exc}"
        return cls(f"cannot load the model: {text}" if uri in text else f"cannot load the model {uri}: {text}")


class ServeStartError(RobustsegError):
    """The service could not start (port in use, model not loadable ...): says why."""


# ----------------------------------------------------------------------------- start-up
def check_port_free(host: str, port: int) -> None:
    """Fail early and clearly when ``host:port`` cannot be listened on.

    Binds (with SO_REUSEADDR, as the HTTP server will) and closes at once; someone may still
    take the port in between, which `deploy.serve_app.start_local` reports the same way.

    Raises:
        ServeStartError: the port is in use (naming it) or the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:
            raise port_error(host, port, e) from None


def port_error(host: str, port: int, cause: Optional[BaseException] = None) -> ServeStartError:
    """The error `robustseg serve` shows when it cannot listen on ``host:port``."""
    if cause is None or getattr(cause, "errno", errno.EADDRINUSE) == errno.EADDRINUSE:
        return ServeStartError(f"port {port} on {host} is already in use (another program listens there): "
                               "stop it or choose another port with --port")
    return ServeStartError(f"cannot listen on {host}:{port} ({getattr(cause, 'strerror', None) or cause})")
