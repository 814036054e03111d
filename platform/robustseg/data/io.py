"""Image IO shared by every source: SimpleITK volumes, Pillow pictures, geometry checks.

Arrays are ``(Z, Y, X)``; geometry is SimpleITK order (spacing and origin ``(x, y, z)``,
direction a row-major 3x3 tuple), as in `robustseg.data.cases`. Every failure is a
`DataError` naming the file: a source never lets a raw ``RuntimeError`` out of ITK.

Every gzip or NIfTI file is checked by `robustseg.data.nifti.check_complete` before ITK reads
it (ITK silently zero-fills truncated data and reads NaN/inf voxels as 0); masks that must
share a scan's exact NIfTI header are written by `write_label_like`.
"""
from __future__ import annotations

import csv
import gzip
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from robustseg.data.cases import IDENTITY_DIRECTION, Case
from robustseg.data.labels import LabelConvention
from robustseg.data.nifti import check_complete, nifti1_label_header
from robustseg.errors import ConfigError, DataError

PathLike = Union[str, "os.PathLike[str]"]

VOLUME_SUFFIXES: Tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
PICTURE_SUFFIXES: Tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Tolerances for "same grid": NIfTI headers store float32 and tools round differently, so
# exact equality would reject pairs that any viewer overlays correctly.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


class Volume(NamedTuple):
    """A 3D array with its geometry; unpacks as ``(array, spacing, origin, direction)``."""

    array: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]

    def geometry(self) -> Dict[str, Any]:
        """Geometry in the same dict form as `Case.geometry` (minus ``spacing_known``)."""
        return {
            "shape_zyx": [int(s) for s in self.array.shape],
            "spacing": [float(s) for s in self.spacing],
            "origin": [float(o) for o in self.origin],
            "direction": [float(d) for d in self.direction],
        }


def read_image(
    path: PathLike, *, allow_2d: bool = False, frame: Optional[int] = None, dtype: Any = np.float32
) -> Volume:
    """Read a 3D image volume with its geometry.

    Args:
        path: NIfTI (``.nii``/``.nii.gz``), MetaImage or NRRD file.
        allow_2d: Promote a 2D image to Z = 1 (spacing z 1 mm, origin z 0) instead of failing.
        frame: Index of the volume to take from a 4D file (0-based). Required for 4D files
            with more than one volume; an error for 3D files.
        dtype: Output dtype; ``None`` keeps the stored one (labels).

    Returns:
        `Volume` with the ``(Z, Y, X)`` array.

    Raises:
        DataError: missing, unreadable or truncated file, wrong dimensionality, vector voxels.
    """
    where = str(path)
    image = _read_sitk(where, allow_2d=allow_2d, frame=frame)
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:
        array = array[np.newaxis]
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    spacing, origin, direction = _geometry3(image)
    return Volume(array, spacing, origin, direction)


def read_label(path: PathLike, *, allow_2d: bool = False, frame: Optional[int] = None) -> Volume:
    """`read_image` keeping the stored dtype (M&Ms stores float64 labels)."""
    return read_image(path, allow_2d=allow_2d, frame=frame, dtype=None)


def read_pair(
    image_path: PathLike,
    label_path: Optional[PathLike],
    convention: LabelConvention,
    *,
    frame: Optional[int] = None,
    allow_2d: bool = False,
    binary: bool = False,
) -> Tuple[Volume, Optional[np.ndarray]]:
    """Read an image and its label, check they share a grid, and remap the label.

    Args:
        image_path: Image file.
        label_path: Label file, or None for an unlabelled image.
        convention: How the stored label values map to canonical ones.
        frame: Volume index for 4D files (both files use the same index).
        allow_2d: As in `read_image`.
        binary: Map every non-zero stored value to 1 before the convention (a binary task
            read from multi-class masks).

    Returns:
        The image `Volume` (float32) and the canonical uint8 label (or None).

    Raises:
        DataError: naming the file at fault, for read errors, a geometry mismatch between
            image and label, or label values the convention does not know.
    """
    image = read_image(image_path, allow_2d=allow_2d, frame=frame)
    if label_path is None:
        return image, None
    label = read_label(label_path, allow_2d=allow_2d, frame=frame)
    check_same_geometry(image, label, label_path, what=f"image {image_path} and this label")
    values = label.array
    if binary:
        # NaN stays NaN so the convention still reports it instead of calling it foreground.
        values = np.where(np.isfinite(values) & (values != 0), 1, values)
    return image, convention.to_canonical(values, where=str(label_path))


def check_same_geometry(a: Any, b: Any, where: object, *, what: str = "image and label") -> None:
    """Raise unless two grids match: shape, spacing, origin and direction.

    Args:
        a: A `Volume`, a `Case`, or a geometry dict (``shape_zyx``, ``spacing``, ``origin``,
            ``direction``); missing dict keys are not compared.
        b: The same for the other grid.
        where: File named in the error (usually the label).
        what: How the two are described in the message.

    Raises:
        DataError: listing every mismatching property with both values.
    """
    ga, gb = _as_geometry(a), _as_geometry(b)
    problems = []
    if "shape_zyx" in ga and "shape_zyx" in gb and list(ga["shape_zyx"]) != list(gb["shape_zyx"]):
        problems.append(f"shape (Z, Y, X) {tuple(ga['shape_zyx'])} vs {tuple(gb['shape_zyx'])}")
    tolerances = {"spacing": (SPACING_RTOL, 0.0), "origin": (0.0, ORIGIN_ATOL_MM), "direction": (0.0, DIRECTION_ATOL)}
    for key, (rtol, atol) in tolerances.items():
        if key in ga and key in gb:
            x, y = np.asarray(ga[key], float), np.asarray(gb[key], float)
            if x.shape != y.shape or not np.allclose(x, y, rtol=rtol, atol=atol):
                problems.append(f"{key} {_fmt(x)} vs {_fmt(y)}")
    if problems:
        raise DataError(where, f"{what} are on different grids: " + "; ".join(problems))


def write_image(
    array: np.ndarray,
    path: PathLike,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = IDENTITY_DIRECTION,
    *,
    compress: bool = True,
) -> None:
    """Write a ``(Z, Y, X)`` array with its geometry; the file appears atomically.

    Args:
        array: 3D array (bool is stored as uint8, float16 as float32).
        path: Output file; the extension picks the format; parent folders are created.
        spacing: Voxel size ``(x, y, z)`` in mm.
        origin: World position of voxel 0 ``(x, y, z)``.
        direction: Row-major 3x3 direction cosines.
        compress: Compress when the format allows (``.nii.gz`` always is).

    Raises:
        DataError: wrong dimensionality or the file could not be written.
    """
    where = str(path)
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise DataError(where, f"can only write 3D (Z, Y, X) arrays, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in direction])
    target = Path(where)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target under a name with the same extension (ITK picks the format
    # from it), then rename: a killed worker never leaves half a volume under the real name.
    # Detached headers (.mhd/.nhdr) name their data file, so those are written in place.
    detached = target.name.lower().endswith((".mhd", ".nhdr"))
    tmp = target if detached else target.with_name(f".tmp{os.getpid()}_{target.name}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        if not detached:
            os.replace(tmp, target)
    except (RuntimeError, OSError) as exc:
        if not detached:
            tmp.unlink(missing_ok=True)
        raise DataError(where, f"cannot write image: {_itk_reason(exc)}") from None


def write_with_geometry(array: np.ndarray, path: PathLike, geometry: Any, *, compress: bool = True) -> None:
    """Write an array on the grid of a `Case`, a `Volume` or a geometry dict.

    Args:
        array: 3D array; must match ``shape_zyx`` when the geometry records one.
        path: Output file.
        geometry: Anything `check_same_geometry` accepts (e.g. ``case.geometry()``).
        compress: As in `write_image`.

    Raises:
        DataError: shape differs from the recorded one, or the write failed.
    """
    geom = _as_geometry(geometry)
    shape = tuple(np.shape(array))
    if "shape_zyx" in geom and tuple(geom["shape_zyx"]) != shape:
        raise DataError(path, f"array shape {shape} differs from the geometry's {tuple(geom['shape_zyx'])}")
    write_image(array, path, geom["spacing"], geom["origin"], geom["direction"], compress=compress)


def count_volumes(path: PathLike) -> int:
    """Number of 3D volumes in a file (the 4th dimension of a 4D cine; 1 for a 3D file)."""
    reader = _info_reader(str(path))
    return int(reader.GetSize()[3]) if reader.GetDimension() == 4 else 1


def read_picture(path: PathLike, *, mask: bool = False) -> np.ndarray:
    """Read a 2D picture (PNG, JPEG, ...) as a ``(H, W)`` array with Pillow.

    Args:
        path: Picture file.
        mask: Read stored values as labels: palette images keep their indices and colour
            masks must be grey (equal channels). Otherwise colour images become grey (luma).

    Returns:
        float32 array for images, the stored integer dtype for masks.

    Raises:
        DataError: missing, unreadable or truncated file; a colour mask.
    """
    from PIL import Image  # Pillow is only needed by 2D sources.

    where = str(path)
    if not os.path.isfile(where):
        raise DataError(where, "file not found")
    try:
        with Image.open(where) as pic:
            pic.load()  # decode now: a truncated JPEG fails here, not later as a short array
            mode = pic.mode
            if mask and mode in ("RGB", "RGBA", "LA"):
                arr = np.asarray(pic.convert("RGB"))
                if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
                    raise DataError(where, f"mask is a colour ({mode}) picture; expected grey or palette values")
                arr = arr[..., 0]
            elif mask or mode in ("L", "I", "I;16", "F"):
                arr = np.asarray(pic)
            else:
                arr = np.asarray(pic.convert("L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(where, f"cannot read picture: {exc}") from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.ndim != 2:
        raise DataError(where, f"expected a single-channel 2D picture, got shape {arr.shape}")
    return arr if mask else arr.astype(np.float32)


def split_suffix(name: str, suffixes: Sequence[str] = VOLUME_SUFFIXES) -> Tuple[str, str]:
    """Split ``"x.nii.gz"`` into ``("x", ".nii.gz")``; ``("", "")`` if no suffix matches."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return "", ""


# --- helpers shared by the source modules ------------------------------------------------


def volume_case(image: Volume, label: Optional[np.ndarray], **fields: Any) -> Case:
    """A `Case` on the grid of a volume read from a file with real geometry.

    Args:
        image: The image `Volume`.
        label: Canonical label array or None.
        **fields: The other `Case` fields (case_id, subject_id, dataset, ...).
    """
    return Case(
        image=image.array, label=label, spacing=image.spacing, origin=image.origin,
        direction=image.direction, spacing_known=True, **fields,
    )


def picture_case(picture: np.ndarray, label: Optional[np.ndarray], **fields: Any) -> Case:
    """A Z = 1 `Case` for a 2D picture.

    PNG/JPEG slices keep no spacing, so it is (1, 1, 1) and marked unknown; the picture's
    ``(H, W)`` is recorded as ``meta["original_size"]``.

    Args:
        picture: ``(H, W)`` image.
        label: ``(H, W)`` canonical label or None.
        **fields: The other `Case` fields (``meta`` is extended, not replaced).
    """
    meta = dict(fields.pop("meta", None) or {})
    meta.setdefault("original_size", [int(s) for s in picture.shape])
    return Case(
        image=picture[np.newaxis], label=None if label is None else label[np.newaxis],
        spacing=(1.0, 1.0, 1.0), spacing_known=False, meta=meta, **fields,
    )


def find_nifti(folder: Path, stem: str) -> Optional[Path]:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists, else None."""
    for suffix in (".nii.gz", ".nii"):
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    return None


def require_dir(path: PathLike) -> Path:
    """The path as a `Path`, or a `DataError` if it is not an existing folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(folder, "folder not found" if not folder.exists() else "is not a folder")
    return folder


def natural_key(name: str) -> Tuple[Any, ...]:
    """Sort key that orders ``2.jpg`` before ``10.jpg``."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name))


def list_files(folder: Path, suffixes: Sequence[str]) -> List[Path]:
    """Files in ``folder`` (not recursive, hidden ones skipped) with a suffix, naturally sorted."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted((p for p in files if split_suffix(p.name, suffixes)[1]), key=lambda p: natural_key(p.name))


def files_by_stem(folder: Path, suffixes: Sequence[str]) -> Dict[str, Path]:
    """`list_files` keyed by name without suffix, in natural order.

    Raises:
        DataError: two files share a stem (``1.jpg`` and ``1.png``): which one is meant?
    """
    out: Dict[str, Path] = {}
    for file in list_files(folder, suffixes):
        stem = split_suffix(file.name, suffixes)[0]
        if stem in out:
            raise DataError(file, f"two files named {stem!r} in one folder (also {out[stem].name})")
        out[stem] = file
    return out


def reject_orphan_masks(masks: Mapping[str, Path], images: Mapping[str, Path], image_dir: Path) -> None:
    """Fail on a mask whose image is missing: a renamed or lost image must not go unnoticed."""
    orphans = [stem for stem in masks if stem not in images]
    if orphans:
        raise DataError(masks[orphans[0]], f"mask has no matching image in {image_dir} ({len(orphans)} orphan(s))")


def read_table(path: PathLike) -> Tuple[List[str], List[Dict[str, str]]]:
    """Read a CSV file with a header row (comma or semicolon separated).

    Returns:
        The header and the rows as dicts with whitespace-stripped values.

    Raises:
        DataError: missing, unreadable or empty file.
    """
    where = str(path)
    try:
        with open(where, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(where, f"cannot read table: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:  # one column, or nothing to sniff: plain commas
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    header = [h.strip() for h in (reader.fieldnames or [])]
    # Extra cells (key None) and missing cells (value None) are dropped / read as "".
    rows = [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)} for row in reader]
    if not header or not rows:
        raise DataError(where, "table is empty (expected a header row and at least one row)")
    return header, rows


def find_column(header: Iterable[str], candidates: Sequence[str], where: object) -> str:
    """The first header entry equal (case-insensitively) to one of ``candidates``."""
    by_lower = {h.lower(): h for h in header}
    for cand in candidates:
        if cand.lower() in by_lower:
            return by_lower[cand.lower()]
    raise DataError(where, f"no column named any of {list(candidates)}; columns are {list(header)}")


def opt_bool(value: Any, name: str) -> bool:
    """Coerce a (possibly CLI string) option to bool."""
    text = str(value).strip().lower()
    if text not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise ConfigError(f"source option {name}={value!r}: expected true/false")
    return text in ("1", "true", "yes", "on")


def opt_int(value: Any, name: str, *, minimum: int = 0) -> Optional[int]:
    """Coerce an optional integer option (None stays None)."""
    if value is None or value == "":
        return None
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"source option {name}={value!r}: expected an integer") from None
    if number < minimum:
        raise ConfigError(f"source option {name}={value!r}: must be >= {minimum}")
    return number


def opt_floats(value: Any, name: str, n: int = 3) -> Optional[Tuple[float, ...]]:
    """Coerce ``"1.5,1.5,10"`` or a sequence to ``n`` positive floats (None stays None)."""
    if value is None or value == "":
        return None
    try:
        parts = value.strip("()[] ").split(",") if isinstance(value, str) else list(value)
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != n or not all(np.isfinite(x) and x > 0 for x in numbers):
        raise ConfigError(f"source option {name}={value!r}: expected {n} positive numbers like '1.5,1.5,10'")
    return numbers


def opt_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Coerce an option that must be one of ``choices`` (matched case-insensitively)."""
    for choice in choices:
        if str(value).strip().lower() == choice.lower():
            return choice
    raise ConfigError(f"source option {name}={value!r}: expected one of {list(choices)}")


def reject_unknown(source: str, options: Mapping[str, Any], valid: Sequence[str]) -> None:
    """Fail on options a source does not take, listing the ones it does."""
    if options:
        raise ConfigError(f"source {source!r} got unknown option(s) {sorted(options)}; valid: {sorted(valid)}")


# --- internals ---------------------------------------------------------------------------


def _info_reader(where: str) -> sitk.ImageFileReader:
    if not os.path.isfile(where):
        raise DataError(where, "file not found")
    check_complete(where)
    reader = sitk.ImageFileReader()
    reader.SetFileName(where)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(where, f"cannot read image header: {_itk_reason(exc)}") from None
    return reader


def _read_sitk(where: str, *, allow_2d: bool, frame: Optional[int]) -> sitk.Image:
    reader = _info_reader(where)
    dim, size = reader.GetDimension(), tuple(reader.GetSize())
    if reader.GetNumberOfComponents() != 1:
        raise DataError(where, f"has {reader.GetNumberOfComponents()} components per voxel; expected a scalar image")
    if dim == 4:
        n = size[3]
        if frame is None and n != 1:
            raise DataError(
                where,
                f"is 4D with {n} volumes of size {size[:3]} (x, y, z); expected a 3D volume "
                "(sources that know about 4D cine pick the ED/ES frames)",
            )
        index = 0 if frame is None else int(frame)
        if not 0 <= index < n:
            raise DataError(where, f"frame {index} is out of range: the 4D file has {n} volumes (0..{n - 1})")
        # Streamed extraction: only the requested volume is decoded into memory.
        reader.SetExtractIndex([0, 0, 0, index])
        reader.SetExtractSize([size[0], size[1], size[2], 0])
    elif frame is not None:
        raise DataError(where, f"frame {frame} was requested but the image is {dim}D, not a 4D cine")
    elif dim == 2 and not allow_2d:
        raise DataError(where, f"is a 2D image of size {size} (x, y); expected a 3D volume")
    elif dim not in (2, 3):
        raise DataError(where, f"has {dim} dimensions {size}; expected a 3D volume")
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise DataError(where, f"cannot read image data: {_itk_reason(exc)}") from None


def _geometry3(image: sitk.Image) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    spacing = tuple(float(s) for s in image.GetSpacing())
    origin = tuple(float(o) for o in image.GetOrigin())
    direction = tuple(float(d) for d in image.GetDirection())
    if image.GetDimension() == 2:
        d = direction
        return spacing + (1.0,), origin + (0.0,), (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0)
    return spacing, origin, direction


def _as_geometry(obj: Any) -> Mapping[str, Any]:
    if callable(getattr(obj, "geometry", None)):
        return obj.geometry()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"expected a Volume, a Case or a geometry dict, got {type(obj).__name__}")


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values.ravel()) + ")"


def _itk_reason(exc: BaseException) -> str:
    # ITK messages start with C++ source locations; the last non-empty line says what failed.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def write_label_like(array: np.ndarray, path: PathLike, reference: PathLike, geometry: Any) -> None:
    """Write a uint8 label map that occupies exactly the physical space of ``reference``.

    ITK turns a NIfTI sform into orthonormal direction cosines on reading and writes new
    sform/qform from them, so a mask written from the read geometry differs from its scan by
    ~1e-5 and ITK then refuses to combine the two (its default tolerance is 1e-6). When both
    files are single-file NIfTI-1, the scan's own header (sform, qform, pixdim, units) is
    copied instead, with only the data type, scaling and dimensions changed, so any reader
    derives bit-identical geometry for both. Otherwise this is `robustseg.data.io.write_with_geometry`.

    Args:
        array: ``(Z, Y, X)`` labels in 0..255 on the reference's voxel grid.
        path: Output file (``.nii``/``.nii.gz`` to use the header copy).
        reference: The scan the labels belong to.
        geometry: Its geometry (`Case.geometry()`), used when the header cannot be copied.

    Raises:
        DataError: labels outside 0..255, a shape that differs from the reference, or the
            file could not be written.
    """
    arr = np.asarray(array)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(path, f"label values {arr.min()}..{arr.max()} do not fit a uint8 label map")
    nifti = (".nii", ".nii.gz")
    header = None
    if str(path).lower().endswith(nifti) and str(reference).lower().endswith(nifti) and arr.ndim == 3:
        header = nifti1_label_header(str(reference), arr.shape)
    if header is None:
        write_with_geometry(arr.astype(np.uint8), path, geometry)
        return
    target = Path(path)
    tmp = target.with_name(f".tmp{os.getpid()}_{target.name}")
    payload = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()  # C order: x varies fastest
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.name.lower().endswith(".gz"):
            with gzip.open(tmp, "wb", compresslevel=6) as fh:
                fh.write(payload)
        else:
            tmp.write_bytes(payload)
        os.replace(tmp, target)  # atomic: never half a mask under the real name
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(path, f"cannot write label map: {exc.strerror or exc}") from None
