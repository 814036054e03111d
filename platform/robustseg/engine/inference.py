"""Sliding-window inference with Gaussian weighting, mirror TTA and model ensembles.

One core (`_sliding_window`) runs every path. Its input is a batch of independent images
``(B, channels, *spatial)``: the slices of a volume for 2D models (B = Z, spatial = (Y, X))
or the volume itself for 3D models (B = 1, spatial = (Z, Y, X)). A 2D network trained with
``model.slice_context = k`` (2.5D) takes each slice with its ``k`` neighbours on each side as
channels; `sliding_window_2d` stacks them (edge slices repeated) once per volume, and each
member of an ensemble reads the channels it was trained on. Windows from all images, each with
its mirrored copies, are stacked into as few forward passes as ``batch_size`` allows, so a
2D model sees ``ceil(Z * windows * flips / batch_size)`` launches per volume.

Mirror TTA is applied per window, as nnU-Net v2 does: each window is flipped, predicted,
flipped back and the softmax probabilities averaged, before the Gaussian-weighted window
aggregation. That is equivalent to flipping the whole volume when the window grid is mirror
symmetric and needs one output accumulator instead of one per flip. Ensembles average the
probabilities of every member on the same batch of windows: all members stay resident on the
device, their (weighted) probabilities are summed before un-flipping, and a member with
weight 0 is not run. With one window per image (whole slices) the Gaussian weight and its
normaliser cancel and are skipped.

Everything runs on the device of the input tensor under ``torch.inference_mode()``; bf16
autocast only when asked (``amp=True``: callers ask on CUDA and on CPUs with native bf16,
`robustseg.engine.precision.inference_amp`). The returned probabilities
are float32 ``(C, Z, Y, X)`` in the input's grid; plans invert them to the original geometry
with ``plan.invert_probabilities``.
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ModelOrModels = Union[nn.Module, Sequence[nn.Module]]


def slice_context(model: nn.Module) -> int:
    """Neighbouring slices on each side a 2D network takes as extra channels (0: plain 2D).

    `robustseg.models.build_model` sets it from ``model.slice_context``; networks built
    elsewhere have none and are plain 2D.
    """
    return int(getattr(getattr(model, "_orig_mod", model), "slice_context", 0))


def _as_tensor(image: Union[Tensor, np.ndarray]) -> Tensor:
    """Accept numpy arrays too (float32 on the CPU); tensors keep their device."""
    t = torch.as_tensor(image)
    return t.float() if not torch.is_floating_point(t) or t.dtype == torch.float64 else t


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def window_starts(size: int, patch: int, overlap: float) -> List[int]:
    """Start offsets of windows of length ``patch`` covering ``size`` with the given overlap.

    The first window starts at 0 and the last ends at ``size``; the ones between are spread
    evenly, so the actual overlap is at least ``overlap`` (nnU-Net's step rule).

    Args:
        size: Padded image extent along one axis (>= patch).
        patch: Window extent along that axis.
        overlap: Fraction in [0, 1) of a window shared with its neighbour.

    Returns:
        Sorted start offsets.
    """
    if size <= patch:
        return [0]
    target_step = max(patch * (1.0 - overlap), 1.0)
    n = int(math.ceil((size - patch) / target_step)) + 1
    step = (size - patch) / (n - 1)
    return [int(round(i * step)) for i in range(n)]


def gaussian_importance(
    patch: Sequence[int], sigma_scale: float = 1.0 / 8, device: Optional[torch.device] = None
) -> Tensor:
    """Separable Gaussian weight map over a window, 1 at the centre.

    Window borders see less context, so their predictions count less where windows overlap.
    The centre is ``(p - 1) / 2`` so the map is mirror symmetric (flipped windows get the same
    weights); the minimum is about exp(-8) at the borders, never zero, so every voxel keeps
    a positive total weight.

    Args:
        patch: Window size per spatial axis.
        sigma_scale: Sigma as a fraction of the window size (nnU-Net: 1/8).
        device: Where to build it.

    Returns:
        float32 tensor of shape ``patch``.
    """
    w = torch.ones((), device=device)
    for p in patch:
        x = torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2.0
        g = torch.exp(-0.5 * (x / max(p * sigma_scale, 1e-6)) ** 2)
        w = w[..., None] * g
    return w / w.max()


def _flip_combos(spatial_dims: int, tta: bool) -> List[Tuple[int, ...]]:
    """Tensor dims to flip for each TTA copy of a ``(N, 1, *spatial)`` window batch."""
    if not tta:
        return [()]
    axes = tuple(range(2, 2 + spatial_dims))
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _forward_probs(model: nn.Module, x: Tensor, num_classes: int, amp: bool) -> Tensor:
    """Softmax of one forward pass, float32; takes the full-resolution head of list outputs."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    if isinstance(out, (list, tuple)):
        out = out[0]  # deep supervision: element 0 is the full-resolution output
    if out.shape[1] != num_classes or out.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"model output shape {tuple(out.shape)} does not match input {tuple(x.shape)} "
            f"with {num_classes} classes (is the patch divisible by what the model needs?)"
        )
    # dtype= computes a bf16 output's softmax in float32 directly, without an extra upcast copy.
    return torch.softmax(out, dim=1, dtype=torch.float32)


def _window_runs(start: int, stop: int, n_images: int) -> List[Tuple[int, int, int]]:
    """Split window indices ``[start, stop)`` into ``(position, first image, end image)`` runs.

    Windows are numbered position-major (``index = position * n_images + image``), so a chunk
    of consecutive windows is a few runs of consecutive images at one position each; a run is
    cut or pasted with one slicing op instead of one per window.
    """
    runs = []
    i = start
    while i < stop:
        pos, b0 = divmod(i, n_images)
        b1 = min(n_images, b0 + stop - i)
        runs.append((pos, b0, b1))
        i += b1 - b0
    return runs


def _checked_window_args(models: Sequence[nn.Module], images: Tensor, patch_size: Optional[Sequence[int]],
                         overlap: float, batch_size: int, divisible_by: Union[int, Sequence[int]],
                         weights: Optional[Sequence[float]]) -> Tuple[Optional[List[float]], Tuple[int, ...], Tuple[int, ...]]:
    """Validate the sliding window's arguments: (member weights normalised to sum 1, patch, size multiple).

    Raises:
        ValueError: bad weights, a model on another device than the image, or a patch, overlap,
            batch size or size multiple that does not fit the image's dimensionality.
    """
    if weights is not None:
        if len(weights) != len(models) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {list(weights)}")
        total = float(sum(weights))
        weights = [float(w) / total for w in weights]
    for m in models:
        param = next(m.parameters(), None)
        if param is not None and param.device != images.device:
            raise ValueError(f"model is on {param.device} but the image is on {images.device}; move one of them")
    nd = images.dim() - 2
    if patch_size is None:
        patch = tuple(int(s) for s in images.shape[2:])
    else:
        if len(patch_size) != nd:
            raise ValueError(f"patch_size {tuple(patch_size)} must have {nd} entries for {nd}D windows")
        patch = tuple(int(p) for p in patch_size)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    div = (int(divisible_by),) * nd if isinstance(divisible_by, (int, np.integer)) else tuple(int(d) for d in divisible_by)
    if len(div) != nd:
        raise ValueError(f"divisible_by {div} must have {nd} entries for {nd}D windows")
    if batch_size < 1 or min(div) < 1:
        raise ValueError("batch_size and divisible_by must be >= 1")
    return (None if weights is None else list(weights)), patch, div


def _member_channels(models: Sequence[nn.Module], channels: int) -> List[slice]:
    """Per member, the input channels it reads: its own slice context around the centre slice.

    Raises:
        ValueError: a member needs more neighbouring slices than the stacked input holds.
    """
    k_in = (channels - 1) // 2
    out = []
    for m in models:
        k = slice_context(m)
        if k > k_in:
            raise ValueError(f"a model takes {k} neighbouring slices on each side but the input holds {k_in}")
        out.append(slice(None) if k == k_in else slice(k_in - k, k_in + k + 1))
    return out


def context_stack(image_zyx: Tensor, k: int) -> Tensor:
    """Each slice with its ``k`` neighbours on each side as channels: ``(Z, 1 + 2k, Y, X)``.

    Slices beyond the volume's ends repeat the end slice, exactly as `SliceBatcher` feeds
    training (the two must agree, or edge slices see inputs training never showed).
    """
    z = image_zyx.shape[0]
    idx = (torch.arange(z, device=image_zyx.device)[:, None]
           + torch.arange(-k, k + 1, device=image_zyx.device)).clamp_(0, z - 1)
    return image_zyx[idx]


def _sum_members(models: Sequence[nn.Module], member_w: Sequence[float], batch: Tensor, batch_size: int,
                 num_classes: int, amp: bool, acc: Tensor) -> None:
    """``acc`` = the member-weighted sum of every window copy's probabilities (forwards of at most batch_size)."""
    first = True
    for model, w, ch in zip(models, member_w, _member_channels(models, batch.shape[1])):
        if w == 0.0:
            continue  # contributes nothing: skip its forward passes
        # One window's mirror copies may outnumber batch_size (3D TTA: 8); split then.
        for k in range(0, batch.shape[0], batch_size):
            p = _forward_probs(model, batch[k : k + batch_size, ch], num_classes, amp)
            dst = acc[k : k + p.shape[0]]
            if first and w == 1.0:
                dst.copy_(p)
            elif first:
                torch.mul(p, w, out=dst)
            else:
                dst.add_(p, alpha=w)
        first = False


def _sliding_window(
    models: Sequence[nn.Module],
    images: Tensor,
    num_classes: int,
    patch_size: Optional[Sequence[int]],
    overlap: float,
    gaussian: bool,
    tta: bool,
    batch_size: int,
    divisible_by: Union[int, Sequence[int]],
    amp: bool,
    weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """Core: ``images (B, channels, *spatial)`` -> probabilities ``(B, C, *spatial)``."""
    weights, patch, div = _checked_window_args(models, images, patch_size, overlap, batch_size, divisible_by, weights)
    nd = images.dim() - 2
    spatial = tuple(int(s) for s in images.shape[2:])
    # Windows must satisfy the network's size constraint too, so they are rounded up (per
    # axis: an anisotropic 3D U-Net needs 4 along z but 32 in-plane).
    patch = tuple(_round_up(p, d) for p, d in zip(patch, div))
    padded = tuple(_round_up(max(p, s), d) for p, s, d in zip(patch, spatial, div))
    pad_before = [(P - s) // 2 for P, s in zip(padded, spatial)]
    pad_pairs: List[int] = []
    for b, P, s in reversed(list(zip(pad_before, padded, spatial))):  # F.pad wants last dim first
        pad_pairs += [b, P - s - b]
    # The image minimum is the background of normalised MR/CT, so padding looks like air.
    x = images.float()
    if any(pad_pairs):
        x = F.pad(x, pad_pairs, mode="constant", value=float(x.min()))

    device = x.device
    n_img = x.shape[0]
    starts = [window_starts(P, p, overlap) for P, p in zip(padded, patch)]
    boxes = [tuple(slice(s, s + p) for s, p in zip(pos, patch)) for pos in itertools.product(*starts)]
    flips = _flip_combos(nd, tta)
    n_flip = len(flips)
    per_pass = max(1, batch_size // n_flip)
    n_windows = len(boxes) * n_img
    # One window per image (the whole-slice case): its Gaussian weight and the normaliser
    # cancel, so both are skipped and each image's result is written once, not accumulated.
    single = len(boxes) == 1
    if single:
        weight = None
    else:
        weight = gaussian_importance(patch, device=device) if gaussian else torch.ones(patch, device=device)
        norm = torch.zeros(padded, dtype=torch.float32, device=device)
        for box in boxes:
            norm[box] += weight
    if weights is None:
        member_w = [1.0] * len(models)
        scale = 1.0 / (n_flip * len(models))
    else:
        member_w = list(weights)  # already normalised to sum 1
        scale = 1.0 / n_flip
    scaled_weight = None if weight is None else weight * scale

    out = (torch.empty if single else torch.zeros)((n_img, num_classes) + padded, dtype=torch.float32, device=device)
    # Reused across chunks: the sum over members of every window copy's probabilities.
    acc_all = torch.empty((per_pass * n_flip, num_classes) + patch, dtype=torch.float32, device=device)

    for i in range(0, n_windows, per_pass):
        runs = _window_runs(i, min(i + per_pass, n_windows), n_img)
        n = sum(b1 - b0 for _, b0, b1 in runs)
        crops = torch.cat([x[(slice(b0, b1), slice(None)) + boxes[pos]] for pos, b0, b1 in runs])
        batch = torch.cat([crops.flip(f) if f else crops for f in flips]) if n_flip > 1 else crops
        acc = acc_all[: n * n_flip]
        _sum_members(models, member_w, batch, batch_size, num_classes, amp, acc)
        # Members are summed before un-flipping, so each chunk un-flips once per mirror copy
        # instead of once per member and copy.
        probs = acc[:n]  # flips[0] is the identity
        for k in range(1, n_flip):
            probs += acc[k * n : (k + 1) * n].flip(flips[k])
        probs *= scale if scaled_weight is None else scaled_weight
        j = 0
        for pos, b0, b1 in runs:
            dst = out[(slice(b0, b1), slice(None)) + boxes[pos]]
            if single:
                dst.copy_(probs[j : j + b1 - b0])
            else:
                dst += probs[j : j + b1 - b0]
            j += b1 - b0
    if not single:
        out /= norm
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial))
    return out[(slice(None), slice(None)) + crop]


def _run(models: ModelOrModels, fn, *args, **kwargs) -> Tensor:
    """Put models in eval mode for the call and restore their previous mode afterwards.

    Callers validate mid-training, so a model handed over in train mode goes back to it.
    """
    ms = list(models) if isinstance(models, (list, tuple)) else [models]
    if not ms:
        raise ValueError("no models given")
    modes = [m.training for m in ms]
    try:
        for m in ms:
            m.eval()
        with torch.inference_mode():
            return fn(ms, *args, **kwargs)
    finally:
        for m, mode in zip(ms, modes):
            m.train(mode)


def _check_volume(image_zyx: Union[Tensor, np.ndarray]) -> Tensor:
    t = _as_tensor(image_zyx)
    if t.dim() != 3 or min(t.shape) == 0:
        raise ValueError(f"expected a non-empty (Z, Y, X) image, got shape {tuple(t.shape)}")
    return t


def sliding_window_2d(
    model: ModelOrModels,
    image_zyx: Union[Tensor, np.ndarray],
    num_classes: int,
    patch_size: Optional[Sequence[int]] = None,
    overlap: float = 0.5,
    gaussian: bool = True,
    batch_size: int = 32,
    divisible_by: Union[int, Sequence[int]] = 1,
    amp: bool = False,
    tta: bool = False,
    weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """Slice-by-slice 2D sliding-window prediction of a volume.

    Args:
        model: A 2D network ``(N, 1 + 2k, H, W) -> (N, C, H, W)`` (k: its `slice_context`;
            list outputs: element 0), or a list of such networks to average.
        image_zyx: Image ``(Z, Y, X)``; its device is where inference runs.
        num_classes: Output channels C (background included).
        patch_size: In-plane window ``(H, W)``; None: the whole (padded) slice.
        overlap: Fraction of a window shared with its neighbour, in [0, 1).
        gaussian: Gaussian importance weighting (sigma = patch / 8) instead of uniform.
        batch_size: Most windows (TTA copies included) per forward pass; a window's mirror
            copies go in the same pass whenever they fit.
        divisible_by: Pad slices (with the image minimum) and round windows up to a multiple
            of this, for networks that downsample; the result is cropped back.
        amp: bf16 autocast (callers decide where it pays: `robustseg.engine.precision`).
        tta: Mirror each window along x, y and both, averaging the probabilities.
        weights: Per-model weights of an ensemble (normalised to sum 1); None: plain mean.

    Returns:
        float32 probabilities ``(C, Z, Y, X)`` summing to 1 over C.
    """
    img = _check_volume(image_zyx)
    k = max(slice_context(m) for m in (model if isinstance(model, (list, tuple)) else [model]))
    stacked = context_stack(img, k) if k else img[:, None]
    # The copy made outside inference mode is an ordinary tensor callers may update in place.
    return _run(model, _sliding_window, stacked, num_classes, patch_size, overlap, gaussian, tta,
                batch_size, divisible_by, amp, weights).permute(1, 0, 2, 3).contiguous()


def sliding_window_3d(
    model: ModelOrModels,
    image_zyx: Union[Tensor, np.ndarray],
    num_classes: int,
    patch_size: Optional[Sequence[int]] = None,
    overlap: float = 0.5,
    gaussian: bool = True,
    batch_size: int = 2,
    divisible_by: Union[int, Sequence[int]] = 1,
    amp: bool = False,
    tta: bool = False,
    weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """3D sliding-window prediction of a volume with ``(D, H, W)`` windows.

    Args:
        model: A 3D network ``(N, 1, D, H, W) -> (N, C, D, H, W)`` (or list output), or a
            list of such networks to average.
        image_zyx: Image ``(Z, Y, X)``; its device is where inference runs.
        num_classes: Output channels C.
        patch_size: Window ``(D, H, W)``; None: the whole (padded) volume.
        overlap: Fraction of a window shared with its neighbour, in [0, 1).
        gaussian: Gaussian importance weighting instead of uniform.
        batch_size: Most windows (TTA copies included) per forward pass.
        divisible_by: Pad and round windows up to a multiple of this on every axis.
        amp: bf16 autocast (see `robustseg.engine.precision`).
        tta: Mirror each window along all 3 axes (8 combinations).
        weights: Per-model weights of an ensemble (normalised to sum 1); None: plain mean.

    Returns:
        float32 probabilities ``(C, Z, Y, X)``.
    """
    img = _check_volume(image_zyx)
    # clone() outside inference mode: callers may update the result in place.
    return _run(model, _sliding_window, img[None, None], num_classes, patch_size, overlap, gaussian, tta,
                batch_size, divisible_by, amp, weights)[0].clone()


def predict_volume(
    model: ModelOrModels,
    image_zyx: Union[Tensor, np.ndarray],
    *,
    spatial_dims: int,
    num_classes: int,
    patch_size: Optional[Sequence[int]] = None,
    overlap: float = 0.5,
    gaussian: bool = True,
    tta: bool = True,
    batch_size: int = 32,
    divisible_by: Union[int, Sequence[int]] = 1,
    amp: bool = False,
    weights: Optional[Sequence[float]] = None,
) -> Tensor:
    """Predict class probabilities of one volume with a 2D or 3D model (mirror TTA optional).

    Args:
        model: The network, or a list of networks to average (see `predict_ensemble`).
        image_zyx: Preprocessed image ``(Z, Y, X)`` (the plan's output grid).
        spatial_dims: 2 (slice-wise) or 3.
        num_classes: Output channels C.
        patch_size: Window size (2 or 3 entries); None: whole slice / volume.
        overlap: Window overlap fraction.
        gaussian: Gaussian importance weighting.
        tta: Mirror TTA over the in-plane axes (4 copies) and, for 3D, the slice axis (8).
        batch_size: Most windows (TTA copies included) per forward pass.
        divisible_by: Size multiple the network needs (e.g. 2 ** number of poolings).
        amp: bf16 autocast (see `robustseg.engine.precision`).
        weights: Per-model weights when ``model`` is a list (normalised); None: plain mean.

    Returns:
        float32 probabilities ``(C, Z, Y, X)`` on the image's device.
    """
    if spatial_dims == 2:
        fn = sliding_window_2d
    elif spatial_dims == 3:
        fn = sliding_window_3d
    else:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return fn(model, image_zyx, num_classes, patch_size=patch_size, overlap=overlap, gaussian=gaussian,
              batch_size=batch_size, divisible_by=divisible_by, amp=amp, tta=tta, weights=weights)


def heart_box(labels_zyx: Tensor, patch_yx: Sequence[int], margin: int,
              keep_fraction: float = 0.1, join_px: int = 8) -> Optional[Tuple[slice, slice]]:
    """In-plane box around the foreground of a coarse label map.

    Candidates are judged on the in-plane footprint, not in 3D: the foreground's projection
    along the slice axis, widened by ``join_px``, is split into 2D regions, and a region's
    mass is every foreground voxel under it, on all slices. The box covers each region
    holding at least ``keep_fraction`` of the heaviest one's mass, plus ``margin`` voxels.
    Why the footprint: each slice of a cine stack is its own breath-hold, so under
    respiratory motion the heart's cross-sections shift between slices and fall apart into
    one small 3D piece per slice, each of which a false blob elsewhere (a ghost, the stomach)
    can outweigh ten times; stacked in their column they are the heart's whole mass again.
    A coarse pass may find a false blob as large as the heart, and the box keeps both (the
    final post-processing decides between them, as over the whole field). The box is at
    least the window size (so a window sees real image, not padding) and stays inside the
    image. None when nothing was found.

    Args:
        labels_zyx: Coarse labels ``(Z, Y, X)`` (any integer dtype; > 0 is foreground).
        patch_yx: Window size ``(Y, X)``.
        margin: Voxels added on each side.
        keep_fraction: Regions lighter than this share of the heaviest are speckle: ignored.
        join_px: In-plane distance within which footprint pieces count as one region.
    """
    from scipy import ndimage

    fg = labels_zyx.cpu().numpy() > 0
    if not fg.any():
        return None
    mass = fg.sum(axis=0)
    footprint = mass > 0
    joined = ndimage.binary_dilation(footprint, iterations=join_px) if join_px > 0 else footprint
    regions, n = ndimage.label(joined, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        weight = np.bincount(regions.ravel(), weights=mass.ravel())
        weight[0] = 0
        footprint &= np.isin(regions, np.flatnonzero(weight >= keep_fraction * weight.max()))
    box = []
    for axis, (size, patch) in enumerate(zip(footprint.shape, patch_yx)):
        hit = np.flatnonzero(footprint.any(axis=1 - axis))
        lo, hi = int(hit[0]) - margin, int(hit[-1]) + 1 + margin
        if hi - lo < patch:  # grow to one window, centred on the structure
            extra = patch - (hi - lo)
            lo, hi = lo - extra // 2, hi + extra - extra // 2
        shift = max(0, -lo) - max(0, hi - size)  # slide back inside the image
        lo, hi = max(0, lo + shift), min(size, hi + shift)
        box.append(slice(lo, hi))
    return box[0], box[1]


def locate_then_segment(
    model: ModelOrModels,
    image_zyx: Union[Tensor, np.ndarray],
    *,
    num_classes: int,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    gaussian: bool = True,
    tta: bool = True,
    batch_size: int = 32,
    divisible_by: Union[int, Sequence[int]] = 1,
    amp: bool = False,
    weights: Optional[Sequence[float]] = None,
    margin: int = 16,
) -> Tuple[Tensor, Optional[Tuple[slice, slice]]]:
    """Two-stage 2D prediction with a patch-trained model as its own locator.

    Stage 1 tiles the whole field with non-overlapping windows, without TTA (a quarter or
    less of the full sliding-window cost); the box around its foreground components
    (`heart_box`) is the only place stage 2 runs the full sliding window with TTA;
    outside it the probabilities are background. Nothing is cut: the box
    holds all of stage 1's structure plus ``margin``, and when stage 1 finds nothing, stage
    2 covers the whole field.

    Args:
        model, image_zyx, num_classes, patch_size, overlap, gaussian, tta, batch_size,
        divisible_by, amp, weights: As in `sliding_window_2d` (``patch_size`` is required).
        margin: Voxels of context kept around the located structure.

    Returns:
        ``(probabilities (C, Z, Y, X) float32, box or None)``; None: stage 1 found nothing
        and the whole field was segmented.
    """
    img = _check_volume(image_zyx)
    common = dict(patch_size=patch_size, gaussian=gaussian, batch_size=batch_size, divisible_by=divisible_by,
                  amp=amp, weights=weights)
    coarse = sliding_window_2d(model, img, num_classes, overlap=0.0, tta=False, **common)
    box = heart_box(coarse.argmax(0), patch_size, margin)
    if box is None:
        return sliding_window_2d(model, img, num_classes, overlap=overlap, tta=tta, **common), None
    fine = sliding_window_2d(model, img[:, box[0], box[1]], num_classes, overlap=overlap, tta=tta, **common)
    out = torch.zeros((num_classes,) + tuple(img.shape), dtype=torch.float32, device=img.device)
    out[0] = 1.0
    out[:, :, box[0], box[1]] = fine
    return out, box


def predict_ensemble(models: Sequence[nn.Module], image_zyx: Union[Tensor, np.ndarray], **kwargs) -> Tensor:
    """Average the probabilities of several models (e.g. the folds of a cross-validation).

    Members share every window batch, so the windows are cut once; each member costs its own
    forward passes. Members must share ``spatial_dims``, ``num_classes`` and the input size
    constraint; ensembles mixing 2D and 3D members average `predict_volume` outputs instead.

    Args:
        models: The member networks.
        image_zyx: Image ``(Z, Y, X)``.
        **kwargs: `predict_volume` keyword arguments.

    Returns:
        float32 probabilities ``(C, Z, Y, X)``.
    """
    if isinstance(models, nn.Module):
        models = [models]
    return predict_volume(list(models), image_zyx, **kwargs)


def probabilities_to_labels(probs_czyx: Union[Tensor, np.ndarray]) -> np.ndarray:
    """Argmax over classes as a uint8 numpy array ``(Z, Y, X)`` (for post-processing)."""
    p = probs_czyx.detach().cpu().numpy() if isinstance(probs_czyx, Tensor) else np.asarray(probs_czyx)
    return np.argmax(p, axis=0).astype(np.uint8)
