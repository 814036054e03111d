"""NIfTI-1/2 byte-level code: completeness checks on read, header-copying label writes.

ITK reads a truncated ``.nii`` or ``.nii.gz`` without complaint (the missing voxels come back
as zeros or garbage) and silently turns NaN/inf voxels into 0, so `robustseg.data.io` has every
gzip or NIfTI file streamed once by `check_complete` before ITK sees it: size checked against
the header, float voxels checked for NaN/inf, gzip CRC verified.

`write_label_like` writes a mask whose header is the scan's own, so both files give any reader
bit-identical geometry.
"""
from __future__ import annotations

import gzip
import itertools
import os
import struct
import zlib
from typing import Any, NamedTuple, Optional, Tuple, Union

import numpy as np

from robustseg.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]


class NiftiLayout(NamedTuple):
    """Where a single-file NIfTI's voxels lie: bytes ``start`` to ``end`` of the (unzipped) file."""

    start: int  # first voxel byte
    end: int  # one past the last voxel byte
    dtype: Optional[np.dtype]  # set for float data, whose NaN/inf must be counted


def check_complete(where: str) -> None:
    """Stream a gzip or NIfTI file once, failing where ITK would read it without error.

    ITK zero-fills truncated NIfTI data, replaces NaN/inf voxels by 0 and ignores gzip CRC
    errors; each of those would silently change the data, so each is a `DataError` here.
    Other files are not read.

    Args:
        where: The file (``.nii``, ``.nii.gz`` or any other ``.gz``).

    Raises:
        DataError: corrupt or truncated gzip data, a NIfTI shorter than its header says, or
            NaN/inf float voxels.
    """
    lower = where.lower()
    is_nifti = lower.endswith((".nii", ".nii.gz"))
    if not (is_nifti or lower.endswith(".gz")):
        return
    opener: Any = gzip.open if lower.endswith(".gz") else open
    total, bad, carry = 0, 0, b""
    layout: Optional[NiftiLayout] = None
    try:
        with opener(where, "rb") as fh:
            head = fh.read(544)
            layout = nifti_layout(head) if is_nifti else None
            for chunk in itertools.chain([head], iter(lambda: fh.read(1 << 20), b"")):
                if layout is not None and layout.dtype is not None:
                    lo, hi = max(layout.start - total, 0), min(layout.end - total, len(chunk))
                    if hi > lo:
                        carry += chunk[lo:hi]
                        n = len(carry) - len(carry) % layout.dtype.itemsize
                        bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(carry[:n], layout.dtype))))
                        carry = carry[n:]
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        kind = "corrupt or truncated gzip data" if lower.endswith(".gz") else "cannot read file"
        raise DataError(where, f"{kind} ({exc})") from None
    if layout is not None and total < layout.end:
        raise DataError(where, f"truncated NIfTI file: {total} bytes of data, the header needs {layout.end}")
    if bad:
        raise DataError(where, f"contains {bad} NaN or infinite voxel values (ITK would read them as 0)")


def nifti_layout(head: bytes) -> Optional[NiftiLayout]:
    """Where a single-file NIfTI-1/2's voxel data lies, from its header; None if not NIfTI.

    Args:
        head: The first bytes of the (unzipped) file: 348 for NIfTI-1, 540 for NIfTI-2.
    """
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            code, bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            code, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return None
    n_voxels = int(np.prod([max(int(d), 1) for d in dims[1 : dims[0] + 1]], dtype=np.int64))
    floats = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64
    dtype = np.dtype(endian + floats[code]) if code in floats else None
    return NiftiLayout(offset, offset + n_voxels * (bitpix // 8), dtype)


def nifti1_label_header(where: str, shape_zyx: Tuple[int, ...]) -> Optional[bytes]:
    """The 352 bytes heading a uint8 label map on the grid of the NIfTI-1 file ``where``.

    None when ``where`` is not a single-file NIfTI-1 (NIfTI-2, .hdr/.img pairs) or its grid is
    not ``shape_zyx``: the caller then falls back to writing from the read geometry.

    Args:
        where: The scan (``.nii`` or ``.nii.gz``).
        shape_zyx: The label map's ``(Z, Y, X)`` shape.
    """
    try:
        with (gzip.open if where.lower().endswith(".gz") else open)(where, "rb") as fh:
            head = bytearray(fh.read(348))
    except (EOFError, OSError, zlib.error):
        return None
    endian = next((e for e in "<>" if len(head) == 348 and struct.unpack(e + "i", head[:4])[0] == 348), None)
    if endian is None or bytes(head[344:348]) != b"n+1\0":
        return None
    dims = struct.unpack(endian + "8h", head[40:56])
    if not 3 <= dims[0] <= 7 or tuple(dims[1:4]) != tuple(shape_zyx[::-1]) or any(d > 1 for d in dims[4:dims[0] + 1]):
        return None
    # Field offsets of the NIfTI-1 header (nifti1.h); geometry fields (pixdim 76, qform/sform
    # 252-328, xyzt_units 123) are left exactly as the scan has them.
    struct.pack_into(endian + "8h", head, 40, 3, *dims[1:4], 1, 1, 1, 1)
    struct.pack_into(endian + "3fh", head, 56, 0.0, 0.0, 0.0, 0)  # intent_p1..3, intent_code: none
    struct.pack_into(endian + "2h", head, 70, 2, 8)  # datatype DT_UINT8, bitpix 8
    struct.pack_into(endian + "3f", head, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    struct.pack_into(endian + "2f", head, 124, 0.0, 0.0)  # cal_max, cal_min: no display window
    struct.pack_into(endian + "2i", head, 140, 0, 0)  # glmax, glmin (unused)
    head[148:228] = b"robustseg label map".ljust(80, b"\0")  # descrip
    head[228:252] = bytes(24)  # aux_file
    return bytes(head) + bytes(4)  # extension flag 0: no extensions, voxels start at 352
