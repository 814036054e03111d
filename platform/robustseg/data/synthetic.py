"""Synthetic cardiac MR and lung CT phantoms with exact labels, for the demo and the tests.

Cardiac: short-axis cine-like stacks of one subject at ED and ES. The LV is a half-ellipsoid
(cavity largest at the base, smallest at the apex), wrapped in a myocardial ring whose area is
kept between ED and ES (myocardium is incompressible, so it thickens at ES); the RV is a
crescent on the septal side that ends before the apex. Around the heart: a thorax with
subcutaneous fat, lungs, spine, descending aorta and (towards the apex) the liver. MR-like
contrast (bright blood, dark-grey myocardium), a smooth multiplicative bias field, partial-
volume blur and Rician noise. Motion variants apply `simulate_respiratory_motion` to the
noise-free signal and then add the same noise, so the difference between motion levels is
the motion alone; their label stays the motion-free truth, as in CMRxMotion.

CT: an axial chest slab in HU: air, body (fat rim, soft tissue), textured lungs with vessels,
spine, and COVID-like lesions inside the lungs (ground-glass ~ -500 HU, consolidation ~ 0 HU,
or a consolidated core in a ground-glass halo).

Everything is deterministic in ``(seed, subject_index)``: each subject draws from its own
``np.random.default_rng([seed, subject_index, purpose])`` streams, so adding motion levels or
subjects never changes the cases already there.
"""
from __future__ import annotations

from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

from robustseg.data.cases import Case
from robustseg.data.labels import LV, MYO, RV
from robustseg.data.motion import MOTION_LEVELS, simulate_respiratory_motion

PHASES = ("ED", "ES")
# Random-stream purposes, so one subject's anatomy, noise and motion never share draws.
_ANATOMY, _NOISE, _MOTION = 0, 1, 2


def _rng(seed: int, subject_index: int, *purpose: int) -> np.random.Generator:
    """The random stream of one subject and purpose (independent of every other stream)."""
    if int(seed) < 0 or int(subject_index) < 0:
        raise ValueError(f"seed and subject_index must be >= 0, got {seed} and {subject_index}")
    return np.random.default_rng([int(seed), int(subject_index), *purpose])


def _grid(size: Sequence[int], spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """Pixel centres in mm relative to the in-plane centre: x (1, 1, X), y (1, Y, 1), FOV x/y."""
    ny, nx = (int(s) for s in size)
    if ny < 32 or nx < 32:
        raise ValueError(f"phantom size (y, x) must be at least 32x32, got {tuple(size)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values (x, y, z), got {tuple(spacing)}")
    x = ((np.arange(nx) - (nx - 1) / 2.0) * spacing[0]).reshape(1, 1, nx)
    y = ((np.arange(ny) - (ny - 1) / 2.0) * spacing[1]).reshape(1, ny, 1)
    return x, y, nx * spacing[0], ny * spacing[1]


def _ellipse(x, y, cx, cy, a, b, rot=0.0) -> np.ndarray:
    """Inside an ellipse (broadcasting; parameters may be per-slice (Z, 1, 1) arrays)."""
    dx, dy = x - cx, y - cy
    c, s = np.cos(rot), np.sin(rot)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (u / np.maximum(a, 1e-6)) ** 2 + (v / np.maximum(b, 1e-6)) ** 2 <= 1.0


def _origin(size: Sequence[int], spacing: Sequence[float]) -> Tuple[float, float, float]:
    """World origin that puts the in-plane centre at (0, 0) (SimpleITK x, y, z order)."""
    ny, nx = size
    return (-(nx - 1) / 2.0 * spacing[0], -(ny - 1) / 2.0 * spacing[1], 0.0)


# --------------------------------------------------------------------------- cardiac MR
def _heart_parameters(rng: np.random.Generator, fov: float) -> dict:
    """Per-subject anatomy: sizes in mm, scaled down when the field of view is small."""
    scale = min(1.0, fov / 190.0)
    return {
        "r_cav": rng.uniform(20.0, 27.0) * scale,  # basal ED LV cavity radius
        "ecc": rng.uniform(0.0, 0.12),
        "rot": rng.uniform(0.0, np.pi),
        "thick": rng.uniform(6.5, 9.5) * scale,  # ED MYO thickness
        "apex": rng.uniform(1.08, 1.2),  # apex just beyond the last slice
        "rv_width": rng.uniform(11.0, 18.0) * scale,
        "rv_span": rng.uniform(1.2, 1.45),
        "rv_angle": np.pi + 0.3 + rng.normal(0.0, 0.2),  # left of and above the LV
        "rv_extent": rng.uniform(0.72, 0.9),  # RV gone in the apical slices
        "centre": rng.uniform(-8.0, 8.0, size=2) * scale + np.array([8.0, -4.0]) * scale,
        "drift": rng.uniform(-6.0, 6.0, size=2) * scale,
        "ef": rng.uniform(0.5, 0.65),
        "rv_ef": rng.uniform(0.45, 0.6),
        "body": rng.uniform(0.92, 1.04, size=2),
        "tissue": rng.uniform(0.9, 1.1, size=8),  # per-tissue intensity jitter
        "gain": rng.uniform(250.0, 700.0),
        "bias": rng.normal(0.0, 0.15, size=6),
        "noise": rng.uniform(0.02, 0.045),
    }


def _cardiac_phase(p: dict, phase: str, n: int, size, spacing) -> Tuple[np.ndarray, np.ndarray]:
    """Noise-free signal (float32) and canonical labels (uint8) of one phase."""
    x, y, fov_x, fov_y = _grid(size, spacing)
    s = np.linspace(0.0, 1.0, n).reshape(n, 1, 1)  # 0 base ... 1 apex
    prof = np.sqrt(np.clip(1.0 - (s / p["apex"]) ** 2, 0.0, 1.0))
    r = p["r_cav"] * prof
    t = p["thick"] * (1.0 - 0.25 * s)  # the apical wall is thinner
    w = p["rv_width"] * np.clip(1.0 - s / p["rv_extent"], 0.0, 1.0) ** 0.7
    span = p["rv_span"]
    if phase == "ES":
        r_ed, big_ed = r, r + t
        r = r * np.sqrt(1.0 - p["ef"])
        t = np.sqrt(r**2 + big_ed**2 - r_ed**2) - r  # same MYO area: thicker at ES
        w = w * (1.0 - p["rv_ef"]) ** 0.8
        span = span * (1.0 - p["rv_ef"]) ** 0.2
    cx = p["centre"][0] + p["drift"][0] * s
    cy = p["centre"][1] + p["drift"][1] * s
    a, b = r * (1 + p["ecc"]), r * (1 - p["ecc"])
    cavity = _ellipse(x, y, cx, cy, a, b, p["rot"])
    epi = _ellipse(x, y, cx, cy, a + t, b + t, p["rot"])
    # RV: an ellipse overlapping the LV on the septal side, minus the LV; it spans from
    # just past the LV centre to the free wall at w beyond the epicardium, so what is left
    # is a crescent hugging the septum.
    big = r + t
    off = (0.8 * big + w) / 2.0
    rv_a, rv_b = off + 0.2 * big, span * big
    rcx, rcy = cx + off * np.cos(p["rv_angle"]), cy + off * np.sin(p["rv_angle"])
    has_rv = w >= 3.0
    rv_ell = _ellipse(x, y, rcx, rcy, rv_a, rv_b, p["rv_angle"]) & has_rv
    rv = rv_ell & ~epi
    rv_wall = _ellipse(x, y, rcx, rcy, rv_a + 3.0, rv_b + 3.0, p["rv_angle"]) & has_rv & ~rv_ell & ~epi

    label = np.zeros((n,) + tuple(size), dtype=np.uint8)
    label[rv] = RV
    label[epi] = MYO
    label[cavity] = LV

    # Thorax around the heart (image left = patient right, anterior up); later paint wins.
    ti = p["tissue"]
    img = np.zeros(label.shape, dtype=np.float32)

    def paint(mask: np.ndarray, value: float) -> None:
        img[np.broadcast_to(mask, img.shape)] = value

    bx, by = 0.46 * fov_x * p["body"][0], 0.36 * fov_y * p["body"][1]
    inner = _ellipse(x, y, 0.0, 0.05 * fov_y, bx - 8.0, by - 8.0)
    paint(_ellipse(x, y, 0.0, 0.05 * fov_y, bx, by), 0.75 * ti[0])  # subcutaneous fat: bright in bSSFP
    paint(inner, 0.33 * ti[1])  # muscle and mediastinum
    for side in (-1.0, 1.0):
        paint(_ellipse(x, y, side * 0.3 * fov_x, -0.04 * fov_y, 0.17 * fov_x, 0.27 * fov_y, side * 0.15) & inner,
              0.05 * ti[2])  # lungs
    # The liver dome rises into the apical slices.
    paint(_ellipse(x, y, -0.22 * fov_x, 0.3 * fov_y, 0.3 * fov_x * s, 0.16 * fov_y * s) & inner & (s > 0.35),
          0.36 * ti[3])
    paint(_ellipse(x, y, 0.0, 0.31 * fov_y, 11.0, 11.0) & inner, 0.22 * ti[4])  # vertebral body
    paint(_ellipse(x, y, 0.1 * fov_x, 0.22 * fov_y, 9.0, 9.0) & inner, 0.85 * ti[5])  # descending aorta
    paint(rv_wall, 0.3 * ti[6])
    paint(label == RV, 0.95 * ti[7])
    paint(label == MYO, 0.28 * ti[6])
    paint(label == LV, 1.0)

    # Partial volume at edges, then a smooth coil-sensitivity bias.
    img = gaussian_filter(img, sigma=(0.0, 0.6, 0.6))
    xn, yn = x / (fov_x / 2.0), y / (fov_y / 2.0)
    c = p["bias"]
    log_bias = c[0] * xn + c[1] * yn + c[2] * xn * yn + 0.5 * (c[3] * xn**2 + c[4] * yn**2) + c[5] * (s - 0.5)
    bias = np.exp(log_bias)
    return (img * bias * p["gain"]).astype(np.float32), label


def _rician(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise ``noise = (real, imaginary)``.

    This is Rician noise, Rayleigh in the air, as in magnitude MR images.
    """
    return np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2).astype(np.float32)


def _cardiac_subject_cases(
    subject_index: int, seed: int, motion_levels: Sequence[int], n_slices: Optional[int], size, spacing
) -> List[Case]:
    """ED then ES cases of one subject, one per motion level (in the given order)."""
    size = (int(size[0]), int(size[1]))
    spacing = tuple(float(v) for v in spacing)
    _, _, fov_x, fov_y = _grid(size, spacing)
    rng = _rng(seed, subject_index, _ANATOMY)
    drawn = int(rng.integers(8, 13))  # always drawn, so n_slices does not change the anatomy
    n = drawn if n_slices is None else int(n_slices)
    if n < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    p = _heart_parameters(rng, min(fov_x, fov_y))
    sid = f"syn{subject_index:04d}"
    cases: List[Case] = []
    for phase_i, phase in enumerate(PHASES):
        signal, label = _cardiac_phase(p, phase, n, size, spacing)
        # One noise realisation for every level: levels differ by motion alone.
        noise = _rng(seed, subject_index, _NOISE, phase_i).standard_normal((2,) + signal.shape, dtype=np.float32)
        noise *= np.float32(p["noise"] * p["gain"])
        for level in motion_levels:
            motion_rng = _rng(seed, subject_index, _MOTION, phase_i, level)
            image = _rician(simulate_respiratory_motion(signal, level, motion_rng, phase_axis=-2), noise)
            cid = f"{sid}_{phase}" + (f"_m{level}" if level > 0 else "")
            cases.append(
                Case(
                    case_id=cid,
                    subject_id=sid,
                    image=image,
                    label=label.copy(),
                    spacing=spacing,
                    origin=_origin(size, spacing),
                    modality="MR",
                    task="cardiac",
                    phase=phase,
                    motion_level=int(level),
                    dataset="synthetic",
                    source_path=f"synthetic://cardiac/{cid}",
                    meta={
                        "generator": "robustseg.data.synthetic",
                        "seed": int(seed),
                        "subject_index": int(subject_index),
                        "label_convention": "canonical_cardiac",
                        "nominal_ef": round(float(p["ef"]), 4),
                        "phase_encoding_axis": "y",
                    },
                )
            )
    return cases


def _check_levels(motion_levels: Sequence[int]) -> Tuple[int, ...]:
    levels = tuple(sorted({int(v) for v in motion_levels}))
    bad = [v for v in levels if v not in MOTION_LEVELS]
    if bad or not levels:
        raise ValueError(f"motion_levels must be a non-empty subset of {MOTION_LEVELS}, got {tuple(motion_levels)}")
    return levels


def make_cardiac_subject(
    subject_index: int,
    rng_seed: int,
    n_slices: Optional[int] = None,
    size: Tuple[int, int] = (128, 128),
    spacing: Tuple[float, float, float] = (1.5, 1.5, 8.0),
) -> List[Case]:
    """The motion-free ED and ES short-axis stacks of one synthetic subject.

    Args:
        subject_index: Subject number; the subject id is ``f"syn{subject_index:04d}"``.
        rng_seed: Dataset seed; ``(rng_seed, subject_index)`` fixes everything.
        n_slices: Slices base to apex; None draws 8-12 per subject.
        size: In-plane array size ``(Y, X)`` (at least 32x32).
        spacing: Voxel size in mm ``(x, y, z)``.

    Returns:
        ``[ED case, ES case]``: float32 image and uint8 canonical label (1 LV, 2 MYO, 3 RV),
        both ``(Z, Y, X)``, motion level 0.
    """
    return _cardiac_subject_cases(subject_index, rng_seed, (0,), n_slices, size, spacing)


def iter_cardiac_cases(
    n_subjects: int, seed: int = 0, motion_levels: Sequence[int] = (0,), size: Tuple[int, int] = (128, 128)
) -> Iterator[Case]:
    """Lazily yield `make_cardiac_dataset`'s cases, one subject at a time."""
    levels = _check_levels(motion_levels)
    if int(n_subjects) < 0:
        raise ValueError(f"n_subjects must be >= 0, got {n_subjects}")
    for i in range(int(n_subjects)):
        yield from _cardiac_subject_cases(i, int(seed), levels, None, size, (1.5, 1.5, 8.0))


def make_cardiac_dataset(
    n_subjects: int, seed: int = 0, motion_levels: Sequence[int] = (0,), size: Tuple[int, int] = (128, 128)
) -> List[Case]:
    """A synthetic cine CMR dataset with respiratory-motion variants.

    Args:
        n_subjects: Number of subjects (indices 0 .. n_subjects - 1).
        seed: Dataset seed.
        motion_levels: CMRxMotion levels to produce; 0 is the clean image. Each level > 0 is
            a corrupted copy (case id suffix ``_m<level>``) with the clean label.
        size: In-plane array size ``(Y, X)``.

    Returns:
        Per subject, ED then ES, each at every requested level (ascending); all of a
        subject's cases share its ``subject_id`` so folds keep them together.
    """
    return list(iter_cardiac_cases(n_subjects, seed, motion_levels, size))


# --------------------------------------------------------------------------- lung CT
class CTPhantom(NamedTuple):
    """A CT phantom's arrays, ``(Z, Y, X)``: image in HU, label, and the true lung mask."""

    image: np.ndarray
    label: np.ndarray
    lungs: np.ndarray


def _texture(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation (in-plane correlation ``sigma``)."""
    field = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=(0.5, sigma, sigma))
    return field / max(float(field.std()), 1e-6)


def ct_phantom(
    subject_index: int,
    rng_seed: int,
    n_slices: Optional[int] = None,
    size: Tuple[int, int] = (128, 128),
    spacing: Tuple[float, float, float] = (1.0, 1.0, 5.0),
    multiclass: bool = False,
) -> CTPhantom:
    """The arrays of one synthetic chest CT, with the lung mask the lesions were drawn in.

    Args:
        subject_index: Subject number.
        rng_seed: Dataset seed; ``(rng_seed, subject_index)`` fixes everything.
        n_slices: Axial slices; None draws 8-12.
        size: In-plane array size ``(Y, X)``.
        spacing: Voxel size in mm ``(x, y, z)``.
        multiclass: Label 1 ground-glass / 2 consolidation instead of 1 = any lesion.

    Returns:
        `CTPhantom` with the float32 HU image, uint8 label and boolean lung mask.
    """
    x, y, fov_x, fov_y = _grid(size, spacing)
    rng = _rng(rng_seed, subject_index, _ANATOMY)
    drawn = int(rng.integers(8, 13))
    n = drawn if n_slices is None else int(n_slices)
    if n < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    shape = (n,) + (int(size[0]), int(size[1]))
    s = np.linspace(0.0, 1.0, n).reshape(n, 1, 1)
    g = rng.uniform(0.92, 1.04, size=6)

    bx, by = 0.45 * fov_x * g[0], 0.34 * fov_y * g[1]
    body = np.broadcast_to(_ellipse(x, y, 0.0, 0.0, bx, by), shape)
    fat = rng.uniform(4.0, 10.0)
    inner = np.broadcast_to(_ellipse(x, y, 0.0, 0.0, bx - fat, by - fat), shape)
    lung_scale = 0.7 + 0.3 * np.sin(np.pi * s)  # smaller towards the apex and the diaphragm
    heart = _ellipse(x, y, 0.05 * fov_x, -0.02 * fov_y, 0.13 * fov_x * g[2], 0.12 * fov_y * g[2])
    spine_c = 0.24 * fov_y
    spine = _ellipse(x, y, 0.0, spine_c, 0.07 * fov_x, 0.07 * fov_x)
    lungs = np.zeros(shape, dtype=bool)
    for side, gi in ((-1.0, g[3]), (1.0, g[4])):
        lungs |= _ellipse(
            x, y, side * 0.2 * fov_x, -0.01 * fov_y, 0.17 * fov_x * gi * lung_scale, 0.25 * fov_y * gi * lung_scale,
            side * 0.1,
        )
    lungs &= inner & ~heart & ~_ellipse(x, y, 0.0, spine_c, 0.1 * fov_x, 0.1 * fov_x)

    img = np.full(shape, -1000.0, dtype=np.float32)
    img[body] = -100.0  # subcutaneous fat
    img[inner] = 40.0  # muscle, mediastinum
    img[np.broadcast_to(spine, shape)] = 700.0  # cortical bone
    img[np.broadcast_to(_ellipse(x, y, 0.0, spine_c, 0.05 * fov_x, 0.05 * fov_x), shape)] = 300.0  # marrow
    lung_hu = -850.0 + 25.0 * _texture(rng, shape, 2.0)
    vessels = _texture(rng, shape, 1.0) > 2.3  # sparse bright dots: vessels cut across
    img[lungs] = np.where(vessels, -80.0, lung_hu)[lungs]

    label = np.zeros(shape, dtype=np.uint8)
    lung_idx = np.flatnonzero(lungs)
    zz = np.arange(n).reshape(n, 1, 1) * spacing[2]
    for _ in range(int(rng.integers(1, 5))):
        kind = str(rng.choice(["ggo", "ggo", "consolidation", "mixed"]))
        cz, cy_i, cx_i = np.unravel_index(rng.choice(lung_idx), shape)  # centre inside a lung
        c = (x[0, 0, cx_i], y[0, cy_i, 0], zz[cz, 0, 0])
        rx, ry = rng.uniform(7.0, 24.0, size=2) * min(1.0, fov_x / 128.0)
        rz = rng.uniform(5.0, 15.0)
        d = np.sqrt(((x - c[0]) / rx) ** 2 + ((y - c[1]) / ry) ** 2 + ((zz - c[2]) / rz) ** 2)
        # Irregular margin; the clip keeps the centre voxel inside, so no lesion is empty.
        d = d + 0.3 * np.clip(_texture(rng, shape, 3.0), -1.5, 1.5)
        ggo = (d < 1.0) & lungs & (label == 0)
        cons = (d < (1.0 if kind == "consolidation" else 0.5)) & lungs & (kind != "ggo")
        label[ggo] = 1
        label[cons] = 2
    img[label == 1] = (-500.0 + 40.0 * _texture(rng, shape, 1.5))[label == 1]
    img[label == 2] = (0.0 + 20.0 * _texture(rng, shape, 1.5))[label == 2]

    img = gaussian_filter(img, sigma=(0.0, 0.5, 0.5))
    img += rng.uniform(8.0, 20.0) * rng.standard_normal(shape, dtype=np.float32)
    np.clip(img, -1024.0, 3071.0, out=img)
    if not multiclass:
        label = (label > 0).astype(np.uint8)
    return CTPhantom(img.astype(np.float32), label, lungs)


def make_ct_subject(
    subject_index: int,
    rng_seed: int,
    n_slices: Optional[int] = None,
    size: Tuple[int, int] = (128, 128),
    spacing: Tuple[float, float, float] = (1.0, 1.0, 5.0),
    multiclass: bool = False,
) -> Case:
    """One synthetic chest CT with lung-infection labels.

    Args:
        subject_index: Subject number; the id is ``f"synct{subject_index:04d}"``.
        rng_seed: Dataset seed; ``(rng_seed, subject_index)`` fixes everything.
        n_slices: Axial slices; None draws 8-12.
        size: In-plane array size ``(Y, X)``.
        spacing: Voxel size in mm ``(x, y, z)``.
        multiclass: Labels 1 ground-glass / 2 consolidation (task "lung_multiclass")
            instead of 1 = any infection (task "lung_binary").

    Returns:
        A Case with a float32 HU image and uint8 label, ``(Z, Y, X)``, modality "CT".
    """
    spacing = tuple(float(v) for v in spacing)
    size = (int(size[0]), int(size[1]))
    ph = ct_phantom(subject_index, rng_seed, n_slices, size, spacing, multiclass)
    sid = f"synct{subject_index:04d}"
    return Case(
        case_id=sid,
        subject_id=sid,
        image=ph.image,
        label=ph.label,
        spacing=spacing,
        origin=_origin(size, spacing),
        modality="CT",
        task="lung_multiclass" if multiclass else "lung_binary",
        phase="",
        motion_level=0,
        dataset="synthetic_ct",
        source_path=f"synthetic://ct/{sid}",
        meta={
            "generator": "robustseg.data.synthetic",
            "seed": int(rng_seed),
            "subject_index": int(subject_index),
            "label_convention": "lung_multiclass" if multiclass else "lung_binary",
        },
    )


def iter_ct_cases(n_subjects: int, seed: int = 0, multiclass: bool = False) -> Iterator[Case]:
    """Lazily yield `make_ct_dataset`'s cases, one subject at a time."""
    if int(n_subjects) < 0:
        raise ValueError(f"n_subjects must be >= 0, got {n_subjects}")
    for i in range(int(n_subjects)):
        yield make_ct_subject(i, int(seed), multiclass=bool(multiclass))


def make_ct_dataset(n_subjects: int, seed: int = 0, multiclass: bool = False) -> List[Case]:
    """A synthetic lung-infection CT dataset.

    Args:
        n_subjects: Number of subjects.
        seed: Dataset seed.
        multiclass: Ground-glass / consolidation labels instead of binary infection.

    Returns:
        One case per subject (128x128 in-plane, 1 x 1 x 5 mm voxels).
    """
    return list(iter_ct_cases(n_subjects, seed, multiclass))


__all__ = [
    "CTPhantom",
    "ct_phantom",
    "iter_cardiac_cases",
    "iter_ct_cases",
    "make_cardiac_dataset",
    "make_cardiac_subject",
    "make_ct_dataset",
    "make_ct_subject",
]
