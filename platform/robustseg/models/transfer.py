"""Transfer-learning helpers: freeze, re-initialise, and flatten 3D weights into a 2D network.

The thesis fine-tunes pretrained U-Nets in three ways (decoder only, everything, and from
Models-Genesis 3D weights); these helpers work on parameter-name prefixes so they apply to any
backbone. `ENCODER_PREFIXES` names each family's encoder for "fine-tune the decoder" runs.

3D -> 2D flattening sums each 3D kernel over its depth axis: a 2D image seen as a volume that
is constant along depth then produces exactly the 3D network's response, which is the usual
way to reuse volumetric pretraining (e.g. Models Genesis) in a slice-wise model.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

# Parameter-name prefixes of each backbone's encoder (as in ``model.named_parameters()``).
ENCODER_PREFIXES: Dict[str, List[str]] = {
    "unet2d": ["net.input_block.", "net.downsamples.", "net.bottleneck."],
    "unet3d": ["net.input_block.", "net.downsamples.", "net.bottleneck."],
    "unet": ["down.", "bottom."],
    "swin_unet": ["patch_embed.", "layers.", "norm."],
    "swin_unetr": ["swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10."],
}


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def freeze(model: nn.Module, prefixes: Sequence[str], frozen: bool = True) -> List[str]:
    """Stop (or restart, with ``frozen=False``) training parameters under some prefixes.

    Args:
        model: The network.
        prefixes: Parameter-name prefixes; ``[""]`` matches everything.
        frozen: True freezes, False unfreezes.

    Returns:
        The names of the parameters changed.

    Raises:
        ValueError: no parameter matches (a typo would otherwise silently train everything).
    """
    names = [n for n, p in model.named_parameters() if _matches(n, prefixes)]
    if not names:
        raise ValueError(f"freeze: no parameter matches {list(prefixes)}")
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(not frozen)
    return names


def reinitialize(model: nn.Module, prefixes: Sequence[str]) -> List[str]:
    """Reset the parameters of every module under some prefixes to a fresh initialisation.

    Args:
        model: The network.
        prefixes: Module-name prefixes (e.g. ``"net.upsamples."``).

    Returns:
        The names of the modules reset.

    Raises:
        ValueError: no resettable module matches.
    """
    reset = []
    for name, module in model.named_modules():
        if _matches(name + ".", prefixes) and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # type: ignore[operator]
            reset.append(name)
    if not reset:
        raise ValueError(f"reinitialize: no resettable module matches {list(prefixes)}")
    return reset


def flatten_3d_to_2d(state_3d: Mapping[str, torch.Tensor], model_2d: nn.Module, load: bool = True) -> Dict[str, List[str]]:
    """Map a 3D network's weights onto a 2D network with the same parameter names.

    Conv kernels ``(O, I, kd, kh, kw)`` (and transposed ``(I, O, kd, kh, kw)``) are summed over
    ``kd``; tensors whose shapes already match are copied; everything else is skipped.

    Args:
        state_3d: State dict of the 3D network (e.g. ``unet3d``).
        model_2d: The 2D network to initialise (e.g. ``unet2d`` with the same stage count).
        load: Load the mapped weights into ``model_2d`` (strict=False).

    Returns:
        ``{"flattened", "copied", "skipped", "missing"}`` key lists (also logged).
    """
    own = model_2d.state_dict()
    out: Dict[str, torch.Tensor] = {}
    report: Dict[str, List[str]] = {"flattened": [], "copied": [], "skipped": [], "missing": []}
    for k, v in state_3d.items():
        target = own.get(k)
        if target is None:
            report["skipped"].append(k)
        elif tuple(v.shape) == tuple(target.shape):
            out[k] = v.detach().clone()
            report["copied"].append(k)
        elif v.dim() == 5 and target.dim() == 4 and tuple(v.shape[:2]) + tuple(v.shape[3:]) == tuple(target.shape):
            out[k] = v.detach().sum(dim=2)
            report["flattened"].append(k)
        else:
            report["skipped"].append(k)
    report["missing"] = sorted(k for k in own if k not in out)
    if load:
        model_2d.load_state_dict(out, strict=False)
    log.info("flatten_3d_to_2d: %d flattened, %d copied, %d skipped, %d left at their init",
             len(report["flattened"]), len(report["copied"]), len(report["skipped"]), len(report["missing"]))
    return report


__all__ = ["ENCODER_PREFIXES", "freeze", "reinitialize", "flatten_3d_to_2d"]
