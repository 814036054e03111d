"""Batched spatial augmentation: rotation, scaling and elastic deformation in one resampling.

Each sample gets its own rotation, scale and displacement field; they are combined into one
sampling grid per sample, and the image (bilinear) and the label (nearest, through the SAME
grid, so labels never take new values) are resampled once. Only the samples that drew at
least one spatial transform are resampled and written back in place (the `Augmenter` hands
in its own copy of the batch); the others stay bit-for-bit unchanged.
Mirroring is separate, by index (exact for labels), and runs last as in nnU-Net.

Geometry conventions (tensor axes ``(H, W)`` in 2D, ``(D, H, W)`` in 3D, D the slice axis):

* The output has the input's shape, or ``out_shape`` when the caller hands in a larger source
  patch: then the output is that source's centre, resampled straight from the source, so a
  rotated or zoomed-out patch shows real image in its corners instead of padding (nnU-Net
  crops an enlarged "initial patch" for the same reason; see `source_margin`).
* A positive in-plane angle turns the content counter-clockwise as displayed with row 0 at
  the top (from +W towards -H), like ``torchvision.transforms.functional.rotate``.
* Rotation is about the patch centre, in pixel units: non-square patches are not sheared.
* A scale factor ``s`` multiplies the sampling coordinates: ``s > 1`` zooms out (objects get
  smaller), as nnU-Net's ``scaling``.
* 3D data is assumed anisotropic: the in-plane angle turns about the slice axis,
  ``out_of_plane_degrees`` (default 0) adds turns about the H and W axes, and the elastic
  field displaces within the plane only.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from robustseg.augment.intensity import bernoulli, on_subset, rand, sync_free, uniform


def _plane_rotation(angle: Tensor, nd: int, i: int, j: int) -> Tensor:
    """Batched rotations ``(N, nd, nd)`` in the plane of tensor axes ``i`` and ``j``.

    In axis order, ``R[i, i] = R[j, j] = cos``, ``R[i, j] = -sin``, ``R[j, i] = sin``: with
    ``(i, j) = (H, W)`` a positive angle maps +W onto -H, i.e. counter-clockwise on screen.
    """
    r = torch.eye(nd, device=angle.device, dtype=angle.dtype).repeat(angle.shape[0], 1, 1)
    c, s = torch.cos(angle), torch.sin(angle)
    r[:, i, i], r[:, j, j], r[:, i, j], r[:, j, i] = c, c, -s, s
    return r


def rotation_matrix(angles: Tensor, nd: int) -> Tensor:
    """Forward rotation ``(N, nd, nd)`` in tensor-axis order from per-sample angles (radians).

    Args:
        angles: ``(N, 1)`` in 2D (in-plane); ``(N, 3)`` in 3D: about D (in-plane), H, W.
        nd: Spatial dimensions, 2 or 3.
    """
    if nd == 2:
        return _plane_rotation(angles[:, 0], 2, 0, 1)
    in_plane = _plane_rotation(angles[:, 0], 3, 1, 2)
    about_h = _plane_rotation(angles[:, 1], 3, 0, 2)
    about_w = _plane_rotation(angles[:, 2], 3, 0, 1)
    return in_plane @ about_h @ about_w


def _normalised_affine(backward: Tensor, shape: Sequence[int], in_shape: Optional[Sequence[int]] = None) -> Tensor:
    """Pixel-space backward matrix (axis order) -> normalised-grid matrix (grid order).

    Normalised coordinate ``u = 2 p / N`` (align_corners=False, p measured from the centre),
    so ``M[i, j] = A[i, j] * N_out_j / N_in_i``; grid_sample orders axes (x=W, y=H, z=D), the
    reverse.
    """
    n = torch.tensor(list(shape), device=backward.device, dtype=backward.dtype)
    n_in = n if in_shape is None else torch.tensor(list(in_shape), device=backward.device, dtype=backward.dtype)
    m = backward * n[None, None, :] / n_in[None, :, None]
    return m.flip(-1).flip(-2)


def centre_starts(in_shape: Sequence[int], out_shape: Sequence[int]) -> Tuple[int, ...]:
    """First index of the centred ``out_shape`` window in ``in_shape``, per axis."""
    return tuple((int(i) - int(o)) // 2 for i, o in zip(in_shape, out_shape))


def centre_crop(x: Tensor, out_shape: Sequence[int]) -> Tensor:
    """The centred ``out_shape`` window of ``x`` ``(B, C, *S)``, as a new contiguous tensor."""
    starts = centre_starts(x.shape[2:], out_shape)
    window = tuple(slice(a, a + int(o)) for a, o in zip(starts, out_shape))
    return x[(slice(None), slice(None), *window)].clone()


def source_margin(rotation: Mapping[str, Any], scaling: Mapping[str, Any], patch: Sequence[int]) -> List[int]:
    """In-plane margin (pixels per side) of a source patch that covers every rotated/zoomed patch.

    nnU-Net's enlarged initial patch: the bounding box of the patch turned by up to
    ``rotation["degrees"]`` and scaled by up to ``max(scaling["range"])``, for the last two
    (in-plane) axes; transforms switched off (p = 0) need no margin.
    """
    h, w = (float(v) for v in patch[-2:])
    span = rotation["degrees"]  # resolved: [lo, hi]; a bare number d means [-d, d]
    span = [span] if isinstance(span, (int, float)) else span
    deg = min(max(abs(float(v)) for v in span), 90.0) if rotation["p"] > 0 else 0.0
    zoom = max(1.0, float(max(scaling["range"]))) if scaling["p"] > 0 else 1.0
    angles = torch.linspace(0.0, math.radians(deg), 91, dtype=torch.float64)
    c, s = angles.cos().abs(), angles.sin().abs()
    ext_h, ext_w = float((h * c + w * s).max()) * zoom, float((w * c + h * s).max()) * zoom
    return [_fft_friendly(int(size), max(0, math.ceil((ext - size) / 2))) for size, ext in ((h, ext_h), (w, ext_w))]


def _fft_friendly(size: int, margin: int) -> int:
    """Grow ``margin`` so that ``size + 2 margin`` is a multiple of 16 (even sizes only).

    Motion runs on the source in k-space: a 2 x 127 = 254 pixel source (a 128 patch's exact
    margin) makes every FFT a prime-length one, about 40x slower than 256.
    """
    if margin == 0 or size % 2:
        return margin
    return (-(-(size + 2 * margin) // 16) * 16 - size) // 2


def _cubic_matrix(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """``(n_in, n_out)`` weights of cubic upsampling (corners aligned) along one axis.

    Bicubic interpolation is separable, so upsampling the coarse field is one small matrix
    product per axis; that is ~20x cheaper on the CPU than ``interpolate(mode="bicubic")``
    on the field and works the same way in 3D (which has no tricubic mode).
    """
    eye = torch.eye(n_in, device=device).reshape(n_in, 1, n_in, 1)
    return F.interpolate(eye, size=(n_out, 1), mode="bicubic", align_corners=True)[:, 0, :, 0]


def _elastic_field(magnitude: Tensor, shape: Sequence[int], control_points: int,
                   g: torch.Generator) -> Tensor:
    """Smooth in-plane displacement ``(N, *S, nd)`` in normalised grid units (grid order).

    Uniform noise in [-1, 1] on a coarse lattice of ``control_points`` per axis, upsampled
    with cubic weights and clamped, so ``magnitude`` (pixels) is the largest displacement.
    """
    nd, n = len(shape), magnitude.shape[0]
    coarse = [max(2, min(control_points, s)) for s in shape]
    field = rand((n, 2, *coarse), g, magnitude.device) * 2 - 1
    for axis, size in enumerate(shape):
        up = _cubic_matrix(coarse[axis], size, field.device)
        field = (field.movedim(2 + axis, -1) @ up).movedim(-1, 2 + axis)
    field = field.clamp(-1, 1) * magnitude.reshape(n, 1, *([1] * nd))
    # Channel 0 displaces W (x), channel 1 displaces H (y); pixels -> normalised units.
    scale = torch.tensor([2.0 / shape[-1], 2.0 / shape[-2]], device=field.device)
    field = field.movedim(1, -1) * scale
    if nd == 3:
        field = torch.cat([field, torch.zeros_like(field[..., :1])], dim=-1)
    return field


def sampling_grid(backward: Tensor, shape: Sequence[int], displacement: Optional[Tensor] = None,
                  in_shape: Optional[Sequence[int]] = None) -> Tensor:
    """Per-sample grid ``(N, *S, nd)`` for ``F.grid_sample`` from pixel-space backward matrices.

    Args:
        backward: ``(N, nd, nd)`` matrices mapping an output pixel offset from the centre
            (tensor-axis order) to the input offset it samples.
        shape: Spatial shape ``S`` of the output.
        displacement: Optional ``(N, *S, nd)`` field in normalised grid units, applied before
            the affine part (deform, then rotate/scale, as nnU-Net).
        in_shape: Spatial shape of the input when it is larger than the output: the output
            centre then maps to the centre of the input's `centre_crop` window.
    """
    nd, n = len(shape), backward.shape[0]
    m = _normalised_affine(backward, shape, in_shape)
    shift = [0.0] * nd  # grid order: the centre window's offset from the input centre, normalised
    if in_shape is not None:
        for c, (a, i, o) in enumerate(zip(centre_starts(in_shape, shape), in_shape, shape)):
            shift[nd - 1 - c] = (2.0 * a + o - i) / i
    # Pixel-centre coordinates per grid component, each shaped to broadcast over (N, *S):
    # the affine part is then a handful of broadcast multiply-adds instead of a bmm with an
    # inner dimension of 2, which is slow on the CPU.
    coords = []
    for c in range(nd):
        axis = nd - 1 - c
        view = [1] * (nd + 1)
        view[1 + axis] = shape[axis]
        v = (torch.arange(shape[axis], device=m.device, dtype=m.dtype) * 2 + 1) / shape[axis] - 1
        coords.append(v.reshape(view) if displacement is None else v.reshape(view) + displacement[..., c])
    out = []
    for c in range(nd):
        terms = [m[:, c, j].reshape(n, *([1] * nd)) * coords[j] for j in range(nd)]
        total = sum(terms[1:], terms[0])
        out.append((total + shift[c] if shift[c] else total).expand(n, *shape))
    return torch.stack(out, dim=-1)


def _resample_image(image: Tensor, grid: Tensor, pad: Any) -> Tensor:
    """Bilinear resampling; ``pad`` is a grid_sample mode, "min" or a constant value."""
    grid = grid.to(image.dtype)
    if pad in ("zeros", "border", "reflection"):
        return F.grid_sample(image, grid, mode="bilinear", padding_mode=pad, align_corners=False)
    dims = tuple(range(2, image.ndim))
    fill = image.amin(dim=dims, keepdim=True) if pad == "min" else image.new_full((*image.shape[:2], *([1] * (image.ndim - 2))), float(pad))
    # Zero padding of (x - fill), then + fill, pads with fill and keeps bilinear weights exact.
    return F.grid_sample(image - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _resample_label(label: Tensor, grid: Tensor) -> Tensor:
    """Nearest resampling with background (0) outside: output values are input values."""
    dtype = torch.float64 if grid.dtype == torch.float64 else torch.float32
    out = F.grid_sample(label.to(dtype), grid.to(dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round().to(label.dtype)


def _angles(cfg: Mapping[str, Any], b: int, nd: int, g: torch.Generator, dev: torch.device) -> Tensor:
    deg = [cfg["degrees"]] + ([cfg["out_of_plane_degrees"]] * 2 if nd == 3 else [])
    cols = [uniform(lo, hi, (b,), g, dev) for lo, hi in deg]
    return torch.stack(cols, dim=1) * (math.pi / 180.0)


def augment_spatial(image: Tensor, label: Tensor, params: Mapping[str, Mapping[str, Any]],
                    g: torch.Generator, info: Dict[str, Tensor],
                    out_shape: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """Rotate, scale and elastically deform each sample through one grid.

    Args:
        image: ``(B, C, *S)`` floating point; the resampled rows are written into it.
        label: ``(B, 1, *S)`` integer; likewise written in place.
        params: Resolved parameters with ``rotation``, ``scaling``, ``elastic`` and ``spatial``.
        g: Generator on the tensors' device.
        info: Receives the ``(B,)`` masks ``rotation``, ``scaling``, ``elastic``.
        out_shape: Output spatial shape when the input is a larger source patch: every sample
            becomes the source's centre window, the transformed ones resampled from the whole
            source (new tensors are returned). None or the input's shape: in place.
    """
    in_shape = tuple(image.shape[2:])
    shape = in_shape if out_shape is None else tuple(min(int(o), i) for o, i in zip(out_shape, in_shape))
    source = (image, label) if shape != in_shape else None
    if source is not None:
        image, label = centre_crop(image, shape), centre_crop(label, shape)
    b, nd, dev = image.shape[0], image.ndim - 2, image.device
    rot, scl, ela = params["rotation"], params["scaling"], params["elastic"]
    do_rot = bernoulli(rot["p"], (b,), g, dev)
    do_scl = bernoulli(scl["p"], (b,), g, dev)
    do_ela = bernoulli(ela["p"], (b,), g, dev)
    info.update(rotation=do_rot, scaling=do_scl, elastic=do_ela)
    if rot["p"] <= 0 and scl["p"] <= 0 and ela["p"] <= 0:
        return image, label
    angles = _angles(rot, b, nd, g, dev) * do_rot[:, None]
    scale = torch.where(do_scl, uniform(*scl["range"], (b,), g, dev), torch.ones(b, device=dev))
    magnitude = torch.where(do_ela, uniform(*ela["max_displacement"], (b,), g, dev), torch.zeros(b, device=dev))

    selected = do_rot | do_scl | do_ela
    blend = sync_free(image)
    idx = torch.arange(b, device=dev) if blend else selected.nonzero().squeeze(1)
    if idx.numel() == 0:
        return image, label
    # Backward map: output offset p samples the input at s * R^T p.
    backward = rotation_matrix(angles[idx], nd).transpose(1, 2) * scale[idx, None, None]
    field = None
    if ela["p"] > 0:
        field = _elastic_field(magnitude[idx], shape, ela["control_points"], g)
    src_img, src_lab = source if source is not None else (image, label)
    grid = sampling_grid(backward, shape, field, in_shape if source is not None else None)
    img = _resample_image(src_img.index_select(0, idx), grid, params["spatial"]["image_pad"])
    lab = _resample_label(src_lab.index_select(0, idx), grid)
    if blend:  # every row was resampled; keep the untouched rows exact (no host sync)
        m = selected.reshape(b, *([1] * (image.ndim - 1)))
        return image.copy_(torch.where(m, img, image)), label.copy_(torch.where(m, lab, label))
    return image.index_copy_(0, idx, img), label.index_copy_(0, idx, lab)


def mirror(image: Tensor, label: Tensor, cfg: Mapping[str, Any], g: torch.Generator,
           info: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """Flip each sample along each of ``cfg["axes"]`` with probability ``cfg["p"]`` (by index).

    Args:
        image: ``(B, C, *S)``; flipped rows are written in place.
        label: ``(B, 1, *S)``; likewise.
        cfg: ``{"p", "axes"}``; axes are spatial indices (0 = first spatial axis).
        g: Generator.
        info: Receives ``mirror``: a ``(B, len(axes))`` mask of the flips done.
    """
    axes = list(cfg["axes"])
    flips = bernoulli(cfg["p"], (image.shape[0], len(axes)), g, image.device)
    info["mirror"] = flips
    if cfg["p"] <= 0:
        return image, label
    for j, axis in enumerate(axes):
        dim = 2 + axis
        image = on_subset(image, flips[:, j], lambda x, _i, d=dim: x.flip(d))
        label = on_subset(label, flips[:, j], lambda x, _i, d=dim: x.flip(d))
    return image, label
