"""Augmentation presets, per-transform overrides, and the `Augmenter` the engine calls.

``AugmentConfig.preset`` picks a full parameter set; ``AugmentConfig.params`` overrides it by
transform name and key, e.g. ``{"rotation": {"p": 0.5, "degrees": 30}, "mirror": {"p": 0}}``.
Unknown names or keys raise `ConfigError` listing the valid ones.

Presets:

* ``nnunet``: nnU-Net v2's default training augmentation (``nnUNetTrainer.
  get_training_transforms``), value by value, documented in `NNUNET` below.
* ``light``: the thesis's (seed 002, §3.3) small augmentation for lung CT: rotation within
  ±3° (patient pose on the table), a small elastic deformation (breath-hold shape change),
  random gamma (scanner differences) and Gaussian noise. No flips: a patient lies on the
  table face up, so a flipped or strongly rotated lung is an image the network never meets.
* ``none``: identity (every probability 0); overrides can still switch single transforms on.
* ``cardiac``: ``nnunet`` plus respiratory motion on half of the samples (levels 2-3).
* ``auto`` (the default): ``cardiac`` for the cardiac MR plan (``cmr``), else ``nnunet``.

``motion`` (k-space respiratory motion, `robustseg.augment.motion`) is not an nnU-Net
transform and is off in every preset but ``cardiac``; other presets switch it on with e.g.
``{"motion": {"p": 0.3, "levels": [1, 2, 3]}}``. It runs first: the artefact happens at
acquisition, before the pose and intensity variation the other transforms stand for.

Value formats: probabilities in [0, 1]; ranges ``[lo, hi]`` (a single number means the
fixed value); ``degrees`` a number ``d`` meaning U(-d, d) or a range, e.g. ``[90, 90]``.
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from robustseg.augment.intensity import augment_intensity
from robustseg.augment.motion import augment_motion, check_levels, check_phase_axis
from robustseg.augment.spatial import augment_spatial, mirror, source_margin
from robustseg.config import AugmentConfig
from robustseg.errors import ConfigError
from robustseg.registry import SECTION_CHECKS

Params = Dict[str, Dict[str, Any]]

# nnU-Net v2 defaults (nnUNetTrainer.get_training_transforms and
# configure_rotation_dummyDA_mirroring_and_inital_patch_size), with each nnU-Net value.
NNUNET: Params = {
    # Out-of-patch fill of the image; nnU-Net pads with 0 (the z-scored mean).
    "spatial": {"image_pad": "zeros"},
    # p_rotation=0.2; 2D: U(-180°, 180°) (nnU-Net uses ±15° only when the patch aspect ratio
    # exceeds 1.5); anisotropic 3D ("dummy 2D"): in-plane ±180°, nothing out of plane
    # (isotropic 3D in nnU-Net: ±30° about every axis -- set out_of_plane_degrees: 30).
    "rotation": {"p": 0.2, "degrees": 180.0, "out_of_plane_degrees": 0.0},
    # p_scaling=0.2, scaling=(0.7, 1.4), same factor on every axis; > 1 zooms out.
    "scaling": {"p": 0.2, "range": [0.7, 1.4]},
    # p_elastic_deform=0: nnU-Net v2 trains without elastic deformation.
    "elastic": {"p": 0.0, "max_displacement": [0.0, 4.0], "control_points": 6},
    # GaussianNoiseTransform p=0.1, noise_variance=(0, 0.1): nnU-Net passes the drawn value
    # as the normal's scale, so it is a standard deviation U(0, 0.1) in z-score units.
    "noise": {"p": 0.1, "std": [0.0, 0.1]},
    # GaussianBlurTransform p=0.2, blur_sigma=(0.5, 1.0) per channel and axis, p_per_channel=0.5.
    "blur": {"p": 0.2, "sigma": [0.5, 1.0], "p_per_channel": 0.5},
    # MultiplicativeBrightnessTransform p=0.15, BGContrast((0.75, 1.25)).
    "brightness": {"p": 0.15, "range": [0.75, 1.25]},
    # ContrastTransform p=0.15, BGContrast((0.75, 1.25)), preserve_range=True.
    "contrast": {"p": 0.15, "range": [0.75, 1.25], "preserve_range": True},
    # SimulateLowResolutionTransform p=0.25, scale=(0.5, 1), p_per_channel=0.5, axes
    # synchronised; the slice axis is ignored for anisotropic 3D (ignore_axes=(0,)).
    "lowres": {"p": 0.25, "zoom": [0.5, 1.0], "p_per_channel": 0.5, "slice_axis": False},
    # GammaTransform p=0.1, BGContrast((0.7, 1.5)), p_invert_image=1, p_retain_stats=1.
    "inverted_gamma": {"p": 0.1, "gamma": [0.7, 1.5], "retain_stats": True},
    # GammaTransform p=0.3, BGContrast((0.7, 1.5)), p_invert_image=0, p_retain_stats=1.
    "gamma": {"p": 0.3, "gamma": [0.7, 1.5], "retain_stats": True},
    # MirrorTransform on every spatial axis (2D: (0, 1), 3D: (0, 1, 2)), p=0.5 per axis.
    # axes: null = all spatial axes.
    "mirror": {"p": 0.5, "axes": None},
    # Not nnU-Net's: respiratory motion, off here and therefore in every preset (see above).
    # phase_axis "random": after resampling the phase-encoding direction is unknown.
    "motion": {"p": 0.0, "levels": [1, 2, 3], "phase_axis": "random"},
}
# Mixup is configured by AugmentConfig.mixup (per-batch probability) and .mixup_alpha, and
# applied by the regime after one-hot encoding (see mixup.py).

_OFF: Params = {name: ({**p, "p": 0.0} if "p" in p else dict(p)) for name, p in NNUNET.items()}

LIGHT: Params = copy.deepcopy(_OFF)
LIGHT["rotation"].update(p=0.5, degrees=3.0)  # thesis: "small random rotation between [-3, 3] degree"
LIGHT["elastic"].update(p=0.3, max_displacement=[0.0, 3.0])  # "small elastic": <= 3 px, smooth
LIGHT["gamma"].update(p=0.3)  # "random gamma correction" (nnU-Net's range)
LIGHT["noise"].update(p=0.2)  # "random gaussian noise", std U(0, 0.1)

# nnU-Net plus the CMRxMotion paper's respiratory-motion augmentation: half of the samples get
# k-space motion at level 2 or 3 (intermediate, severe). Cheap (~5 ms per 16 x 128 x 128 batch on
# one CPU core) and the reason a cardiac model keeps its Dice under breathing motion. Measured on
# ACDC fold 0 at the issue-16 budget (benchmarks/accuracy_budget.py, AMD EPYC, bf16): p 0.3 at
# levels 1-3 lost 0.141 Dice from clean to severe motion, p 0.5 at levels 2-3 0.113 (severe
# +0.018, clean -0.010) with training seed 0 but 0.139 with seed 1, so the two settings are
# within seed noise of each other; p 0.7 at levels 2-3 lost 0.115 with clean and severe both
# lower; p 0.5 at level 3 only lost 0.118 (seed 0). Level 1 is close enough to clean that the
# model needs no examples of it.
CARDIAC: Params = copy.deepcopy(NNUNET)
CARDIAC["motion"].update(p=0.5, levels=[2, 3])

PRESETS: Dict[str, Params] = {"nnunet": NNUNET, "cardiac": CARDIAC, "light": LIGHT, "none": _OFF}
#: ``augment.preset: auto`` (the default) picks by preprocessing plan: cardiac MR gets motion.
AUTO_PRESET_BY_PLAN: Dict[str, str] = {"cmr": "cardiac"}


def resolve_preset(preset: str, plan: Optional[str] = None) -> str:
    """The preset ``auto`` stands for under ``plan`` (``cardiac`` for cmr, else ``nnunet``); others unchanged."""
    if preset != "auto":
        return preset
    return AUTO_PRESET_BY_PLAN.get(plan or "", "nnunet")


# --------------------------------------------------------------------------- validation
def _number(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"{where} must be a number, got {v!r}")
    return float(v)


def _prob(where: str, v: Any) -> float:
    x = _number(where, v)
    if not 0.0 <= x <= 1.0:
        raise ConfigError(f"{where} must be a probability in [0, 1], got {v!r}")
    return x


def _range(lo_min: float, hi_max: float = float("inf"), open_lo: bool = False) -> Callable[[str, Any], List[float]]:
    def check(where: str, v: Any) -> List[float]:
        pair = [v, v] if isinstance(v, numbers.Real) and not isinstance(v, bool) else v
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"{where} must be [low, high] or a number, got {v!r}")
        lo, hi = (_number(where, x) for x in pair)
        bad_lo = lo <= lo_min if open_lo else lo < lo_min
        if lo > hi or bad_lo or hi > hi_max:
            bound = f"{'(' if open_lo else '['}{lo_min}, {hi_max}]"
            raise ConfigError(f"{where} must satisfy low <= high within {bound}, got {v!r}")
        return [lo, hi]

    return check


def _angle(where: str, v: Any) -> List[float]:
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        d = _number(where, v)
        if d < 0:
            raise ConfigError(f"{where}: a single angle means U(-d, d) and must be >= 0, got {v!r}")
        v = [-d, d]
    return _range(-360.0, 360.0)(where, v)


def _count(where: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ConfigError(f"{where} must be an integer >= 2, got {v!r}")
    return v


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where} must be true or false, got {v!r}")
    return v


def _motion_levels(where: str, v: Any) -> List[int]:
    try:
        return list(check_levels(v))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _phase_axis(where: str, v: Any) -> Union[int, str]:
    try:
        return check_phase_axis(v)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _pad(where: str, v: Any) -> Union[str, float]:
    if v in ("zeros", "border", "reflection", "min"):
        return v
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return float(v)
    raise ConfigError(f"{where} must be zeros, border, reflection, min or a number, got {v!r}")


def _axes(where: str, v: Any) -> Optional[List[int]]:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in v):
        raise ConfigError(f"{where} must be null (all axes) or a list of spatial axis indices, got {v!r}")
    if len(set(v)) != len(v):
        raise ConfigError(f"{where} has repeated axes: {v!r}")
    return list(v)


_CHECKS: Dict[str, Dict[str, Callable[[str, Any], Any]]] = {
    "spatial": {"image_pad": _pad},
    "rotation": {"p": _prob, "degrees": _angle, "out_of_plane_degrees": _angle},
    "scaling": {"p": _prob, "range": _range(0.0, open_lo=True)},
    "elastic": {"p": _prob, "max_displacement": _range(0.0), "control_points": _count},
    "noise": {"p": _prob, "std": _range(0.0)},
    "blur": {"p": _prob, "sigma": _range(0.0, open_lo=True), "p_per_channel": _prob},
    "brightness": {"p": _prob, "range": _range(0.0)},
    "contrast": {"p": _prob, "range": _range(0.0), "preserve_range": _bool},
    "lowres": {"p": _prob, "zoom": _range(0.0, 1.0, open_lo=True), "p_per_channel": _prob, "slice_axis": _bool},
    "inverted_gamma": {"p": _prob, "gamma": _range(0.0, open_lo=True), "retain_stats": _bool},
    "gamma": {"p": _prob, "gamma": _range(0.0, open_lo=True), "retain_stats": _bool},
    "mirror": {"p": _prob, "axes": _axes},
    "motion": {"p": _prob, "levels": _motion_levels, "phase_axis": _phase_axis},
}


def resolve_params(preset: str, overrides: Optional[Mapping[str, Any]] = None) -> Params:
    """The preset's parameters with ``overrides`` applied, every value checked and normalised.

    Args:
        preset: ``nnunet``, ``light`` or ``none``.
        overrides: ``{transform: {key: value}}``, as in ``AugmentConfig.params``.

    Raises:
        ConfigError: unknown preset, transform name or key (listing the valid ones), or a
            value of the wrong type or out of range.
    """
    preset = resolve_preset(preset)
    if preset not in PRESETS:
        raise ConfigError(f"augment.preset: unknown preset {preset!r}; valid: {', '.join(sorted([*PRESETS, 'auto']))}")
    merged = copy.deepcopy(PRESETS[preset])
    for name, keys in (overrides or {}).items():
        if name not in _CHECKS:
            raise ConfigError(f"augment.params: unknown transform {name!r}; valid: {list(_CHECKS)}")
        if not isinstance(keys, Mapping):
            raise ConfigError(f"augment.params.{name} must be a mapping of keys to values, got {keys!r}")
        unknown = [k for k in keys if k not in _CHECKS[name]]
        if unknown:
            raise ConfigError(f"augment.params.{name}: unknown key(s) {unknown}; valid keys: {list(_CHECKS[name])}")
        merged[name].update(keys)
    return {name: {k: check(f"augment.params.{name}.{k}", merged[name][k]) for k, check in keys.items()}
            for name, keys in _CHECKS.items()}


# --------------------------------------------------------------------------- the augmenter
def _check_inputs(image: Tensor, label: Tensor, generator: torch.Generator, nd: int) -> None:
    if not image.is_floating_point():
        raise ValueError(f"augment: image must be floating point, got {image.dtype}")
    if image.ndim != nd + 2:
        raise ValueError(f"augment: expected image (B, C, *S) with {nd} spatial dims, got shape {tuple(image.shape)}")
    if label.is_floating_point() or label.dtype == torch.bool or label.is_complex():
        raise ValueError(f"augment: label must be an integer tensor, got {label.dtype}")
    if label.shape != (image.shape[0], 1, *image.shape[2:]):
        raise ValueError(f"augment: label shape {tuple(label.shape)} does not match image {tuple(image.shape)} "
                         "(expected (B, 1, *S))")
    if label.device != image.device or generator.device.type != image.device.type:
        raise ValueError(f"augment: image on {image.device}, label on {label.device}, generator on "
                         f"{generator.device}: all must share the training device")


@dataclass
class Augmenter:
    """Batched augmentation of ``(image, label)`` on the tensors' device.

    Build it with `build_augmenter`. Construction only stores resolved parameters, so it is
    cheap; all randomness comes from the generator passed to each call.

    Args:
        preset: Preset name (for ``describe``).
        spatial_dims: 2 or 3.
        params: Resolved parameters (`resolve_params`), mirror axes filled in.
        mixup_p: Per-batch mixup probability (``AugmentConfig.mixup``), for ``describe``.
        mixup_alpha: Beta(alpha, alpha) of mixup (``AugmentConfig.mixup_alpha``), likewise.
        out_shape: Training patch: a larger input (a source patch, see `source_margin`) leaves
            as its centre window of this shape, resampled from the whole source by the
            spatial step; motion, which runs first, corrupts the whole source. An input of
            this shape or smaller is augmented at its own shape.
        slice_channels: The channels are neighbouring slices (2.5D, ``model.slice_context``):
            motion gives each its own breath-hold (its own breathing trace, one level per
            sample), as a cine stack is acquired, while the intensity transforms draw once per
            sample for all of them (one scanner setting); otherwise channels are modalities of
            one acquisition (shared motion, per-channel intensity draws, as nnU-Net).
    """

    preset: str
    spatial_dims: int
    params: Params
    mixup_p: float = 0.0
    mixup_alpha: float = 0.0
    out_shape: Optional[Tuple[int, ...]] = None
    slice_channels: bool = False
    last_info: Optional[Dict[str, Tensor]] = field(default=None, repr=False, compare=False)

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator,
                 return_info: bool = False) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Dict[str, Tensor]]]:
        """Augment a batch: motion -> spatial -> intensity -> mirroring (nnU-Net's order after motion).

        Args:
            image: ``(B, C, *S)`` float image on the training device.
            label: ``(B, 1, *S)`` integer label (any integer dtype; returned unchanged in dtype).
            generator: ``torch.Generator`` on the same device: the only source of randomness.
            return_info: Also return the per-transform "applied" masks (also kept in
                ``self.last_info``): ``(B,)`` bool per transform, ``mirror`` is ``(B, n_axes)``.

        Returns:
            New ``(image, label)`` tensors (never views of the inputs) of the input shapes
            (cut to ``out_shape``), dtypes and device, plus ``info`` if asked. Samples that no
            transform picked are bit-identical to the input (to its centre window).
        """
        _check_inputs(image, label, generator, self.spatial_dims)
        dtype = image.dtype
        # One copy up front: the transforms then write their selected rows in place.
        # Half precision loses too much in gamma's pow and the grid; compute in float32.
        x = image.float() if dtype in (torch.float16, torch.bfloat16) else image.clone()
        y = label.clone()
        info: Dict[str, Tensor] = {}
        x, level = self._motion(x, self.params["motion"], generator)
        info["motion"] = level > 0
        x, y = self._after_motion(x, y, generator, info)
        self.last_info = info
        x = x.to(dtype)
        return (x, y, info) if return_info else (x, y)

    def _motion(self, x: Tensor, cfg: Mapping[str, Any], generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """The motion step on ``x`` (written in place); slice channels become the slice axis."""
        if self.slice_channels and x.dim() == 4:
            _, level = augment_motion(x.unsqueeze(1), cfg, generator)  # (B, 1, S, H, W): a view of x
            return x, level
        return augment_motion(x, cfg, generator)

    def _after_motion(self, x: Tensor, y: Tensor, generator: torch.Generator,
                      info: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """Spatial -> intensity -> mirroring: every step after motion, in nnU-Net's order."""
        x, y = augment_spatial(x, y, self.params, generator, info, self.out_shape)
        x = augment_intensity(x, self.params, generator, info, shared_channels=self.slice_channels)
        return mirror(x, y, self.params["mirror"], generator, info)

    def motion_pairs(self, image: Tensor, label: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """Clean and motion-corrupted views of the same patches, for a consistency loss.

        Every other sample of the batch (``image[::2]``: a strided pick keeps the sampler's
        share of foreground-centred patches) is taken twice: the first half of the output is
        the clean view, the second half the same source corrupted by respiratory motion at a
        level drawn from ``params.motion.levels`` (always applied: ``p`` is the pairing
        itself, half the batch). Both halves then get the *same* spatial, intensity and
        mirror draws (the generator's state is replayed), so sample ``i`` and ``i + n`` differ
        only by the motion artefact and share one label. The output has ``2 * ceil(B / 2)``
        samples: the input's batch size when it is even.

        Returns:
            ``(image, label)`` of ``(2n, ...)``: ``[clean; moved]`` and ``[label; label]``.
        """
        _check_inputs(image, label, generator, self.spatial_dims)
        dtype = image.dtype
        x = image[::2].float().clone()
        y = label[::2].clone()
        moved, _ = self._motion(x.clone(), {**self.params["motion"], "p": 1.0}, generator)
        state = generator.get_state()
        views, labels = [], []
        for src in (x, moved):
            generator.set_state(state)  # the same draws for both views
            v, lab = self._after_motion(src, y.clone(), generator, {})
            views.append(v)
            labels.append(lab)
        return torch.cat(views).to(dtype), torch.cat(labels)

    def source_margin(self, patch: Sequence[int]) -> List[int]:
        """In-plane margin per side of the source patch that rotation and scaling need (2D)."""
        return source_margin(self.params["rotation"], self.params["scaling"], patch)

    def describe(self) -> Dict[str, Any]:
        """Resolved parameters as plain Python values (for MLflow params/logs)."""
        return {"preset": self.preset, "spatial_dims": self.spatial_dims, "mixup_p": self.mixup_p,
                "mixup_alpha": self.mixup_alpha, "transforms": copy.deepcopy(self.params)}


def build_augmenter(cfg: AugmentConfig, spatial_dims: int, plan: Optional[str] = None,
                    out_shape: Optional[Sequence[int]] = None, slice_channels: bool = False) -> Augmenter:
    """Resolve ``cfg`` into an `Augmenter` for 2D or 3D batches.

    Args:
        cfg: The ``augment`` section of the experiment config.
        spatial_dims: 2 for ``(B, C, H, W)`` batches, 3 for ``(B, C, D, H, W)`` (D = slices).
        plan: The data's preprocessing plan (``data.plan``): what preset ``auto`` means.
        out_shape: The training patch (see `Augmenter`), when batches may come as larger
            source patches.
        slice_channels: Channels are neighbouring slices (see `Augmenter`).

    Raises:
        ConfigError: unknown preset/transform/key, bad values, mirror axes beyond
            ``spatial_dims``, a mixup probability outside [0, 1], or a mixup alpha < 0 (or 0 with mixup on).
    """
    if spatial_dims not in (2, 3):
        raise ConfigError(f"augment: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    preset = resolve_preset(cfg.preset, plan)
    params = resolve_params(preset, cfg.params)
    axes = params["mirror"]["axes"]
    if axes is None:
        params["mirror"]["axes"] = list(range(spatial_dims))
    elif any(a >= spatial_dims for a in axes):
        raise ConfigError(f"augment.params.mirror.axes: {axes} out of range for {spatial_dims} spatial dims "
                          f"(valid: {list(range(spatial_dims))})")
    mixup_p = _prob("augment.mixup", cfg.mixup)
    mixup_alpha = _number("augment.mixup_alpha", cfg.mixup_alpha)
    if mixup_alpha < 0 or (mixup_p > 0 and mixup_alpha == 0):
        raise ConfigError(f"augment.mixup_alpha must be > 0 when mixup is on, got {cfg.mixup_alpha!r}")
    return Augmenter(preset=preset, spatial_dims=spatial_dims, params=params, mixup_p=mixup_p,
                     mixup_alpha=mixup_alpha, out_shape=None if out_shape is None else tuple(int(v) for v in out_shape),
                     slice_channels=bool(slice_channels))


@SECTION_CHECKS.register("augment")
def check_augment_section(cfg: Any, spatial_dims: int) -> None:
    """The load-time check of ``augment`` (see `robustseg.config.check_components`).

    Raises:
        ConfigError: an unknown preset or a transform parameter out of range, as
            `build_augmenter` would raise it when training starts.
    """
    build_augmenter(cfg.augment, spatial_dims, cfg.data.plan)
