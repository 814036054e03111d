"""nnU-Net-like U-Nets on MONAI's ``DynUNet``: ``unet2d`` and ``unet3d``.

Depth, kernels and strides come from the patch size and spacing (`topology.derive_topology`);
filters start at ``filters_base`` and double per stage up to ``filters_max`` (nnU-Net: 32 ->
512 in 2D, 32 -> 320 in 3D); instance norm, LeakyReLU(0.01), deep supervision. The 2D variant
can replace the bottleneck with deformable convolutions (source paper §2.2).

MONAI's ``DynUNet`` returns deep-supervision heads upsampled to full resolution and stacked
into one tensor. The wrapper here returns them at their native resolutions as a list
``[full-res, 1/2, 1/4, ...]`` in train mode (the loss resizes the targets, as nnU-Net does),
and one tensor in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from monai.networks.nets import DynUNet
from torch import nn

from robustseg.config import doc
from robustseg.errors import ConfigError
from robustseg.models.deformable import DeformableBottleneck
from robustseg.models.topology import Topology, check_patch, derive_topology
from robustseg.registry import BACKBONES


def _validate(p: "UNet2DParams | UNet3DParams", key: str) -> None:
    if p.filters_base < 1 or p.filters_max < p.filters_base:
        raise ConfigError(f"{key}: need 1 <= filters_base <= filters_max, got {p.filters_base}, {p.filters_max}")
    if p.max_stages < 3:
        raise ConfigError(f"{key}.max_stages must be >= 3 (DynUNet needs two downsamplings), got {p.max_stages}")
    if p.min_size < 2:
        raise ConfigError(f"{key}.min_size must be >= 2 (instance norm needs more than one voxel), got {p.min_size}")
    if p.ds_heads < 1:
        raise ConfigError(f"{key}.ds_heads must be >= 1 (set deep_supervision: false to disable), got {p.ds_heads}")
    if not 0.0 <= p.dropout < 1.0:
        raise ConfigError(f"{key}.dropout must be in [0, 1), got {p.dropout}")


@dataclass
class UNet2DParams:
    """nnU-Net-like 2D U-Net (MONAI DynUNet) with an optional deformable bottleneck."""

    filters_base: int = doc(32, "Filters of the first stage; doubled every stage up to filters_max.")
    filters_max: int = doc(512, "Filter cap (nnU-Net 2D: 512).")
    max_stages: int = doc(8, "Upper bound on stages (downsamplings + 1); the patch size usually decides first.")
    min_size: int = doc(4, "Smallest feature-map size an axis is downsampled to.")
    deep_supervision: bool = doc(True, "Return [full-res, coarser heads...] logits in train mode.")
    ds_heads: int = doc(3, "Lower-resolution supervision heads besides the full-res output (clipped to stages - 2).")
    res_block: bool = doc(False, "Residual conv blocks instead of plain conv-norm-act pairs.")
    dropout: float = doc(0.0, "Dropout probability in every conv block.")
    deformable: bool = doc(False, "Replace the bottleneck convolutions with deformable convolutions (source paper §2.2).")
    deformable_modulated: bool = doc(False, "DCNv2 modulation (per-tap learned scale) in the deformable bottleneck.")

    def __post_init__(self) -> None:
        _validate(self, "model.params (unet2d)")


@dataclass
class UNet3DParams:
    """nnU-Net-like 3D U-Net (MONAI DynUNet); anisotropic spacing gives (1, 3, 3) early stages."""

    filters_base: int = doc(32, "Filters of the first stage; doubled every stage up to filters_max.")
    filters_max: int = doc(320, "Filter cap (nnU-Net 3D: 320).")
    max_stages: int = doc(8, "Upper bound on stages (downsamplings + 1); the patch size usually decides first.")
    min_size: int = doc(4, "Smallest feature-map size an axis is downsampled to.")
    deep_supervision: bool = doc(True, "Return [full-res, coarser heads...] logits in train mode.")
    ds_heads: int = doc(3, "Lower-resolution supervision heads besides the full-res output (clipped to stages - 2).")
    res_block: bool = doc(False, "Residual conv blocks instead of plain conv-norm-act pairs.")
    dropout: float = doc(0.0, "Dropout probability in every conv block.")

    def __post_init__(self) -> None:
        _validate(self, "model.params (unet3d)")


class NNUNet(nn.Module):
    """MONAI ``DynUNet`` with list-valued deep supervision and the robustseg contract attributes.

    Args:
        net: The configured ``DynUNet``.
        topology: The topology it was built from.
        ds_heads: Number of extra supervision heads (0: none).
    """

    def __init__(self, net: DynUNet, topology: Topology, ds_heads: int) -> None:
        super().__init__()
        self.net = net
        self.topology = topology
        self.ds_heads = ds_heads
        self.spatial_dims = len(topology.strides[0])
        self.divisible_by_axes = topology.divisible_by_axes
        self.divisible_by = topology.divisible_by

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if not (self.training and self.ds_heads):
            return self.net(x)
        # DynUNet's skip layers write each head's native-resolution logits into the shared
        # `heads` list during the pass; reading them directly avoids the full-resolution
        # interpolate-and-stack that DynUNet.forward does in train mode.
        out = self.net.output_block(self.net.skip_layers(x))
        return [out] + list(self.net.heads[: self.ds_heads])


def _replace_bottleneck(net: DynUNet, new: nn.Module) -> None:
    """Swap DynUNet's bottleneck, which is referenced both as an attribute and by the deepest skip layer."""
    layer = net.skip_layers
    while getattr(layer, "next_layer", None) is not net.bottleneck:
        layer = getattr(layer, "next_layer", None)
        if layer is None:
            raise RuntimeError("DynUNet layout changed: could not find the bottleneck in skip_layers")
    layer.next_layer = new
    net.bottleneck = new


def build_dynunet(
    name: str,
    p: "UNet2DParams | UNet3DParams",
    in_channels: int,
    num_classes: int,
    patch_size: Sequence[int],
    spacing: Optional[Sequence[float]],
    dims: int,
) -> NNUNet:
    """Derive the topology and build the wrapped DynUNet.

    Args:
        name: Backbone name (for messages).
        p: Validated params.
        in_channels: Input channels.
        num_classes: Output classes.
        patch_size: Training patch, ``dims`` axes.
        spacing: Voxel spacing in the same order, or None (isotropic).
        dims: 2 or 3.

    Raises:
        ConfigError: wrong patch dimensionality, too small a patch, or a patch not divisible by
            the derived strides.
    """
    if len(patch_size) != dims:
        raise ConfigError(f"{name}: patch_size must have {dims} axes, got {tuple(patch_size)}")
    topo = derive_topology(patch_size, spacing, min_size=p.min_size, max_stages=p.max_stages)
    if topo.n_stages < 3:
        raise ConfigError(
            f"{name}: patch {tuple(patch_size)} allows only {topo.n_stages - 1} downsampling(s) "
            f"with min_size={p.min_size}; DynUNet needs at least 2 (use a larger patch)"
        )
    check_patch(name, patch_size, topo.divisible_by_axes)
    filters = [min(p.filters_base * 2**i, p.filters_max) for i in range(topo.n_stages)]
    # DynUNet requires deep_supr_num < number of upsampling layers (n_stages - 1).
    ds = min(p.ds_heads, topo.n_stages - 2) if p.deep_supervision else 0
    kernels: List[Tuple[int, ...]] = list(topo.kernels)
    strides: List[Tuple[int, ...]] = list(topo.strides)
    net = DynUNet(
        spatial_dims=dims,
        in_channels=in_channels,
        out_channels=num_classes,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters,
        dropout=p.dropout or None,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=ds > 0,
        deep_supr_num=max(ds, 1),
        res_block=p.res_block,
    )
    if getattr(p, "deformable", False):
        if dims != 2:
            raise ConfigError(f"{name}: the deformable bottleneck is 2D only")
        stride = (int(strides[-1][0]), int(strides[-1][1]))
        _replace_bottleneck(net, DeformableBottleneck(filters[-2], filters[-1], stride, p.deformable_modulated))
    return NNUNet(net, topo, ds)


@BACKBONES.register("unet2d", params=UNet2DParams, spatial_dims=2)
def unet2d(p: UNet2DParams, in_channels: int, num_classes: int, patch_size: Sequence[int],
           spacing: Optional[Sequence[float]]) -> NNUNet:
    """nnU-Net-like 2D U-Net (source paper's 2D nnU-Net; ``deformable: true`` for its variant)."""
    return build_dynunet("unet2d", p, in_channels, num_classes, patch_size, spacing, 2)


@BACKBONES.register("unet3d", params=UNet3DParams, spatial_dims=3)
def unet3d(p: UNet3DParams, in_channels: int, num_classes: int, patch_size: Sequence[int],
           spacing: Optional[Sequence[float]]) -> NNUNet:
    """nnU-Net-like 3D U-Net; patch and spacing in (D, H, W) order."""
    return build_dynunet("unet3d", p, in_channels, num_classes, patch_size, spacing, 3)


__all__ = ["UNet2DParams", "UNet3DParams", "NNUNet", "build_dynunet", "unet2d", "unet3d"]
