"""``swin_unetr``: MONAI's Swin-UNETR in 2D (source paper §2.2).

A Swin-transformer encoder with a convolutional U-Net decoder (Hatamizadeh et al. 2022).
MONAI 1.6 infers sizes at run time (no ``img_size`` argument); inputs must be multiples of
``2**5 = 32`` per axis. The source paper trains it on 224 x 224 crops with AdamW
(lr 4e-4, weight decay 5e-5). Weights start random: there is no download here.
MONAI's SwinUNETR needs ``einops`` (declared in pyproject).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from robustseg.config import doc
from robustseg.errors import ConfigError
from robustseg.models.topology import check_patch
from robustseg.registry import BACKBONES

_DIVISIBLE_BY = 32  # patch embedding 2 x four 2x merges


@dataclass
class SwinUNETRParams:
    """MONAI SwinUNETR, 2D."""

    feature_size: int = doc(48, "Embedding width of the first stage (a multiple of 12); doubles per stage.")
    depths: List[int] = doc([2, 2, 2, 2], "Swin blocks per encoder stage (exactly 4 stages).")
    num_heads: List[int] = doc([3, 6, 12, 24], "Attention heads per stage; must divide feature_size * 2**stage.")
    window_size: int = doc(7, "Attention window (tokens per side).")
    dropout_path_rate: float = doc(0.0, "Stochastic-depth rate.")
    drop_rate: float = doc(0.0, "Dropout after embeddings and in MLPs.")
    attn_drop_rate: float = doc(0.0, "Attention dropout.")
    norm_name: str = doc("instance", "Decoder normalisation: instance or batch.")
    use_checkpoint: bool = doc(False, "Gradient checkpointing in the Swin blocks (less memory, ~30% slower).")
    use_v2: bool = doc(False, "Swin-UNETR v2: a residual conv block before each Swin stage.")

    def __post_init__(self) -> None:
        key = "model.params (swin_unetr)"
        if self.feature_size < 12 or self.feature_size % 12:
            raise ConfigError(f"{key}.feature_size must be a positive multiple of 12, got {self.feature_size}")
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ConfigError(f"{key}: depths and num_heads need exactly 4 entries, got {self.depths}, {self.num_heads}")
        if min(self.depths) < 1 or min(self.num_heads) < 1:
            raise ConfigError(f"{key}: depths and num_heads must be >= 1")
        for i, h in enumerate(self.num_heads):
            if (self.feature_size * 2**i) % h:
                raise ConfigError(f"{key}.num_heads[{i}]={h} does not divide the stage width {self.feature_size * 2**i}")
        if self.window_size < 1:
            raise ConfigError(f"{key}.window_size must be >= 1")
        for name in ("dropout_path_rate", "drop_rate", "attn_drop_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{key}.{name} must be in [0, 1)")
        if self.norm_name not in ("instance", "batch"):
            raise ConfigError(f"{key}.norm_name must be instance or batch, got {self.norm_name!r}")


@BACKBONES.register("swin_unetr", params=SwinUNETRParams, spatial_dims=2)
def swin_unetr(p: SwinUNETRParams, in_channels: int, num_classes: int, patch_size: Sequence[int],
               spacing: Optional[Sequence[float]]) -> nn.Module:
    """Build a 2D SwinUNETR.

    Args:
        p: Validated params.
        in_channels: Input channels.
        num_classes: Output classes.
        patch_size: Training patch (H, W); each a multiple of 32.
        spacing: Unused (the architecture does not adapt to spacing).

    Raises:
        ConfigError: patch not 2D or not divisible by 32.
    """
    if len(patch_size) != 2:
        raise ConfigError(f"swin_unetr: patch_size must be (H, W), got {tuple(patch_size)}")
    check_patch("swin_unetr", patch_size, (_DIVISIBLE_BY, _DIVISIBLE_BY))
    model = SwinUNETR(
        in_channels=in_channels,
        out_channels=num_classes,
        depths=tuple(p.depths),
        num_heads=tuple(p.num_heads),
        window_size=p.window_size,
        feature_size=p.feature_size,
        norm_name=p.norm_name,
        drop_rate=p.drop_rate,
        attn_drop_rate=p.attn_drop_rate,
        dropout_path_rate=p.dropout_path_rate,
        use_checkpoint=p.use_checkpoint,
        spatial_dims=2,
        use_v2=p.use_v2,
    )
    # The MONAI module is returned as is so its state dict stays loadable by MONAI tooling.
    model.spatial_dims = 2
    model.divisible_by = _DIVISIBLE_BY
    model.divisible_by_axes = (_DIVISIBLE_BY, _DIVISIBLE_BY)
    return model


__all__ = ["SwinUNETRParams", "swin_unetr"]
