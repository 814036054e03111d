"""Respiratory motion artefacts simulated in k-space (numpy, for data generation).

CMRxMotion grades cine cardiac MR by respiratory motion: 0 none, 1 mild, 2 intermediate,
3 severe. This module reproduces that grading on clean images with the physical cause of
the artefact rather than an image-space blur:

* A 2D slice is acquired one phase-encoding line ``k_y`` after another (sequential order,
  from the most negative to the most positive frequency), so each line sees the object at
  the position it had when that line was read.
* The position follows a respiratory trace: a quasi-periodic waveform
  ``((1 + cos theta) / 2) ** 2`` (it dwells at end-expiration, as breathing does), with
  1.5-3.5 breathing cycles per slice, a phase and an amplitude that wander (irregular
  breathing), plus a small per-line jitter. The peak-to-peak excursion grows with the level,
  see `motion_amplitude`. Each slice gets its own trace (each slice is its own breath-hold).
* A translation by ``d`` pixels is a linear phase ramp ``exp(-2 pi i k d)`` in k-space, so the
  corrupted k-space line ``k_y`` is the clean line times the ramp of that line's displacement.
  The displacement is mostly along the phase-encoding axis with a smaller readout component
  (the heart moves mainly head-to-foot, which an oblique short-axis plane sees in-plane).
* Inverse FFT and magnitude give the corrupted image.

Inconsistency *between* phase-encoding lines shows up as ghosts and blurring along the
phase-encoding axis; within one line the readout is consistent, so the readout direction
only sees a local smear of at most the readout displacement. Line-to-line displacement is
measured relative to the k-space centre (low-frequency weighted mean), so the corrupted
object stays registered with the motion-free label, which CMRxMotion-style training pairs
with it.

The torch version for on-GPU augmentation lives in ``robustseg.augment.motion``; this one is
for building datasets on the CPU.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import scipy.fft

MOTION_LEVELS: Tuple[int, ...] = (0, 1, 2, 3)

# Peak-to-peak respiratory excursion in pixels per CMRxMotion level: 0 none, 1 mild
# (a well-kept breath-hold with some drift), 2 intermediate, 3 severe (free breathing).
_AMPLITUDE_PX: Tuple[float, ...] = (0.0, 2.0, 5.0, 9.0)
# How irregular the breathing is: phase and amplitude wander, as a fraction of a cycle.
IRREGULARITY: Tuple[float, ...] = (0.0, 0.1, 0.25, 0.45)
# Per-line jitter (pixels): small uncorrelated displacements (cardiac/bulk twitches).
JITTER_PX: Tuple[float, ...] = (0.0, 0.15, 0.3, 0.5)
# Largest angle (radians) between the displacement and the phase-encoding axis.
MAX_READOUT_ANGLE = 0.35
# Width (cycles/pixel) of the k-space centre whose displacement defines "no shift".
CENTRE_WIDTH = 0.05


def _check_level(level: int) -> int:
    lvl = int(level)
    if lvl != level or lvl not in MOTION_LEVELS:
        raise ValueError(f"motion level must be one of {MOTION_LEVELS} (CMRxMotion grading), got {level!r}")
    return lvl


def motion_amplitude(level: int) -> float:
    """Nominal peak-to-peak respiratory excursion (pixels) of a motion level.

    The values are 0, 2, 5 and 9 pixels for levels 0 (none), 1 (mild), 2 (intermediate)
    and 3 (severe); at 1.25-1.5 mm pixels that is 0, ~3, ~7 and ~12 mm, the range between a
    held breath and free breathing. Breathing irregularity and jitter grow with the level too.

    Args:
        level: CMRxMotion motion level 0-3.

    Returns:
        The excursion in pixels.

    Raises:
        ValueError: if the level is not 0, 1, 2 or 3.
    """
    return _AMPLITUDE_PX[_check_level(level)]


def _smooth_noise(rng: np.random.Generator, n_traces: int, t: np.ndarray, n_harmonics: int = 3) -> np.ndarray:
    """Smooth zero-mean noise with unit-ish std: a random low-order Fourier series in t."""
    m = np.arange(1, n_harmonics + 1, dtype=np.float64)
    coef = rng.standard_normal((n_traces, 2, n_harmonics)) / np.sqrt(n_harmonics)
    arg = 2.0 * np.pi * m[:, None] * t[None, :]  # (harmonics, lines)
    return coef[:, 0] @ np.cos(arg) + coef[:, 1] @ np.sin(arg)


def respiratory_trace(n_lines: int, level: int, rng: np.random.Generator, n_traces: int = 1) -> np.ndarray:
    """Object displacement (pixels) at each phase-encoding line, in acquisition order.

    Args:
        n_lines: Number of phase-encoding lines of one slice.
        level: CMRxMotion motion level 0-3.
        rng: Random generator (consumed only for levels > 0).
        n_traces: Number of independent traces (one per slice).

    Returns:
        float64 array ``(n_traces, n_lines)``; all zeros for level 0. Not yet centred on the
        k-space centre (`simulate_respiratory_motion` does that).
    """
    lvl = _check_level(level)
    if lvl == 0:
        return np.zeros((n_traces, n_lines))
    t = np.arange(n_lines, dtype=np.float64) / n_lines
    irr = IRREGULARITY[lvl]
    cycles = rng.uniform(1.5, 3.5, size=(n_traces, 1))
    phase0 = rng.uniform(0.0, 2.0 * np.pi, size=(n_traces, 1))
    # Irregular breathing: the phase wanders by up to about irr cycles, the depth by irr.
    theta = 2.0 * np.pi * (cycles * t[None, :] + irr * _smooth_noise(rng, n_traces, t)) + phase0
    depth = np.clip(1.0 + irr * _smooth_noise(rng, n_traces, t), 0.3, None)
    shape = ((1.0 + np.cos(theta)) / 2.0) ** 2
    jitter = JITTER_PX[lvl] * rng.standard_normal((n_traces, n_lines))
    return _AMPLITUDE_PX[lvl] * depth * shape + jitter


def simulate_respiratory_motion(
    image_zyx: np.ndarray, level: int, rng: np.random.Generator, phase_axis: int = -2
) -> np.ndarray:
    """Corrupt magnitude images with k-space respiratory motion of a CMRxMotion level.

    Every 2D slice (the last two axes) is transformed independently with its own
    respiratory trace; see the module docstring for the model.

    Args:
        image_zyx: Real image, ``(Z, Y, X)`` or any ``(..., Y, X)``; the last two axes are
            the image plane.
        level: Motion level 0 (none) to 3 (severe).
        rng: Random generator; not consumed for level 0.
        phase_axis: The phase-encoding axis, one of the last two (``-2``: Y, ``-1``: X);
            the other in-plane axis is the readout.

    Returns:
        For level 0 the input itself, unchanged. Otherwise a new array of the same shape,
        float dtype of the input (float32 for integer input), non-negative.

    Raises:
        ValueError: bad level, fewer than two dimensions, or a phase axis that is not one
            of the last two.
    """
    lvl = _check_level(level)
    if lvl == 0:
        return image_zyx
    img = np.asarray(image_zyx)
    if img.ndim < 2:
        raise ValueError(f"motion needs an image with at least 2 dimensions, got shape {img.shape}")
    ax = phase_axis + img.ndim if phase_axis < 0 else phase_axis
    if ax not in (img.ndim - 2, img.ndim - 1):
        raise ValueError(f"phase_axis must be one of the last two axes (-2 or -1), got {phase_axis}")
    out_dtype = img.dtype if img.dtype.kind == "f" else np.dtype(np.float32)
    # Work with the phase-encoding axis at -2 and the readout at -1.
    work = img if ax == img.ndim - 2 else np.swapaxes(img, -1, -2)
    lead, (n_pe, n_ro) = work.shape[:-2], work.shape[-2:]
    slices = work.reshape((-1, n_pe, n_ro)).astype(np.float32, copy=False)
    n = slices.shape[0]

    k_pe = np.fft.fftfreq(n_pe)  # cycles/pixel, FFT order
    k_ro = np.fft.fftfreq(n_ro)
    # Sequential acquisition: time order is ascending frequency, i.e. fftshift order.
    trace = respiratory_trace(n_pe, lvl, rng, n_traces=n)
    k_sorted = np.fft.fftshift(k_pe)
    w = np.exp(-0.5 * (k_sorted / CENTRE_WIDTH) ** 2)
    trace -= (trace @ w)[:, None] / w.sum()  # keep the k-space centre (the image's position) fixed
    disp = np.fft.ifftshift(trace, axes=-1)  # back to FFT line order
    angle = rng.uniform(-MAX_READOUT_ANGLE, MAX_READOUT_ANGLE, size=(n, 1))
    d_pe = (disp * np.cos(angle))[:, :, None]
    d_ro = (disp * np.sin(angle))[:, :, None]

    # Single precision keeps this cheap; phase errors stay far below the noise.
    phase = (-2.0 * np.pi * (k_pe[None, :, None] * d_pe + k_ro[None, None, :] * d_ro)).astype(np.float32)
    ramp = np.empty(phase.shape, dtype=np.complex64)
    ramp.real, ramp.imag = np.cos(phase), np.sin(phase)  # much faster than a complex exp
    kspace = scipy.fft.fft2(slices, axes=(-2, -1))
    kspace *= ramp
    moved = np.abs(scipy.fft.ifft2(kspace, axes=(-2, -1), overwrite_x=True))
    out = moved.reshape(lead + (n_pe, n_ro)).astype(out_dtype, copy=False)
    if ax != img.ndim - 2:
        out = np.ascontiguousarray(np.swapaxes(out, -1, -2))
    return out


__all__ = ["MOTION_LEVELS", "motion_amplitude", "respiratory_trace", "simulate_respiratory_motion"]
