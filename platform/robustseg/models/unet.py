"""``unet``: the thesis's plain 2D U-Net (Ronneberger et al. 2015; thesis Table 4.1).

Four down blocks of two 3x3 conv + BN + ReLU (64-128-256-512, 1024 at the bottom), 2x2 max
pooling, 2x2 up-convolutions, skip concatenation and a 1x1 head. Unlike the 2015 original the
convolutions are padded, so the output has the input's size and no skip needs cropping.
``base`` shrinks the widths (base 16: 16 ... 256); ``depth`` sets the number of poolings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from robustseg.config import doc
from robustseg.errors import ConfigError
from robustseg.models.topology import check_patch
from robustseg.registry import BACKBONES


@dataclass
class UNetParams:
    """Plain 2D U-Net."""

    base: int = doc(64, "Channels of the first level; doubled at every pooling (thesis: 64 -> 1024).")
    depth: int = doc(4, "Number of 2x2 poolings (down blocks); input sizes must be multiples of 2**depth.")
    batch_norm: bool = doc(True, "Batch norm after every convolution (otherwise biased convolutions only).")
    dropout: float = doc(0.0, "Dropout probability at the bottom of the U (as in the 2015 U-Net).")

    def __post_init__(self) -> None:
        key = "model.params (unet)"
        if self.base < 1:
            raise ConfigError(f"{key}.base must be >= 1, got {self.base}")
        if not 1 <= self.depth <= 7:
            raise ConfigError(f"{key}.depth must be in [1, 7], got {self.depth}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{key}.dropout must be in [0, 1), got {self.dropout}")


class DoubleConv(nn.Sequential):
    """(3x3 conv -> [BN] -> ReLU) x 2.

    Args:
        in_ch: Input channels.
        out_ch: Output channels.
        batch_norm: Add batch norm (the convolutions then carry no bias).
    """

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool) -> None:
        layers: List[nn.Module] = []
        for c in (in_ch, out_ch):
            layers.append(nn.Conv2d(c, out_ch, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """Plain U-Net.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        base: Channels of the first level.
        depth: Number of poolings.
        batch_norm: Use batch norm.
        dropout: Dropout at the bottleneck.
    """

    def __init__(self, in_channels: int, num_classes: int, base: int = 64, depth: int = 4,
                 batch_norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        prev = in_channels
        for w in widths[:-1]:
            self.down.append(DoubleConv(prev, w, batch_norm))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.bottom = DoubleConv(widths[-2], widths[-1], batch_norm)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for hi, lo in zip(widths[:0:-1], widths[-2::-1]):
            self.upconv.append(nn.ConvTranspose2d(hi, lo, 2, stride=2))
            self.up.append(DoubleConv(2 * lo, lo, batch_norm))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.spatial_dims = 2
        self.divisible_by = 2**depth
        self.divisible_by_axes = (2**depth, 2**depth)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.drop(self.bottom(x))
        for upconv, block, skip in zip(self.upconv, self.up, reversed(skips)):
            x = block(torch.cat((skip, upconv(x)), dim=1))
        return self.head(x)


@BACKBONES.register("unet", params=UNetParams, spatial_dims=2)
def unet(p: UNetParams, in_channels: int, num_classes: int, patch_size: Sequence[int],
         spacing: Optional[Sequence[float]]) -> UNet:
    """Build the thesis's plain U-Net.

    Args:
        p: Validated params.
        in_channels: Input channels.
        num_classes: Output classes.
        patch_size: Training patch (H, W), multiples of ``2**depth``.
        spacing: Unused.

    Raises:
        ConfigError: patch not 2D or not divisible by ``2**depth``.
    """
    if len(patch_size) != 2:
        raise ConfigError(f"unet: patch_size must be (H, W), got {tuple(patch_size)}")
    check_patch("unet", patch_size, (2**p.depth, 2**p.depth))
    return UNet(in_channels, num_classes, p.base, p.depth, p.batch_norm, p.dropout)


__all__ = ["UNetParams", "UNet", "unet"]
