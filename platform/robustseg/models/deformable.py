"""Deformable convolution in pure torch, and the deformable bottleneck of the source paper.

The source paper (§2.2) replaces the convolutions at the bottleneck of a 2D nnU-Net with
deformable convolutions (Dai et al. 2017; Zhu et al. 2019, DCNv2), expecting the learned
sampling offsets to absorb part of the shift that respiratory motion causes.

``torchvision.ops.deform_conv2d`` is not used even when importable: torchvision's wheels are
pinned to one torch build and break beside others, and MONAI has no deformable convolution.
Here every kernel tap is sampled with ``grid_sample`` (bilinear, zeros outside the image) at
its offset position, the samples are gathered into a ``(B, C*k*k, L)`` column matrix and the
weights applied as one matmul. With zero offsets this is exactly an ordinary convolution.

Offsets follow torchvision's layout: channel ``2*t`` is the y (row) offset and ``2*t + 1``
the x (column) offset of kernel tap ``t`` (row-major over the kernel), in pixels of the input.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

IntPair = Union[int, Tuple[int, int]]


def _pair(v: IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 1,
    dilation: IntPair = 1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Deformable 2D convolution (one offset group, no channel groups).

    Args:
        x: Input ``(B, C, H, W)``.
        offset: ``(B, 2*kh*kw, Ho, Wo)`` sampling offsets in input pixels (y, x per tap).
        weight: ``(C_out, C, kh, kw)`` convolution weights.
        bias: Optional ``(C_out,)`` bias.
        stride: Convolution stride.
        padding: Zero padding (positions outside the input read as 0).
        dilation: Kernel dilation.
        mask: Optional ``(B, kh*kw, Ho, Wo)`` modulation (DCNv2) multiplied into each tap.

    Returns:
        ``(B, C_out, Ho, Wo)``.

    Raises:
        ValueError: offset or mask shapes that do not match the output grid.
    """
    b, c, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    if c_in != c:
        raise ValueError(f"deform_conv2d: weight expects {c_in} input channels, input has {c}")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = kh * kw
    if tuple(offset.shape) != (b, 2 * taps, ho, wo):
        raise ValueError(f"deform_conv2d: offset must be {(b, 2 * taps, ho, wo)}, got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (b, taps, ho, wo):
        raise ValueError(f"deform_conv2d: mask must be {(b, taps, ho, wo)}, got {tuple(mask.shape)}")

    # Regular sampling positions of every tap at every output pixel, in input pixels.
    # Positions and sampling run in at least fp32: in bf16 a normalised coordinate is off by
    # up to 1/256 of the image width, which would blur even zero offsets.
    dev = x.device
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(dt)
    ky = (torch.arange(kh, device=dev, dtype=dt) * dh).repeat_interleave(kw)  # (taps,)
    kx = (torch.arange(kw, device=dev, dtype=dt) * dw).repeat(kh)
    oy = torch.arange(ho, device=dev, dtype=dt) * sh - ph
    ox = torch.arange(wo, device=dev, dtype=dt) * sw - pw
    off = offset.to(dt).view(b, taps, 2, ho, wo)
    py = ky.view(taps, 1, 1) + oy.view(1, ho, 1) + off[:, :, 0]  # (B, taps, Ho, Wo)
    px = kx.view(taps, 1, 1) + ox.view(1, 1, wo) + off[:, :, 1]
    # grid_sample with align_corners=False puts pixel i's centre at (2i + 1) / size - 1; this
    # form stays finite for size-1 axes, unlike the align_corners=True normalisation.
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
    grid = grid.view(b, taps * ho, wo, 2)
    cols = F.grid_sample(xs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cols = cols.view(b, c, taps, ho, wo)
    if mask is not None:
        cols = cols * mask.to(cols.dtype).view(b, 1, taps, ho, wo)
    # weight (C_out, C, kh, kw) flattens C-major then tap, matching cols' (C, taps) layout.
    out = torch.matmul(weight.reshape(c_out, c * taps).to(cols.dtype), cols.reshape(b, c * taps, ho * wo))
    out = out.view(b, c_out, ho, wo)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, c_out, 1, 1)
    return out.to(x.dtype)


class DeformConv2d(nn.Module):
    """Deformable convolution layer taking its offsets (and optional mask) as inputs.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        stride: Stride.
        padding: Zero padding.
        dilation: Dilation.
        bias: Learn a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair = 3, stride: IntPair = 1,
                 padding: IntPair = 1, dilation: IntPair = 1, bias: bool = True) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # Same init as the surrounding DynUNet convolutions (kaiming for LeakyReLU 0.01).
        nn.init.kaiming_normal_(self.weight, a=0.01)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


class DeformableBlock(nn.Module):
    """Offset conv -> deformable conv -> instance norm -> LeakyReLU.

    The offset predictor is a plain convolution initialised to zero, so at initialisation the
    block is an ordinary convolution block and training learns where to deviate from the grid.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of both the offset conv and the deformable conv.
        kernel_size: Odd kernel size (padding keeps 'same' size at stride 1).
        modulated: DCNv2 modulation: also predict a per-tap scale ``2*sigmoid(m)`` (1 at init).
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: IntPair = 1, kernel_size: int = 3,
                 modulated: bool = False, negative_slope: float = 0.01) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"DeformableBlock: kernel_size must be odd, got {kernel_size}")
        taps, pad = kernel_size * kernel_size, kernel_size // 2
        self.modulated = modulated
        self.taps = taps
        self.offset = nn.Conv2d(in_channels, (3 if modulated else 2) * taps, kernel_size, stride, pad)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size, stride, pad, bias=False)
        self.norm = nn.InstanceNorm2d(out_channels, affine=True)
        self.act = nn.LeakyReLU(negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = self.offset(x)
        mask = None
        if self.modulated:
            pred, m = pred[:, : 2 * self.taps], pred[:, 2 * self.taps:]
            mask = 2.0 * torch.sigmoid(m)
        return self.act(self.norm(self.conv(x, pred, mask)))


class DeformableBottleneck(nn.Module):
    """Drop-in for DynUNet's bottleneck: two deformable blocks, the first one strided.

    Args:
        in_channels: Input channels (the last encoder stage's filters).
        out_channels: Bottleneck filters.
        stride: Downsampling stride of the first block.
        modulated: Use DCNv2 modulation in both blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: IntPair = 2, modulated: bool = False) -> None:
        super().__init__()
        self.block1 = DeformableBlock(in_channels, out_channels, stride=stride, modulated=modulated)
        self.block2 = DeformableBlock(out_channels, out_channels, stride=1, modulated=modulated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


__all__ = ["deform_conv2d", "DeformConv2d", "DeformableBlock", "DeformableBottleneck"]
