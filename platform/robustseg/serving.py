"""Request logic of the segmentation service, free of Ray and of any web framework.

`deploy/serve_app.py` wraps these functions in a Ray Serve deployment; everything here runs
in a plain process, so it is unit-tested without starting Ray:

* `ServeSettings` / `settings_from`: what the service loads and the limits it enforces, from
  explicit arguments (the ``args:`` of ``serve_config.yaml``) falling back to environment
  variables;
* `case_from_upload`: request bytes -> a validated `Case`, or a `RequestError` carrying the
  HTTP status (413 over a limit, 400 otherwise) and a message naming the upload;
* `mask_to_nifti_bytes` and `cardiac_json`: predictions -> response bodies;
* `post_volumes`: the client behind ``robustseg predict --endpoint URL``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from robustseg.analysis.clinical import cardiac_function, structure_volumes_ml
from robustseg.data.cases import Case
from robustseg.data.labels import CARDIAC_NAMES, LV, MYO, RV
from robustseg.engine.postprocess import STRUCTURE_3D
from robustseg.errors import ConfigError, DataError, RobustsegError

ENV_MODEL_URI = "ROBUSTSEG_MODEL_URI"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_MAX_UPLOAD_MB = "ROBUSTSEG_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 64.0
#: 2**27 voxels = 512 MB of float32: a 512 x 512 x 512 CT still fits, a gzip bomb does not.
DEFAULT_MAX_VOXELS = 2**27
GZIP_MAGIC = b"\x1f\x8b"
#: Header keys that describe the stored intensities, not the grid: they must not be copied
#: from an image onto its uint8 mask.
_INTENSITY_KEYS = {"bitpix", "datatype", "scl_slope", "scl_inter", "cal_min", "cal_max", "vox_offset"}


@dataclass
class ServeSettings:
    """What the service loads and the limits it enforces.

    Attributes:
        model_uri: Ensemble folder or MLflow URI (``models:/name@alias``).
        tracking_uri: MLflow tracking URI for ``models:/`` URIs (None: MLflow's default).
        max_upload_mb: Largest accepted volume file, in MB (a larger one gets HTTP 413).
        max_voxels: Largest accepted voxel count, read from the NIfTI header before decoding.
        device: "cpu", "cuda" or None (CUDA when the replica sees one).
        max_batch_size: Most volumes batched into one ensemble call.
        batch_wait_timeout_s: How long a batch waits for more requests.
    """

    model_uri: str
    tracking_uri: Optional[str] = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_voxels: int = DEFAULT_MAX_VOXELS
    device: Optional[str] = None
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise ConfigError(f"no model to serve: set model_uri (or ${ENV_MODEL_URI}) to an ensemble folder "
                              "or a models:/name@alias URI")
        for name, least in (("max_upload_mb", 1e-9), ("max_voxels", 1), ("max_batch_size", 1),
                            ("batch_wait_timeout_s", 0.0)):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= least):
                raise ConfigError(f"serve setting {name} must be at least {least:g}, got {getattr(self, name)!r}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"serve setting device must be cpu, cuda, cuda:N or unset, got {self.device!r}")

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes (1 MB = 2**20 bytes)."""
        return int(self.max_upload_mb * 2**20)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (what a Serve deployment receives)."""
        return dataclasses.asdict(self)


_CASTS = {"model_uri": str, "tracking_uri": str, "max_upload_mb": float, "max_voxels": int, "device": str,
          "max_batch_size": int, "batch_wait_timeout_s": float}


def settings_from(args: Optional[Mapping[str, Any]] = None,
                  environ: Optional[Mapping[str, str]] = None) -> ServeSettings:
    """Settings from explicit arguments, falling back to environment variables.

    A key given (not None or "") in ``args`` wins; else ``$ROBUSTSEG_MODEL_URI``,
    ``$MLFLOW_TRACKING_URI``, ``$ROBUSTSEG_MAX_UPLOAD_MB``; else the default. Strings are
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
    for key, var in (("model_uri", ENV_MODEL_URI), ("tracking_uri", ENV_TRACKING_URI),
                     ("max_upload_mb", ENV_MAX_UPLOAD_MB)):
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
        status: HTTP status code (4xx).
        message: What is wrong, naming the upload.
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = int(status)
        self.message = message
        super().__init__(message)


class EndpointError(RobustsegError):
    """The server could not be reached or answered an error (client side)."""


def error_response(exc: BaseException) -> Tuple[int, Dict[str, str]]:
    """HTTP status and JSON body for an exception raised while handling a request.

    Args:
        exc: The exception.

    Returns:
        ``(status, {"error": message})``: a `RequestError`'s own status, 400 for a `DataError`
        (e.g. a CT sent to an MR model), 500 for anything else.
    """
    if isinstance(exc, RequestError):
        return exc.status, {"error": exc.message}
    if isinstance(exc, DataError):
        return 400, {"error": str(exc)}
    return 500, {"error": f"internal error ({type(exc).__name__}: {exc})"}


# ----------------------------------------------------------------------------- uploads
def safe_stem(filename: str) -> str:
    """A file-system-safe stem of an uploaded file's name (``../a b.nii.gz`` -> ``a_b``)."""
    name = re.split(r"[\\/]", filename or "")[-1]
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:100] or "upload"


def nifti_dims(data: bytes, where: str) -> Tuple[int, ...]:
    """The dimensions a (possibly gzipped) single-file NIfTI-1/2 header declares.

    Only the header is decompressed, so a gzip bomb is caught before it is inflated.

    Args:
        data: File bytes.
        where: Name for error messages.

    Raises:
        RequestError: 400 when the bytes are not a NIfTI file or the gzip stream is broken
            before the end of the header.
    """
    head = data[:544]
    if data[:2] == GZIP_MAGIC:
        try:
            head = zlib.decompressobj(wbits=31).decompress(data, 544)
        except zlib.error as e:
            raise RequestError(400, f"{where}: corrupt gzip data ({e})") from None
        if len(head) < 348:
            raise RequestError(400, f"{where}: truncated gzip data: only {len(head)} bytes of NIfTI header")
    dims: Tuple[int, ...] = ()
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348 and head[344:348] == b"n+1\0":
            dims = struct.unpack(endian + "8h", head[40:56])
        elif size == 540 and len(head) >= 540 and head[4:8] == b"n+2\0":
            dims = struct.unpack(endian + "8q", head[16:80])
    if not dims:
        raise RequestError(400, f"{where}: not a NIfTI volume (no single-file NIfTI-1/2 header); send .nii or .nii.gz")
    if not 1 <= dims[0] <= 7:
        raise RequestError(400, f"{where}: invalid NIfTI header (dim[0] = {dims[0]})")
    return tuple(int(d) for d in dims[1 : dims[0] + 1])


def case_from_upload(data: bytes, filename: str, task: str, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                     max_voxels: int = DEFAULT_MAX_VOXELS) -> Case:
    """Read and validate an uploaded NIfTI volume.

    Args:
        data: The file's bytes (``.nii`` or ``.nii.gz``; gzip is recognised by its magic
            bytes, not by the name).
        filename: The name the client gave; errors say ``upload '<filename>': ...``.
        task: The model's task (sets the case's modality).
        max_upload_mb: Size limit of ``data``.
        max_voxels: Voxel-count limit from the header.

    Returns:
        The case (original geometry; the header's metadata in ``meta["nifti_header"]``).

    Raises:
        RequestError: 413 over a limit; 400 for an empty upload, not a NIfTI, a truncated
            or corrupt file, wrong dimensionality, NaN/inf voxels or a constant volume.
    """
    from robustseg.engine.predict import read_input  # torch-heavy: only when serving

    where = f"upload {filename!r}"
    if len(data) > int(max_upload_mb * 2**20):
        raise RequestError(413, f"{where}: {len(data) / 2**20:.1f} MB is over the {max_upload_mb:g} MB upload limit")
    if not data:
        raise RequestError(400, f"{where}: empty upload")
    dims = nifti_dims(data, where)
    n_voxels = int(np.prod([max(d, 1) for d in dims], dtype=np.int64))
    if n_voxels > max_voxels:
        raise RequestError(413, f"{where}: {n_voxels} voxels (dims {dims}) is over the {max_voxels} voxel limit")
    suffix = ".nii.gz" if data[:2] == GZIP_MAGIC else ".nii"
    with tempfile.TemporaryDirectory(prefix="robustseg_upload_") as tmp:
        path = Path(tmp) / (safe_stem(filename) + suffix)
        path.write_bytes(data)
        try:
            case = read_input(path, task)
        except DataError as e:
            # The temporary path means nothing to the client: name what they sent instead.
            problem = e.problem.replace(str(path), filename).replace(tmp, "")
            raise RequestError(400, f"{where}: {problem}") from None
        case.meta["nifti_header"] = _header_metadata(path)
    case.source_path = where
    case.case_id = case.subject_id = safe_stem(filename)
    return case


def _header_metadata(path: Path) -> Dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # header only: the voxels were read and checked already
    return {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}


# ----------------------------------------------------------------------------- responses
def mask_to_nifti_bytes(label: np.ndarray, case: Case) -> bytes:
    """A label map as ``.nii.gz`` bytes on the input's grid, with its header metadata.

    Spacing, origin and direction come from ``case``; the input's header keys are copied
    where SimpleITK writes them (description, aux file), except those describing intensities.

    Args:
        label: ``(Z, Y, X)`` labels on the case's grid.
        case: The input case (`case_from_upload`).

    Raises:
        ValueError: the label's shape differs from the case's.
    """
    label = np.asarray(label)
    if label.shape != case.shape:
        raise ValueError(f"{case.source_path}: mask shape {label.shape} differs from the input's {case.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(label.astype(np.uint8, copy=False)))
    image.SetSpacing([float(v) for v in case.spacing])
    image.SetOrigin([float(v) for v in case.origin])
    image.SetDirection([float(v) for v in case.direction])
    for key, value in case.meta.get("nifti_header", {}).items():
        if key not in _INTENSITY_KEYS and not value.startswith("[UNKNOWN"):
            image.SetMetaData(key, value)
    with tempfile.TemporaryDirectory(prefix="robustseg_mask_") as tmp:
        out = Path(tmp) / "mask.nii.gz"
        sitk.WriteImage(image, str(out), useCompression=True)
        return out.read_bytes()


def structure_voxels(label: np.ndarray, class_names: Mapping[int, str]) -> Dict[str, int]:
    """Voxel count of every foreground class, by name."""
    counts = np.bincount(np.asarray(label).ravel(), minlength=max(class_names) + 1)
    return {name: int(counts[c]) for c, name in sorted(class_names.items()) if c > 0}


def json_safe(obj: Any) -> Any:
    """A copy with NaN/inf as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def cardiac_json(ed_label: np.ndarray, es_label: np.ndarray, ed_case: Case, es_case: Case) -> Dict[str, Any]:
    """Cardiac function of an ED/ES pair as a JSON-ready dict.

    Args:
        ed_label: Canonical labels (1 LV, 2 MYO, 3 RV) of the end-diastolic volume.
        es_label: Labels of the end-systolic volume.
        ed_case: The ED input (spacing).
        es_case: The ES input.

    Returns:
        `robustseg.analysis.clinical.cardiac_function`'s figures (``lv_edv`` ... ``myo_mass_ed``,
        ``units``, ``flags``) with NaN as None, plus ``structures``: per structure its ED/ES
        volumes, voxel counts, 3D components and the flags about it; and ``ed``/``es``: each
        input's shape and spacing.

    Raises:
        RequestError: 400 when the pair cannot be measured (unknown, differing spacings).
    """
    known = bool(ed_case.spacing_known and es_case.spacing_known)
    try:
        fn = cardiac_function(ed_label, es_label, ed_case.spacing, es_case.spacing, spacing_known=known)
    except ValueError as e:
        raise RequestError(400, f"cannot measure {ed_case.source_path} / {es_case.source_path}: {e}") from None
    flags = list(fn["flags"])
    if ed_case.shape != es_case.shape or not np.allclose(ed_case.spacing, es_case.spacing, rtol=1e-4):
        flags.append(f"ED and ES grids differ (shape {ed_case.shape} vs {es_case.shape}, "
                     f"spacing {tuple(ed_case.spacing)} vs {tuple(es_case.spacing)}): are they the same acquisition?")
    pairs = {"ed": (np.asarray(ed_label), ed_case), "es": (np.asarray(es_label), es_case)}
    structures: Dict[str, Any] = {CARDIAC_NAMES[c]: {} for c in (LV, MYO, RV)}
    for phase, (lab, case) in pairs.items():
        vols = structure_volumes_ml(lab, case.spacing, (LV, MYO, RV)) if known else {}
        for c in (LV, MYO, RV):
            entry = structures[CARDIAC_NAMES[c]]
            entry[f"{phase}_voxels"] = int((lab == c).sum())
            entry[f"{phase}_volume"] = vols.get(c)
            entry[f"{phase}_components"] = int(ndimage.label(lab == c, structure=STRUCTURE_3D)[1])
    for name, entry in structures.items():
        entry["flags"] = [f for f in flags if f.startswith(name + " ")]
    out = {k: v for k, v in fn.items() if k != "flags"}
    out.update(flags=flags, mass_units="g" if known else None, ef_units="%", structures=structures)
    for phase, (_, case) in pairs.items():
        out[phase] = {"name": case.case_id, "shape_zyx": list(case.shape), "spacing": [float(v) for v in case.spacing]}
    return json_safe(out)


# ----------------------------------------------------------------------------- client
def post_volumes(endpoint: str, inputs: Union[str, Path], out_dir: Union[str, Path],
                 timeout: float = 300.0) -> List[Dict[str, Any]]:
    """Segment volumes on a running service: POST each to ``/v1/segment``, write the masks.

    Args:
        endpoint: Base URL of the service (``http://127.0.0.1:8000``).
        inputs: A ``.nii``/``.nii.gz`` file or a folder of them.
        out_dir: Where ``<stem>_seg.nii.gz`` masks are written.
        timeout: Seconds per request.

    Returns:
        One row per input: ``input``, ``output``, ``empty`` and voxels per structure.

    Raises:
        DataError: missing inputs or a file that is not NIfTI.
        EndpointError: the server is unreachable or answered an error (its message quoted).
    """
    import httpx

    from robustseg.data.io import split_suffix
    from robustseg.engine.predict import list_inputs

    files = list_inputs(inputs)
    for f in files:
        if not f.name.lower().endswith((".nii", ".nii.gz")):
            raise DataError(f, "only NIfTI (.nii, .nii.gz) volumes can be sent to a segmentation endpoint")
    url = endpoint.rstrip("/") + "/v1/segment"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with httpx.Client(timeout=timeout) as client:
        for f in files:
            try:
                resp = client.post(url, files={"file": (f.name, f.read_bytes(), "application/octet-stream")})
            except httpx.HTTPError as e:
                raise EndpointError(f"{url}: cannot reach the service ({type(e).__name__}: {e}); "
                                    "is `robustseg serve` running there?") from None
            if resp.status_code >= 400:
                raise EndpointError(f"{url}: HTTP {resp.status_code} for {f}: {_server_message(resp)}")
            target = out / f"{split_suffix(f.name)[0]}_seg.nii.gz"  # the input's own stem, as `predict`
            tmp = target.with_name(f".tmp{os.getpid()}_{target.name}")
            tmp.write_bytes(resp.content)
            os.replace(tmp, target)  # never half a mask under the real name
            voxels = json.loads(resp.headers.get("x-robustseg-voxels", "{}"))
            rows.append({"input": str(f), "output": str(target), "empty": not any(voxels.values()), **voxels})
    return rows


def _server_message(resp: Any) -> str:
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):  # not our JSON: a proxy's page, say
        return resp.text[:500] or "(empty response)"

