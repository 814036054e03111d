"""Transfer-learning helpers: freeze, re-initialise, and flatten 3D weights into a 2D network.

The thesis fine-tunes pretrained U-Nets in three ways (decoder only, everything, and from
Models-Genesis 3D weights); these helpers work on parameter-name prefixes so they apply to any
backbone. `ENCODER_PREFIXES` names each family's encoder for "fine-tune the decoder" runs, and
`transfer_layout` finds a U-Net's encoder blocks in order, its output layer and its last
decoder block, which `apply_finetune` uses for the thesis's two fine-tuning modes:

* ``decoder``: freeze the first half of the encoder blocks (input block first; the bottleneck
  counts as the deepest encoder block) and re-initialise the output layer (and any deep
  supervision heads), so the low-level features stay as pre-trained and the new task gets a
  fresh classifier;
* ``all``: train everything and re-initialise the last decoder block with the output layer.

3D -> 2D flattening collapses each 3D kernel's depth axis, by summing it (default: a 2D image
seen as a volume constant along depth then produces exactly the 3D network's response, the
usual way to reuse volumetric pre-training such as Models Genesis in a slice-wise model) or by
taking its centre slice (keeps the in-plane filter the 3D network applied to the slice itself,
at the price of ignoring what it learned from neighbours).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
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


FLATTEN_MODES = ("sum", "centre")


def flatten_3d_to_2d(state_3d: Mapping[str, torch.Tensor], model_2d: nn.Module, load: bool = True,
                     mode: str = "sum") -> Dict[str, List[str]]:
    """Map a 3D network's weights onto a 2D network with the same parameter names.

    Conv kernels ``(O, I, kd, kh, kw)`` (and transposed ``(I, O, kd, kh, kw)``) lose ``kd``:
    summed (``mode="sum"``) or their centre slice ``kd // 2`` (``mode="centre"``); tensors whose
    shapes already match are copied; everything else is skipped.

    Args:
        state_3d: State dict of the 3D network (e.g. ``unet3d``).
        model_2d: The 2D network to initialise (e.g. ``unet2d`` with the same stage count).
        load: Load the mapped weights into ``model_2d`` (strict=False).
        mode: ``"sum"`` or ``"centre"`` (see the module docstring).

    Returns:
        ``{"flattened", "copied", "skipped", "missing"}`` key lists (also logged).
    """
    if mode not in FLATTEN_MODES:
        raise ValueError(f"flatten mode must be one of {FLATTEN_MODES}, got {mode!r}")
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
            out[k] = v.detach().sum(dim=2) if mode == "sum" else v.detach()[:, :, v.shape[2] // 2].clone()
            report["flattened"].append(k)
        else:
            report["skipped"].append(k)
    report["missing"] = sorted(k for k in own if k not in out)
    if load:
        model_2d.load_state_dict(out, strict=False)
    log.info("flatten_3d_to_2d: %d flattened, %d copied, %d skipped, %d left at their init",
             len(report["flattened"]), len(report["copied"]), len(report["skipped"]), len(report["missing"]))
    return report


@dataclass
class TransferLayout:
    """Where a U-Net's parts are, as parameter-name prefixes.

    Attributes:
        encoder: Encoder blocks, shallowest first (the bottleneck last).
        output: The output layer (and deep-supervision heads).
        last_block: The last decoder block together with the output layer.
    """

    encoder: List[str]
    output: List[str]
    last_block: List[str]


def _indices(names: Sequence[str], pattern: str) -> List[int]:
    return sorted({int(m.group(1)) for n in names for m in [re.match(pattern, n)] if m})


def transfer_layout(model: nn.Module, backbone: str) -> TransferLayout:
    """The `TransferLayout` of a U-Net-family backbone (unet2d, unet3d, unet, attention_unet).

    Raises:
        ValueError: a backbone without a known U-Net layout (e.g. the Swin transformers).
    """
    names = [n for n, _ in model.named_parameters()]
    if backbone in ("unet2d", "unet3d"):  # MONAI DynUNet behind `net.`
        downs = _indices(names, r"net\.downsamples\.(\d+)\.")
        ups = _indices(names, r"net\.upsamples\.(\d+)\.")
        output = ["net.output_block."] + (["net.deep_supervision_heads."] if any(
            n.startswith("net.deep_supervision_heads.") for n in names) else [])
        return TransferLayout(["net.input_block."] + [f"net.downsamples.{i}." for i in downs] + ["net.bottleneck."],
                              output, [f"net.upsamples.{ups[-1]}."] + output)
    if backbone == "unet":
        downs, ups = _indices(names, r"down\.(\d+)\."), _indices(names, r"up\.(\d+)\.")
        return TransferLayout([f"down.{i}." for i in downs] + ["bottom."], ["head."],
                              [f"upconv.{ups[-1]}.", f"up.{ups[-1]}.", "head."])
    if backbone == "attention_unet":
        # MONAI AttentionUnet nests each level in the previous one: model.0 is the top encoder
        # block, model.1 the rest (its submodule.0 the next encoder block, ...), model.2 the
        # output convolution; the innermost `submodule` without an index is the bottleneck.
        encoder, prefix = ["model.0."], "model.1."
        while any(n.startswith(prefix + "submodule.1.") for n in names):
            encoder.append(prefix + "submodule.0.")
            prefix += "submodule.1."
        encoder.append(prefix + "submodule.")
        top = ["model.1.attention.", "model.1.upconv.", "model.1.merge."]
        return TransferLayout(encoder, ["model.2."], top + ["model.2."])
    raise ValueError(f"fine-tuning modes need a U-Net layout; backbone {backbone!r} has none "
                     "(use unet2d, unet3d, unet or attention_unet, or regime.finetune: none)")


FINETUNE_MODES = ("none", "decoder", "all", "scratch")


def apply_finetune(model: nn.Module, backbone: str, mode: str, reinit: bool = True) -> Dict[str, List[str]]:
    """Prepare a pre-trained model for one of the thesis's fine-tuning modes.

    Args:
        model: The network, already holding the pre-trained weights.
        backbone: Its backbone name.
        mode: ``decoder`` (freeze the first half of the encoder, fresh output layer), ``all``
            (train everything, fresh last block) or ``none``/``scratch`` (nothing to do).
        reinit: Re-initialise the fresh parts (False when resuming: the run's own checkpoint
            already holds them; freezing is re-applied either way).

    Returns:
        ``{"frozen": parameter names, "reinitialised": module names}``.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"finetune mode must be one of {FINETUNE_MODES}, got {mode!r}")
    report: Dict[str, List[str]] = {"frozen": [], "reinitialised": []}
    if mode in ("none", "scratch"):
        return report
    layout = transfer_layout(model, backbone)
    if mode == "decoder":
        report["frozen"] = freeze(model, layout.encoder[: len(layout.encoder) // 2])
    if reinit:
        report["reinitialised"] = reinitialize(model, layout.output if mode == "decoder" else layout.last_block)
    log.info("finetune=%s: %d parameters frozen, %d modules re-initialised", mode, len(report["frozen"]),
             len(report["reinitialised"]))
    return report


__all__ = ["ENCODER_PREFIXES", "FINETUNE_MODES", "FLATTEN_MODES", "TransferLayout", "apply_finetune", "freeze",
           "reinitialize", "flatten_3d_to_2d", "transfer_layout"]
