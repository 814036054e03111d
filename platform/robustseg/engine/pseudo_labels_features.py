"""Pseudo labels, steps 3-4: encoder features of patches and the soft labels they take.

`encode_patches` encodes patches with a segmentation model's encoder (a forward hook on
`default_feature_module`, globally average-pooled, L2-normalised); `centre_codes` centres
the encodings on the dictionary; `assign_soft_labels` keeps the unlabelled patches whose best
cosine similarity lies in the window and mixes their top-k dictionary labels (`Assignment`).
The method and its numbers: `robustseg.engine.pseudo_labels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from robustseg.errors import ConfigError


# --------------------------------------------------------------------------- features
def default_feature_module(backbone: str) -> str:
    """The deepest encoder module of a backbone: the last of its `ENCODER_PREFIXES`.

    Raises:
        ConfigError: a backbone without registered encoder prefixes.
    """
    from robustseg.models.transfer import ENCODER_PREFIXES

    if backbone not in ENCODER_PREFIXES:
        raise ConfigError(f"no default feature module for backbone {backbone!r} (known: {sorted(ENCODER_PREFIXES)}); "
                          "set feature_module to one of its module names")
    return ENCODER_PREFIXES[backbone][-1].rstrip(".")


class _Encoded(Exception):
    """Raised by the feature hook: the decoder is never run (it may reject patch sizes, and costs time)."""


def encode_patches(model: torch.nn.Module, patches: torch.Tensor, module_name: str, *, batch_size: int = 64,
                   channels_last: bool = False, pad_to: int = 1) -> torch.Tensor:
    """L2-normalised, globally average-pooled encodings ``(N, F)`` of ``(N, 1, P, P)`` patches.

    Args:
        model: A 2D network in eval mode.
        patches: Images in the model's (the store's) normalised intensity space.
        module_name: Module whose output is the encoding (``dict(model.named_modules())``).
        batch_size: Patches per forward pass.
        channels_last: The module returns ``(B, H, W, C)`` tokens instead of ``(B, C, H, W)``.
        pad_to: Pad patches (edge replication) up to a multiple of this for backbones that
            reject other sizes.

    Raises:
        ConfigError: no such module (lists the top-level ones).
    """
    modules = dict(model.named_modules())
    if module_name not in modules:
        top = [n for n, _ in model.named_children()]
        raise ConfigError(f"feature module {module_name!r} not in the model (top-level modules: {top})")
    captured: List[torch.Tensor] = []

    def hook(_mod: Any, _inp: Any, out: Any) -> None:
        captured.append(out[0] if isinstance(out, (tuple, list)) else out)
        raise _Encoded

    handle = modules[module_name].register_forward_hook(hook)
    device = next(model.parameters()).device
    chunks = []
    try:
        with torch.no_grad():
            for i in range(0, patches.shape[0], batch_size):
                x = patches[i:i + batch_size].to(device=device, dtype=torch.float32)
                if pad_to > 1:
                    ph, pw = (-x.shape[-2]) % pad_to, (-x.shape[-1]) % pad_to
                    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
                captured.clear()
                try:
                    model(x)
                except _Encoded:
                    pass
                if not captured:
                    raise ConfigError(f"feature module {module_name!r} was not run by the model's forward pass")
                feat = captured[0].float()
                pooled = feat.mean(dim=(1, 2)) if channels_last else feat.flatten(2).mean(2)
                chunks.append(F.normalize(pooled, dim=1).cpu())
    finally:
        handle.remove()
    if not chunks:
        return torch.zeros(0, 0)  # no patches: `assign_soft_labels` takes the width from the dictionary
    return torch.cat(chunks)


# --------------------------------------------------------------------------- assignment
@dataclass
class Assignment:
    """What the similarity window and the top-k mix decided for every unlabelled patch.

    Attributes:
        best: ``(U,)`` best cosine similarity of each unlabelled patch.
        keep: ``(U,)`` best similarity inside the window.
        too_similar: ``(U,)`` best similarity above the window.
        too_dissimilar: ``(U,)`` best similarity below the window.
        index: ``(U, k)`` dictionary entries, most similar first.
        weight: ``(U, k)`` mixing weights (sum 1 per row; 0 for entries below the window).
        soft: ``(K, C, P, P)`` soft masks of the kept patches, in ``keep`` order.
    """

    best: torch.Tensor
    keep: torch.Tensor
    too_similar: torch.Tensor
    too_dissimilar: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    soft: torch.Tensor


def centre_codes(unlabelled: torch.Tensor, dictionary: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Subtract the dictionary's mean encoding from both sides and re-normalise to unit length.

    Pooled post-activation features are (nearly) non-negative, so their raw cosines crowd
    just below 1 whatever the content; measured on COVID-SemiSeg with the unet2d bottleneck:
    median best similarity 0.998, so the thesis window kept nothing. Centring on the labelled
    dictionary measures how a patch differs from the typical labelled patch, which spreads
    the similarities over [-1, 1] and makes a fixed window meaningful.
    """
    mean = dictionary.float().mean(0, keepdim=True)
    return F.normalize(unlabelled.float() - mean, dim=1), F.normalize(dictionary.float() - mean, dim=1)


def assign_soft_labels(unlabelled: torch.Tensor, dictionary: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       window: Sequence[float] = (0.87, 0.96), top_k: int = 2) -> Assignment:
    """Window-filter unlabelled patches and mix their top-k dictionary labels.

    Args:
        unlabelled: ``(U, F)`` L2-normalised encodings.
        dictionary: ``(M, F)`` L2-normalised encodings of the labelled patches.
        labels: ``(M, P, P)`` integer label patches of the dictionary.
        num_classes: C, background included.
        window: ``(low, high)``, inclusive.
        top_k: Entries mixed (capped at M); those below ``low`` get weight 0 (the best,
            inside the window for a kept patch, always counts).

    Raises:
        ValueError: an empty dictionary, mismatched shapes, or labels outside ``[0, C)``.
    """
    if dictionary.shape[0] == 0:
        raise ValueError("the dictionary is empty")
    if unlabelled.shape[0] == 0:
        unlabelled = dictionary.new_zeros(0, dictionary.shape[1])
    if dictionary.shape[0] != labels.shape[0] or unlabelled.shape[1] != dictionary.shape[1]:
        raise ValueError(f"shapes do not match: unlabelled {tuple(unlabelled.shape)}, dictionary "
                         f"{tuple(dictionary.shape)}, labels {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"dictionary labels must lie in [0, {num_classes}), "
                         f"got {int(labels.min())}..{int(labels.max())}")
    low, high = float(window[0]), float(window[1])
    k = min(top_k, dictionary.shape[0])
    sims = unlabelled.float() @ dictionary.float().T  # cosine: both sides are unit vectors
    top, index = sims.topk(k, dim=1)
    best = top[:, 0]
    trusted = top >= low
    trusted[:, 0] = True  # the best entry decides the window; it always takes part
    raw = torch.where(trusted, top.clamp(min=0), torch.zeros_like(top))
    # A best similarity <= 0 is only kept by a window reaching that low: it takes the top-1 label alone.
    raw[:, 0] = torch.where(raw.sum(1) > 0, raw[:, 0], torch.ones_like(raw[:, 0]))
    weight = raw / raw.sum(1, keepdim=True)
    keep = (best >= low) & (best <= high)
    p = labels.shape[-1]
    soft = torch.zeros(int(keep.sum()), num_classes, labels.shape[-2], p)
    for j in range(k):
        hot = F.one_hot(labels[index[keep, j]].long(), num_classes).permute(0, 3, 1, 2).float()
        soft += weight[keep, j, None, None, None] * hot
    return Assignment(best=best, keep=keep, too_similar=best > high, too_dissimilar=best < low, index=index,
                      weight=weight, soft=soft)



__all__ = ["Assignment", "assign_soft_labels", "centre_codes", "default_feature_module", "encode_patches"]
