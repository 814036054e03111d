"""``attention_unet``: the attention-gated U-Net of the thesis (Oktay et al. 2018), via MONAI.

Additive attention gates, driven by the coarser decoder features, rescale each skip connection
before it is merged, so the decoder learns where to look. Defaults mirror the thesis's plain
U-Net widths (64 -> 1024, four downsamplings); MONAI's blocks use batch norm and ReLU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

from monai.networks.nets import AttentionUnet
from torch import nn

from robustseg.config import doc
from robustseg.errors import ConfigError
from robustseg.models.topology import check_patch
from robustseg.registry import BACKBONES


@dataclass
class AttentionUNetParams:
    """MONAI AttentionUnet, 2D."""

    channels: List[int] = doc([64, 128, 256, 512, 1024], "Channels per level, top first (at least 2).")
    strides: List[int] = doc([2, 2, 2, 2], "Downsampling stride between levels (len(channels) - 1 entries).")
    kernel_size: int = doc(3, "Convolution kernel size (odd).")
    dropout: float = doc(0.0, "Dropout probability in every conv block.")

    def __post_init__(self) -> None:
        key = "model.params (attention_unet)"
        if len(self.channels) < 2 or min(self.channels) < 2:
            raise ConfigError(f"{key}.channels needs >= 2 levels of >= 2 channels, got {self.channels}")
        if len(self.strides) != len(self.channels) - 1:
            raise ConfigError(f"{key}.strides needs len(channels) - 1 = {len(self.channels) - 1} entries, got {self.strides}")
        if min(self.strides) < 1:
            raise ConfigError(f"{key}.strides must be >= 1, got {self.strides}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"{key}.kernel_size must be odd, got {self.kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout}")


@BACKBONES.register("attention_unet", params=AttentionUNetParams, spatial_dims=2)
def attention_unet(p: AttentionUNetParams, in_channels: int, num_classes: int, patch_size: Sequence[int],
                   spacing: Optional[Sequence[float]]) -> nn.Module:
    """Build a 2D attention-gated U-Net.

    Args:
        p: Validated params.
        in_channels: Input channels.
        num_classes: Output classes.
        patch_size: Training patch (H, W); each a multiple of the product of strides.
        spacing: Unused.

    Raises:
        ConfigError: patch not 2D or not divisible by the product of strides.
    """
    if len(patch_size) != 2:
        raise ConfigError(f"attention_unet: patch_size must be (H, W), got {tuple(patch_size)}")
    div = math.prod(p.strides)
    check_patch("attention_unet", patch_size, (div, div))
    model = AttentionUnet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=num_classes,
        channels=list(p.channels),
        strides=list(p.strides),
        kernel_size=p.kernel_size,
        up_kernel_size=3,
        dropout=p.dropout,
    )
    model.spatial_dims = 2
    model.divisible_by = div
    model.divisible_by_axes = (div, div)
    return model


__all__ = ["AttentionUNetParams", "attention_unet"]
