"""Memory limits of the segmentation service: price an upload from its header, inflate it bounded, admit by bytes.

The issue this answers: a 1 MB gzip declaring a 512^3 float64 volume raised a replica to
1.4 GB RSS and kept it. Now, before a voxel is inflated:

* `nifti_header` reads only the (possibly gzipped) header: dimensions, datatype, voxel
  offset; `inspect_upload` refuses with 413 what is over ``max_voxels`` or
  ``max_decoded_mb`` (dtype itemsize x voxels), and with 400 a file named like a label map;
* `gunzip_bounded` inflates at most the bytes the header needs, a chunk at a time, to disk;
* `ByteBudget` admits requests by the memory they hold (`decode_cost`); over budget they
  wait, then get 503 with Retry-After; `release_free_memory` hands freed decode buffers back.

No Ray and no SimpleITK here: `robustseg.serving` decodes, `deploy.serve_app` wires it to HTTP.
"""
from __future__ import annotations

import asyncio
import math
import struct
import zlib
from typing import Any, BinaryIO, NamedTuple, Optional, Tuple

from robustseg.data.guards import label_map_reason
from robustseg.serve_settings import (DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_UPLOAD_MB, DEFAULT_MAX_VOXELS,
                                      RequestError)

# ----------------------------------------------------------------------------- header and decode
GZIP_MAGIC = b"\x1f\x8b"
#: NIfTI datatype code -> bytes per voxel (nifti1.h); anything else is refused before decoding.
NIFTI_ITEMSIZE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                  1536: 16, 1792: 16, 2048: 32, 2304: 4}
#: Largest header + extensions (``vox_offset``) accepted: extensions are metadata, not megabytes.
MAX_VOX_OFFSET = 2**24
#: Output bytes inflated per step: the most decompressed data held in memory at once.
GUNZIP_CHUNK = 2**20


class NiftiHeader(NamedTuple):
    """What a single-file NIfTI-1/2 header declares: enough to price a decode before doing it."""

    dims: Tuple[int, ...]
    datatype: int
    itemsize: int
    vox_offset: int

    @property
    def voxels(self) -> int:
        """Voxel count over every declared dimension (a 0 counts as 1, as readers do)."""
        return math.prod(max(d, 1) for d in self.dims)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded voxels: dtype itemsize x voxels."""
        return self.itemsize * self.voxels

    @property
    def file_bytes(self) -> int:
        """Bytes of the uncompressed file a reader needs: header, extensions and voxels."""
        return self.vox_offset + self.decoded_bytes


def _gunzip_head(data: bytes, where: str) -> bytes:
    if data[:2] != GZIP_MAGIC:
        return data[:544]
    try:
        head = zlib.decompressobj(wbits=31).decompress(data, 544)  # the header only: never the voxels
    except zlib.error as e:
        raise RequestError(400, f"{where}: corrupt gzip data ({e})") from None
    if len(head) < 348:
        raise RequestError(400, f"{where}: truncated gzip data: only {len(head)} bytes of NIfTI header")
    return head


def nifti_header(data: bytes, where: str) -> NiftiHeader:
    """The dimensions, datatype and voxel offset a (possibly gzipped) NIfTI-1/2 header declares.

    Only the header is decompressed, so a gzip bomb is priced before it is inflated.

    Args:
        data: File bytes.
        where: Name for error messages.

    Raises:
        RequestError: 400 when the bytes are not a single-file NIfTI, the header is invalid
            (dimensions, datatype, voxel offset) or the gzip stream breaks inside the header.
    """
    head = _gunzip_head(data, where)
    fields = None
    for e in "<>":
        size = struct.unpack(e + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348 and head[344:348] == b"n+1\0":
            fields = (struct.unpack(e + "8h", head[40:56]), struct.unpack(e + "h", head[70:72])[0],
                      struct.unpack(e + "f", head[108:112])[0], 352)
        elif size == 540 and len(head) >= 540 and head[4:8] == b"n+2\0":
            fields = (struct.unpack(e + "8q", head[16:80]), struct.unpack(e + "h", head[12:14])[0],
                      struct.unpack(e + "q", head[168:176])[0], 544)
    if fields is None:
        raise RequestError(400, f"{where}: not a NIfTI volume (no single-file NIfTI-1/2 header); send .nii or .nii.gz")
    raw_dims, datatype, vox_offset, least_offset = fields
    if not 1 <= raw_dims[0] <= 7:
        raise RequestError(400, f"{where}: invalid NIfTI header (dim[0] = {raw_dims[0]})")
    dims = tuple(int(d) for d in raw_dims[1 : raw_dims[0] + 1])
    if min(dims) < 0:
        raise RequestError(400, f"{where}: invalid NIfTI header (negative dimension in {dims})")
    if datatype not in NIFTI_ITEMSIZE:
        raise RequestError(400, f"{where}: unsupported NIfTI datatype code {datatype}")
    if not (math.isfinite(vox_offset) and vox_offset <= MAX_VOX_OFFSET):
        raise RequestError(400, f"{where}: invalid NIfTI header (vox_offset {vox_offset}, at most {MAX_VOX_OFFSET})")
    return NiftiHeader(dims, int(datatype), NIFTI_ITEMSIZE[datatype], max(int(vox_offset), least_offset))


def nifti_dims(data: bytes, where: str) -> Tuple[int, ...]:
    """The dimensions a (possibly gzipped) single-file NIfTI-1/2 header declares (`nifti_header`)."""
    return nifti_header(data, where).dims


def decode_cost(header: NiftiHeader, upload_bytes: int) -> int:
    """Estimated peak memory of decoding one upload, in bytes: what admission control counts.

    The upload itself, SimpleITK's image and the numpy copy taken of it (2 x the decoded
    bytes), and the float32 working copy every case becomes (4 bytes a voxel).

    Args:
        header: The upload's header (`nifti_header`).
        upload_bytes: Size of the upload as sent.
    """
    return int(upload_bytes) + 2 * header.decoded_bytes + 4 * header.voxels


#: How an HTTP client overrides the label-map guard (`robustseg.data.guards.label_map_reason`).
HTTP_FORCE_HINT = "add ?force=true to the request to segment it anyway"


def inspect_upload(data: bytes, filename: str, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                   max_voxels: int = DEFAULT_MAX_VOXELS, max_decoded_mb: float = DEFAULT_MAX_DECODED_MB,
                   force: bool = False) -> NiftiHeader:
    """The checks of an upload that need no decoding, cheapest first.

    Args:
        data: The file's bytes.
        filename: The name the client gave.
        max_upload_mb: Size limit of ``data``.
        max_voxels: Voxel-count limit from the header.
        max_decoded_mb: Limit on the decoded bytes (dtype itemsize x voxels) from the header.
        force: Accept a file whose name marks a ground-truth label map.

    Returns:
        The header.

    Raises:
        RequestError: 413 over a limit (naming it); 400 for an empty upload, a label-map
            name (`robustseg.data.guards.label_map_reason`) or a bad header.
    """
    where = f"upload {filename!r}"
    if len(data) > int(max_upload_mb * 2**20):
        raise RequestError(413, f"{where}: {len(data) / 2**20:.1f} MB is over the {max_upload_mb:g} MB upload limit")
    if not data:
        raise RequestError(400, f"{where}: empty upload")
    reason = None if force else label_map_reason(filename, hint=HTTP_FORCE_HINT)
    if reason:
        raise RequestError(400, f"{where}: looks like a ground-truth label map, not a scan: {reason}")
    header = nifti_header(data, where)
    if header.voxels > max_voxels:
        raise RequestError(413, f"{where}: {header.voxels} voxels (dims {header.dims}) is over the {max_voxels} "
                                "voxel limit")
    if header.decoded_bytes > int(max_decoded_mb * 2**20):
        raise RequestError(413, f"{where}: decodes to {header.decoded_bytes / 2**20:.1f} MB ({header.itemsize}-byte "
                                f"voxels x {header.voxels}, dims {header.dims}), over the {max_decoded_mb:g} MB "
                                "limit on a decoded volume (max_decoded_mb)")
    return header


def gunzip_bounded(data: bytes, out: BinaryIO, limit: int, where: str) -> int:
    """Inflate gzip ``data`` into ``out``, never more than ``limit`` bytes.

    Output is produced `GUNZIP_CHUNK` bytes at a time and written out, so memory stays at one
    chunk whatever the compression ratio; compressed data beyond ``limit`` output bytes is
    never inflated. Multi-member gzip (bgzip, pigz) is followed member by member.

    Args:
        data: The gzip bytes.
        out: Binary file to write to.
        limit: Most bytes to write (the file size the NIfTI header needs).
        where: Name for error messages.

    Returns:
        Bytes written (fewer than ``limit`` when the stream ends first).

    Raises:
        RequestError: 400 for corrupt gzip data or a stream cut before its end.
    """
    written, src = 0, data
    inflater = zlib.decompressobj(wbits=31)
    try:
        while written < limit:
            pending = len(src)
            chunk = inflater.decompress(src, min(GUNZIP_CHUNK, limit - written))
            out.write(chunk)
            written += len(chunk)
            if inflater.eof:  # a member ended: what follows is the next member or trailing bytes
                src = inflater.unused_data
                if src[:2] != GZIP_MAGIC:
                    break
                inflater = zlib.decompressobj(wbits=31)
                continue
            src = inflater.unconsumed_tail
            if not chunk and (not src or len(src) == pending):  # input used up (or no progress) before the end
                raise RequestError(400, f"{where}: corrupt or truncated gzip data (the stream ends after "
                                        f"{written} bytes)")
    except zlib.error as e:
        raise RequestError(400, f"{where}: corrupt or truncated gzip data ({e})") from None
    return written


# ----------------------------------------------------------------------------- admission
#: Reservations this large are followed by `release_free_memory`.
TRIM_ABOVE_BYTES = 32 * 2**20


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def release_free_memory() -> bool:
    """Return the C allocator's free memory to the system (glibc ``malloc_trim``).

    glibc keeps freed blocks under its mmap threshold (up to 32 MB) in per-thread arenas, so
    a replica that decoded a large upload in a worker thread would otherwise keep that memory
    resident after the request ended (the issue's "and kept it").

    Returns:
        Whether anything was done (False off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


class ByteBudget:
    """Admission control of one replica by the bytes its requests hold in flight.

    Every request takes a `Reservation` and grows it as it learns its size (the body, then the
    decode priced from the header by `decode_cost`); a growth that does not fit waits up to
    ``wait_s`` for other requests to finish, then fails with 503 and a Retry-After. Used from
    one asyncio event loop (the replica's): no locking across threads is needed.

    Args:
        capacity: Bytes that may be held at once.
        wait_s: How long a growth waits for room.
        trim_above: After a reservation of at least this many bytes is released, hand the
            allocator's free memory back to the system (`release_free_memory`); None: never.
    """

    def __init__(self, capacity: int, wait_s: float, trim_above: Optional[int] = TRIM_ABOVE_BYTES) -> None:
        self.capacity = int(capacity)
        self.wait_s = float(wait_s)
        self.trim_above = trim_above
        self.used = 0
        self.peak = 0
        self._room = asyncio.Condition()

    def reservation(self) -> "Reservation":
        """A new, empty reservation (use it as ``async with``: it is released at the end)."""
        return Reservation(self)

    async def _take(self, n: int, what: str) -> None:
        if self.used + n > self.capacity:
            async with self._room:
                try:
                    await asyncio.wait_for(self._room.wait_for(lambda: self.used + n <= self.capacity), self.wait_s)
                except asyncio.TimeoutError:
                    retry = max(1, math.ceil(self.wait_s))
                    raise RequestError(503, f"{what}: the service is busy ({_mb(self.used)} of its "
                                            f"{_mb(self.capacity)} MB in-flight memory budget is taken); "
                                            f"retry in {retry} s", retry_after_s=retry) from None
        self.used += n
        self.peak = max(self.peak, self.used)

    async def _give(self, n: int) -> None:
        async with self._room:
            self.used -= n
            self._room.notify_all()
        if self.trim_above is not None and n >= self.trim_above:
            await asyncio.to_thread(release_free_memory)


class Reservation:
    """The bytes one request holds in a `ByteBudget`."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    async def grow(self, n: int, what: str) -> None:
        """Hold ``n`` more bytes, waiting for room if needed.

        Args:
            n: Bytes to add.
            what: The upload, for messages.

        Raises:
            RequestError: 413 when this request alone would exceed the budget (it could never
                be admitted); 503 with ``retry_after_s`` when no room opened in time.
        """
        if n <= 0:
            return
        if self.held + n > self.budget.capacity:
            raise RequestError(413, f"{what}: needs about {_mb(self.held + n)} MB of memory to decode, over this "
                                    f"replica's {_mb(self.budget.capacity)} MB in-flight budget (max_inflight_mb)")
        await self.budget._take(n, what)
        self.held += n

    async def release(self) -> None:
        """Give every held byte back (idempotent)."""
        held, self.held = self.held, 0
        if held:
            await self.budget._give(held)

    async def __aenter__(self) -> "Reservation":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()
