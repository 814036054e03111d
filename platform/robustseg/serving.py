"""Request logic of the segmentation service, free of Ray and of any web framework.

`deploy/serve_app.py` wraps these functions in a Ray Serve deployment; everything here runs
in a plain process, so it is unit-tested without starting Ray:

* `case_from_upload`: request bytes -> a validated `Case`, or a `RequestError` carrying the
  HTTP status (413 over a limit, 400 otherwise) and a message naming the upload; its memory
  is bounded by `robustseg.serve_limits` (header-priced decode, bounded gunzip) and label
  maps are refused unless forced;
* `mask_to_nifti_bytes`, `cardiac_json` and `public_model_info`: predictions and model
  metadata -> response bodies (no server paths);
* `post_volumes`: the client behind ``robustseg predict --endpoint URL``.

Settings and errors live in `robustseg.serve_settings` (light: the CLI parser imports them),
memory limits in `robustseg.serve_limits`; both are re-exported here.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from robustseg.analysis.clinical import cardiac_function, structure_volumes_ml
from robustseg.data.cases import Case
from robustseg.data.guards import label_map_reason
from robustseg.data.labels import CARDIAC_NAMES, LV, MYO, RV
from robustseg.engine.postprocess import STRUCTURE_3D
from robustseg.errors import DataError, RobustsegError
from robustseg.serve_limits import (GZIP_MAGIC, ByteBudget, NiftiHeader, Reservation, decode_cost,  # noqa: F401
                                    HTTP_FORCE_HINT, gunzip_bounded, inspect_upload, nifti_dims, nifti_header,
                                    release_free_memory)
from robustseg.serve_settings import (DEFAULT_ADMISSION_WAIT_S, DEFAULT_MAX_DECODED_MB,  # noqa: F401
                                      DEFAULT_MAX_INFLIGHT_MB, DEFAULT_MAX_UPLOAD_MB, DEFAULT_MAX_VOXELS,
                                      ENV_MAX_DECODED_MB, ENV_MAX_INFLIGHT_MB, ENV_MAX_UPLOAD_MB, ENV_MODEL_URI,
                                      ENV_TRACKING_URI, ModelLoadError, RequestError, ServeSettings,
                                      ServeStartError, check_port_free, port_error, settings_from)

#: Header keys that describe the stored intensities, not the grid: they must not be copied
#: from an image onto its uint8 mask.
_INTENSITY_KEYS = {"bitpix", "datatype", "scl_slope", "scl_inter", "cal_min", "cal_max", "vox_offset"}


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


def case_from_upload(data: bytes, filename: str, task: str, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                     max_voxels: int = DEFAULT_MAX_VOXELS, max_decoded_mb: float = DEFAULT_MAX_DECODED_MB,
                     force: bool = False) -> Case:
    """Read and validate an uploaded NIfTI volume, its memory bounded by the header's limits.

    Args:
        data: The file's bytes (``.nii`` or ``.nii.gz``; gzip is recognised by its magic
            bytes, not by the name).
        filename: The name the client gave; errors say ``upload '<filename>': ...``.
        task: The model's task (sets the case's modality).
        max_upload_mb: Size limit of ``data``.
        max_voxels: Voxel-count limit from the header.
        max_decoded_mb: Decoded-bytes limit from the header (dtype itemsize x voxels).
        force: Segment a ground-truth label map anyway (by name or by its values).

    Returns:
        The case (original geometry; the header's metadata in ``meta["nifti_header"]``).

    Raises:
        RequestError: 413 over a limit; 400 for an empty upload, not a NIfTI, a truncated
            or corrupt file, wrong dimensionality, NaN/inf voxels, a constant volume, or a
            label map (its name, or voxels that hold only label values) unless ``force``.
    """
    from robustseg.engine.predict import read_input  # torch-heavy: only when serving

    header = inspect_upload(data, filename, max_upload_mb=max_upload_mb, max_voxels=max_voxels,
                            max_decoded_mb=max_decoded_mb, force=force)
    where = f"upload {filename!r}"
    with tempfile.TemporaryDirectory(prefix="robustseg_upload_") as tmp:
        # Always an uncompressed .nii on disk: gzip is inflated here, within the header's bound,
        # instead of by the reader, which would inflate whatever the stream holds.
        path = Path(tmp) / (safe_stem(filename) + ".nii")
        with open(path, "wb") as fh:
            if data[:2] == GZIP_MAGIC:
                gunzip_bounded(data, fh, header.file_bytes, where)
            else:
                fh.write(data)
        try:
            case = read_input(path, task)
        except DataError as e:
            # The temporary path means nothing to the client: name what they sent instead.
            problem = e.problem.replace(str(path), filename).replace(tmp, "")
            raise RequestError(400, f"{where}: {problem}") from None
        case.meta["nifti_header"] = _header_metadata(path)
    reason = None if force else label_map_reason(None, case.image, hint=HTTP_FORCE_HINT)
    if reason:
        raise RequestError(400, f"{where}: looks like a ground-truth label map, not a scan: {reason}")
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


_SQLITE = re.compile(r"^(sqlite:/{2,3})(/.*)$")


def public_path(value: str, root: Optional[str] = None) -> str:
    """A path or URI as it may be shown to clients: no absolute server path.

    A local absolute path (or ``file://``/``sqlite:///`` URI) becomes its path relative to
    ``root`` when under it, else its file name; other strings (``models:/``, ``s3://``,
    names) are kept.

    Args:
        value: The string.
        root: The served model's folder, if it is one.
    """
    match = _SQLITE.match(value)
    if match:
        return match.group(1) + public_path(match.group(2), root)
    path = value[len("file://"):] if value.startswith("file://") else value
    for flavour in (PurePosixPath, PureWindowsPath):
        p = flavour(path)
        if p.is_absolute() and (flavour is PurePosixPath or p.drive):
            if root:
                try:
                    rel = p.relative_to(flavour(root)).as_posix()
                    return flavour(root).name if rel == "." else rel  # the folder itself: its name
                except ValueError:
                    pass
            return p.name or "."
    return value


def public_model_info(obj: Any, root: Optional[str] = None) -> Any:
    """A copy of model metadata (``/v1/model``) with every path made public by `public_path`.

    Args:
        obj: Nested dicts/lists of metadata.
        root: The served model's folder, if it is one.
    """
    if isinstance(obj, Mapping):
        return {k: public_model_info(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [public_model_info(v, root) for v in obj]
    return public_path(obj, root) if isinstance(obj, str) else obj


# ----------------------------------------------------------------------------- client
def post_volumes(endpoint: str, inputs: Union[str, Path], out_dir: Union[str, Path],
                 timeout: float = 300.0, *, force: bool = False, fail_fast: bool = False) -> List[Dict[str, Any]]:
    """Segment volumes on a running service: POST each to ``/v1/segment``, write the masks.

    Behaves as ``robustseg predict`` with a model: label maps are skipped (by name before
    sending; by values when the service refuses them), and one bad file does not stop the batch.

    Args:
        endpoint: Base URL of the service (``http://127.0.0.1:8000``).
        inputs: A ``.nii``/``.nii.gz`` file or a folder of them.
        out_dir: Where ``<stem>_seg.nii.gz`` masks are written.
        timeout: Seconds per request.
        force: Send label maps too (``?force=true``).
        fail_fast: Raise at the first input the service refuses (default: record and go on).

    Returns:
        A `robustseg.engine.predict.PredictionRows`: one row per mask (``input``, ``output``,
        ``empty``, voxels per structure) with ``skipped`` and ``failed`` inputs.

    Raises:
        DataError: missing inputs or a file that is not NIfTI.
        EndpointError: the server is unreachable, or (``fail_fast``) refused an input.
    """
    import httpx

    from robustseg.engine.predict import PredictionRows, list_inputs

    files = list_inputs(inputs)
    for f in files:
        if not f.name.lower().endswith((".nii", ".nii.gz")):
            raise DataError(f, "only NIfTI (.nii, .nii.gz) volumes can be sent to a segmentation endpoint")
    url = endpoint.rstrip("/") + "/v1/segment"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = PredictionRows()
    with httpx.Client(timeout=timeout) as client:
        for f in files:
            reason = None if force else label_map_reason(f.name)
            if reason:
                rows.skipped.append({"input": str(f), "reason": reason})
                continue
            try:
                resp = client.post(url, params={"force": "true"} if force else None,
                                   files={"file": (f.name, f.read_bytes(), "application/octet-stream")})
            except httpx.HTTPError as e:
                raise EndpointError(f"{url}: cannot reach the service ({type(e).__name__}: {e}); "
                                    "is `robustseg serve` running there?") from None
            if resp.status_code >= 400:
                message = _server_message(resp)
                if resp.status_code == 400 and "label map" in message and not fail_fast:
                    rows.skipped.append({"input": str(f), "reason": message})
                    continue
                if fail_fast:
                    raise EndpointError(f"{url}: HTTP {resp.status_code} for {f}: {message}")
                rows.failed.append({"input": str(f), "reason": f"HTTP {resp.status_code}: {message}"})
                continue
            rows.append(_write_mask(resp, f, out))
    return rows


def _write_mask(resp: Any, source: Path, out: Path) -> Dict[str, Any]:
    """Write one answered mask atomically under the input's own stem (as `predict`)."""
    from robustseg.data.io import split_suffix

    target = out / f"{split_suffix(source.name)[0]}_seg.nii.gz"
    tmp = target.with_name(f".tmp{os.getpid()}_{target.name}")
    tmp.write_bytes(resp.content)
    os.replace(tmp, target)  # never half a mask under the real name
    voxels = json.loads(resp.headers.get("x-robustseg-voxels", "{}"))
    return {"input": str(source), "output": str(target), "empty": not any(voxels.values()), **voxels}


def _server_message(resp: Any) -> str:
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):  # not our JSON: a proxy's page, say
        return resp.text[:500] or "(empty response)"

