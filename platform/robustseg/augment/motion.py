"""Respiratory motion artefacts in k-space, batched in torch on the training device.

The torch twin of `robustseg.data.motion` (read its module notes for the physics): each 2D
image is acquired one phase-encoding line after another while the object follows a
respiratory trace, so k-space line ``k_y`` is multiplied by the phase ramp of that line's
displacement; inverse FFT and magnitude give ghosts and blurring along the phase-encoding
axis. The CMRxMotion levels 0-3 use the *same* tables as the numpy simulator (peak-to-peak
excursion 0, 2, 5, 9 pixels; breathing irregularity; per-line jitter), imported from it so
the two can never drift apart, and the same trace model, k-space-centre registration and
readout angle. Random numbers come from the torch generator, so the two simulators agree
in distribution, not sample by sample.

Differences from the numpy version, all for training:

* Batched: every sample gets its own level (drawn from ``levels``), and every 2D image its
  own trace; a 3D batch ``(N, C, D, H, W)`` is corrupted slice by slice (each slice is its
  own breath-hold, as in cine CMR) with one level and one phase-encoding axis per volume.
  Channels of a sample share its motion (one acquisition).
* Intensities: training images are z-scored, so they are negative in the background. A
  magnitude image must be non-negative, so each 2D image is shifted by its minimum before
  the k-space step and shifted back after: the background keeps its z-scored value and the
  ghosts land on it as they would on a magnitude image. The k-space centre is not moved by a
  phase ramp, so the mean is kept up to the magnitude's rectification.
* The phase-encoding axis can be ``"random"`` per sample (rows or columns): after
  resampling and cropping, the scanner's phase-encoding direction is unknown.
* Level 0, and samples not picked by ``p``, come back bit-identical.

`motion_augment` is the training augmentation (``augment.params.motion`` in the presets);
`simulate_motion` corrupts at given levels; `motion_trace` is the torch `respiratory_trace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor

from robustseg.augment.intensity import bernoulli, on_subset, uniform
# One table for both simulators (the numpy one in robustseg.data.motion is the reference).
from robustseg.data.motion import (
    CENTRE_WIDTH,
    IRREGULARITY,
    JITTER_PX,
    MAX_READOUT_ANGLE,
    MOTION_LEVELS,
    motion_amplitude,
)

PhaseAxis = Union[int, str]
PHASE_AXES = (-2, -1, "random")
_HARMONICS = 3  # low-order Fourier series of the breathing irregularity, as in the numpy trace


def check_levels(levels: Sequence[int]) -> Tuple[int, ...]:
    """Validate a non-empty list of CMRxMotion levels (0-3).

    Raises:
        ValueError: empty, non-integer or out-of-range levels.
    """
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(f"motion levels must be a non-empty list drawn from {MOTION_LEVELS}, got {levels!r}")
    out = []
    for v in levels:
        if isinstance(v, bool) or not isinstance(v, int) or v not in MOTION_LEVELS:
            raise ValueError(f"motion levels must be drawn from {MOTION_LEVELS} (CMRxMotion grading), got {levels!r}")
        out.append(int(v))
    return tuple(out)


def check_phase_axis(axis: Any) -> PhaseAxis:
    """Validate a phase-encoding axis: -2 (rows, Y), -1 (columns, X) or "random".

    Raises:
        ValueError: any other value.
    """
    if isinstance(axis, bool) or axis not in PHASE_AXES:
        raise ValueError(f"phase_axis must be -2 (rows), -1 (columns) or 'random', got {axis!r}")
    return axis


# --------------------------------------------------------------------------- breathing draws
@dataclass
class _Breathing:
    """Random breathing of a batch: per sample (B,) and per 2D image (B, S) of it."""

    level: Tensor  # (B,) long, 0-3
    cols: Tensor  # (B,) bool: phase encoding along the columns (X)
    cycles: Tensor  # (B, S)
    phase0: Tensor  # (B, S)
    coef: Tensor  # (B, S, 2, 2, H): [theta | depth] x [cos | sin] x harmonics
    angle: Tensor  # (B, S): displacement angle to the phase-encoding axis
    jitter_rows: Tensor  # (B, S, n_y) standard normal, per line when encoding along Y
    jitter_cols: Tensor  # (B, S, n_x) when encoding along X (empty if never)

    def take(self, idx: Tensor) -> "_Breathing":
        return _Breathing(**{f.name: getattr(self, f.name).index_select(0, idx) for f in fields(self)})


def _draw(level: Tensor, n_slices: int, hw: Tuple[int, int], phase_axis: PhaseAxis,
          g: torch.Generator) -> _Breathing:
    """Draw every random number of a batch up front, in a fixed order.

    Drawing for the whole batch, before any subset is taken, keeps the result the same
    whether the rows are then processed selectively (CPU) or all at once (GPU blend).
    """
    b, dev = level.shape[0], level.device
    if phase_axis == "random":
        cols = torch.rand((b,), generator=g, device=dev) < 0.5
    else:
        cols = torch.full((b,), phase_axis == -1, dtype=torch.bool, device=dev)
    shape = (b, n_slices)
    cycles = uniform(1.5, 3.5, shape, g, dev)
    phase0 = uniform(0.0, 2.0 * math.pi, shape, g, dev)
    coef = torch.randn((*shape, 2, 2, _HARMONICS), generator=g, device=dev) / math.sqrt(_HARMONICS)
    angle = uniform(-MAX_READOUT_ANGLE, MAX_READOUT_ANGLE, shape, g, dev)
    n_y = hw[0] if phase_axis != -1 else 0
    n_x = hw[1] if phase_axis != -2 else 0
    jitter_rows = torch.randn((*shape, n_y), generator=g, device=dev)
    jitter_cols = torch.randn((*shape, n_x), generator=g, device=dev)
    return _Breathing(level, cols, cycles, phase0, coef, angle, jitter_rows, jitter_cols)


def _table(values: Sequence[float], level: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=level.device)[level]


def _trace(br: _Breathing, n_lines: int, jitter: Tensor) -> Tensor:
    """Displacement (pixels) per phase-encoding line in acquisition order, ``(B, S, n_lines)``."""
    dev = br.cycles.device
    amp = _table([motion_amplitude(v) for v in MOTION_LEVELS], br.level)[:, None, None]
    irr = _table(IRREGULARITY, br.level)[:, None, None]
    jit = _table(JITTER_PX, br.level)[:, None, None]
    t = torch.arange(n_lines, device=dev, dtype=torch.float32) / n_lines
    m = torch.arange(1, _HARMONICS + 1, device=dev, dtype=torch.float32)
    arg = 2.0 * math.pi * m[:, None] * t[None, :]  # (harmonics, lines)
    basis = torch.stack([torch.cos(arg), torch.sin(arg)])  # (2, harmonics, lines)
    # Smooth zero-mean noise: sum over cos/sin and harmonics -> (B, S, 2 [theta | depth], lines).
    smooth = torch.einsum("bsqch,chn->bsqn", br.coef, basis)
    theta = 2.0 * math.pi * (br.cycles[..., None] * t + irr * smooth[:, :, 0]) + br.phase0[..., None]
    depth = (1.0 + irr * smooth[:, :, 1]).clamp_min(0.3)
    shape = ((1.0 + torch.cos(theta)) / 2.0) ** 2  # dwells at end-expiration
    return amp * depth * shape + jit * jitter


def _phase(br: _Breathing, n_pe: int, n_ro: int, jitter: Tensor) -> Tensor:
    """k-space phase ``(B, S, n_pe, n_ro)`` of a trace, phase encoding along the first axis."""
    dev = br.cycles.device
    trace = _trace(br, n_pe, jitter)
    k_pe = torch.fft.fftfreq(n_pe, device=dev)
    k_ro = torch.fft.fftfreq(n_ro, device=dev)
    # Keep the k-space centre (the image's position) fixed, so the image stays on its label.
    w = torch.exp(-0.5 * (torch.fft.fftshift(k_pe) / CENTRE_WIDTH) ** 2)
    trace = trace - (trace @ w)[..., None] / w.sum()
    disp = torch.fft.ifftshift(trace, dim=-1)  # sequential order -> FFT line order
    d_pe = disp * torch.cos(br.angle)[..., None]
    d_ro = disp * torch.sin(br.angle)[..., None]
    return -2.0 * math.pi * (k_pe[:, None] * d_pe[..., None] + k_ro * d_ro[..., None])


def _corrupt(x: Tensor, br: _Breathing) -> Tensor:
    """Corrupt ``x`` of shape ``(B, C, S, H, W)`` (float32) with the breathing ``br``."""
    h, w = x.shape[-2:]
    if br.jitter_cols.shape[-1] == 0:
        phase = _phase(br, h, w, br.jitter_rows)
    elif br.jitter_rows.shape[-1] == 0:
        phase = _phase(br, w, h, br.jitter_cols).transpose(-1, -2)
    else:  # per-sample axis: both maps (cheap next to the FFTs), then pick; no host sync
        rows = _phase(br, h, w, br.jitter_rows)
        cols = _phase(br, w, h, br.jitter_cols).transpose(-1, -2)
        phase = torch.where(br.cols[:, None, None, None], cols, rows)
    ramp = torch.polar(torch.ones_like(phase), phase)[:, None]  # channels share the motion
    lo = x.amin(dim=(-2, -1), keepdim=True)  # magnitude images are non-negative: shift, then back
    k = torch.fft.fft2(x - lo) * ramp
    out = torch.fft.ifft2(k).abs() + lo
    moving = (br.level > 0).view(-1, 1, 1, 1, 1)
    return torch.where(moving, out, x)  # level 0 stays bit-identical


def _as_5d(image: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
    if image.ndim not in (4, 5):
        raise ValueError(f"motion: expected (N, C, H, W) or (N, C, D, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"motion: image must be floating point, got {image.dtype}")
    n, c, h, w = image.shape[0], image.shape[1], image.shape[-2], image.shape[-1]
    return image.reshape(n, c, -1, h, w), tuple(image.shape)


def _levels_tensor(levels: Union[int, Sequence[int], Tensor], n: int, device: torch.device) -> Tensor:
    if isinstance(levels, Tensor):
        lv = levels.to(device=device, dtype=torch.long).reshape(-1)
    elif isinstance(levels, int):
        lv = torch.full((n,), levels, dtype=torch.long, device=device)
    else:
        lv = torch.tensor(list(levels), dtype=torch.long, device=device)
    if lv.numel() != n:
        raise ValueError(f"motion: {lv.numel()} levels for a batch of {n}")
    if not isinstance(levels, Tensor):
        check_levels([int(v) for v in lv.tolist()])
    return lv


# --------------------------------------------------------------------------- public API
def motion_trace(n_lines: int, levels: Union[int, Sequence[int], Tensor], generator: torch.Generator) -> Tensor:
    """Object displacement (pixels) per phase-encoding line, the torch `respiratory_trace`.

    Args:
        n_lines: Phase-encoding lines of one image.
        levels: One CMRxMotion level per trace (or one level for a single trace).
        generator: Source of randomness (its device is used).

    Returns:
        float32 ``(N, n_lines)``, in acquisition order, not yet centred on the k-space centre;
        rows of level 0 are zero.
    """
    n = 1 if isinstance(levels, int) else len(levels)
    lv = _levels_tensor(levels, n, generator.device)
    br = _draw(lv, 1, (n_lines, n_lines), -2, generator)
    return _trace(br, n_lines, br.jitter_rows)[:, 0]


def simulate_motion(image: Tensor, levels: Union[int, Sequence[int], Tensor], generator: torch.Generator,
                    phase_axis: PhaseAxis = -2) -> Tensor:
    """Corrupt every sample of a batch at its own motion level.

    Args:
        image: ``(N, C, H, W)`` or ``(N, C, D, H, W)`` float images (any sign; see the notes).
        levels: One level per sample, or one for all.
        generator: Source of randomness, on the image's device.
        phase_axis: -2 (rows), -1 (columns) or "random" per sample.

    Returns:
        A new tensor of the input's shape and dtype; level-0 samples are bit-identical.
    """
    check_phase_axis(phase_axis)
    x, shape = _as_5d(image)
    lv = _levels_tensor(levels, x.shape[0], image.device)
    br = _draw(lv, x.shape[2], tuple(x.shape[-2:]), phase_axis, generator)
    return _corrupt(x.float(), br).to(image.dtype).reshape(shape)


def augment_motion(x: Tensor, cfg: Mapping[str, Any], g: torch.Generator) -> Tuple[Tensor, Tensor]:
    """The `Augmenter`'s motion step: corrupt the picked rows of ``x`` in place.

    Args:
        x: ``(B, C, *S)`` float32 batch the caller owns (written in place).
        cfg: ``{"p", "levels", "phase_axis"}`` (``augment.params.motion``).
        g: Generator on ``x.device``.

    Returns:
        ``(x, level)``: the batch and each sample's applied level ``(B,)`` (0: untouched).
    """
    b, dev = x.shape[0], x.device
    if cfg["p"] <= 0:  # draw nothing: switching motion off leaves every other draw as it was
        return x, torch.zeros((b,), dtype=torch.long, device=dev)
    levels = torch.tensor(check_levels(cfg["levels"]), dtype=torch.long, device=dev)
    apply = bernoulli(cfg["p"], (b,), g, dev)
    pick = levels[torch.randint(len(levels), (b,), generator=g, device=dev)]
    level = torch.where(apply, pick, torch.zeros_like(pick))
    x5, _ = _as_5d(x)
    br = _draw(level, x5.shape[2], tuple(x5.shape[-2:]), check_phase_axis(cfg.get("phase_axis", -2)), g)

    def corrupt(rows: Tensor, idx: Tensor) -> Tensor:
        sub, shape = _as_5d(rows)
        return _corrupt(sub, br.take(idx)).reshape(shape)

    return on_subset(x, level > 0, corrupt), level


def motion_augment(image: Tensor, generator: torch.Generator, p: float = 0.3, levels: Sequence[int] = (1, 2, 3),
                   phase_axis: PhaseAxis = "random", return_levels: bool = False
                   ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Respiratory-motion augmentation of a batch: each sample, with probability ``p``, at a
    level drawn uniformly from ``levels``.

    Args:
        image: ``(N, 1, H, W)`` or ``(N, 1, D, H, W)`` float batch (z-scored or not).
        generator: The only source of randomness, on the image's device.
        p: Per-sample probability.
        levels: CMRxMotion levels to draw from (0 allowed: a clean draw).
        phase_axis: -2 (rows), -1 (columns) or "random" per sample.
        return_levels: Also return the applied level per sample ``(N,)`` (0: untouched).

    Returns:
        A new tensor of the input's shape and dtype (samples left alone are bit-identical),
        and the levels if asked.
    """
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"motion: p must be a probability in [0, 1], got {p!r}")
    _as_5d(image)  # shape and dtype checks before any work
    x = image.float() if image.dtype != torch.float32 else image.clone()
    cfg = {"p": float(p), "levels": list(levels), "phase_axis": phase_axis}
    out, level = augment_motion(x, cfg, generator)
    out = out.to(image.dtype)
    return (out, level) if return_levels else out


__all__ = ["MOTION_LEVELS", "PHASE_AXES", "augment_motion", "check_levels", "check_phase_axis", "motion_augment",
           "motion_trace", "simulate_motion"]
