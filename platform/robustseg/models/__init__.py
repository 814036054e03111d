"""Backbones: one module per family, each a tiny builder registered in `BACKBONES`.

Contract (every backbone):

* registered as ``@BACKBONES.register(name, params=ParamsDataclass, spatial_dims=2 or 3)``;
* builder signature ``builder(params, in_channels, num_classes, patch_size, spacing) -> nn.Module``
  where ``patch_size`` is the training patch (in-plane ``(H, W)`` for 2D, ``(D, H, W)`` for 3D)
  and ``spacing`` the voxel spacing in the same order (or None) so nnU-Net-like topologies can
  derive kernels/strides;
* the module sets ``spatial_dims`` (2/3) and ``divisible_by`` (int: input sizes must be
  multiples of it; inference pads to it);
* forward: ``(B, C_in, *S) -> (B, num_classes, *S)`` logits in eval mode; in train mode a
  backbone with deep supervision enabled returns a list of logits ``[full-res, coarser, ...]``
  (any resolutions; the loss resizes targets to each head).

`build_model` validates ``model.params`` against the params dataclass: unknown keys fail
with the list of valid ones.
"""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

from robustseg.config import ModelConfig, from_dict
from robustseg.registry import BACKBONES

_MODULES = ["dynunet", "deformable", "swin_unetr", "swin_unet", "attention_unet", "unet"]

for _m in _MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as e:  # a family still being written must not break the others
        if e.name != f"{__name__}.{_m}":
            raise


def build_model(cfg: ModelConfig, patch_size: Sequence[int], spacing: Optional[Sequence[float]] = None):
    """Build the configured backbone.

    Args:
        cfg: Model section (name, params, channels, classes).
        patch_size: Training patch size (in-plane for 2D).
        spacing: Voxel spacing in the patch's axis order, if known.

    Raises:
        UnknownNameError: unknown backbone name (lists the registered ones).
        ConfigError: unknown or invalid params (lists the valid keys).
    """
    builder = BACKBONES.get(cfg.name)
    params_cls = BACKBONES.meta(cfg.name)["params"]
    params = from_dict(params_cls, cfg.params, f"model.params ({cfg.name})")
    k = int(getattr(cfg, "slice_context", 0))
    model = builder(params, cfg.in_channels * (1 + 2 * k), cfg.num_classes, tuple(int(p) for p in patch_size),
                    None if spacing is None else tuple(float(s) for s in spacing))
    # The network carries its input contract, so every caller of the sliding window (validation,
    # predict, OOF, pseudo-labels, serving, ensembles) stacks the neighbours it was trained on
    # (`robustseg.engine.inference.slice_context` reads it).
    model.slice_context = k
    return model


def spatial_dims(name: str) -> int:
    """2 or 3: the dimensionality a registered backbone trains on."""
    return int(BACKBONES.meta(name)["spatial_dims"])


def size_multiple(model) -> tuple:
    """Per-axis input-size multiple of a built backbone (``divisible_by_axes`` or ``divisible_by``)."""
    inner = getattr(model, "_orig_mod", model)
    axes = getattr(inner, "divisible_by_axes", None)
    if axes is not None:
        return tuple(int(a) for a in axes)
    return (int(getattr(inner, "divisible_by", 1)),) * int(getattr(inner, "spatial_dims", 2))
