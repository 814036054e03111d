"""``swin_unet``: a pure-transformer 2D Swin-UNet with a convolutional refinement head.

Swin-UNet (Cao et al. 2021) is a U-shaped Swin transformer: patch embedding, stages of
shifted-window attention blocks (Liu et al. 2021) with patch merging on the way down and patch
expanding on the way up, skip connections fused by a linear layer, and a final 4x patch
expanding back to pixels. Because its smallest unit is a 4x4 patch, raw Swin-UNet masks have
zig-zag margins; the source paper (§2.2) adds two convolutional layers with layer norm and
LeakyReLU at the end, which the ``refine_head`` option reproduces (3x3 conv + channel
LayerNorm + LeakyReLU, then a 1x1 classifier).

No absolute position embedding is used, so the network runs at any size that is a multiple
of ``patch_size * 2**(stages - 1) * window_size`` (224 for the Swin-T defaults). Module names
follow the Swin-T ImageNet checkpoints (``patch_embed``, ``layers.i.blocks.j.attn.qkv``, ...)
so ``pretrained_path`` can load one from local disk; encoder stage weights also initialise
the matching decoder stages, as Swin-UNet does. Nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from robustseg.config import doc
from robustseg.errors import ConfigError
from robustseg.models.topology import check_patch
from robustseg.registry import BACKBONES

log = logging.getLogger(__name__)


@dataclass
class SwinUNetParams:
    """Pure-transformer Swin-UNet (Swin-T defaults at 224 x 224)."""

    patch_size: int = doc(4, "Patch embedding size (pixels per token side).")
    embed_dim: int = doc(96, "Token width of the first stage; doubles per stage.")
    depths: List[int] = doc([2, 2, 2, 2], "Swin blocks per stage (encoder; the decoder mirrors all but the bottom).")
    num_heads: List[int] = doc([3, 6, 12, 24], "Attention heads per stage; must divide embed_dim * 2**stage.")
    window_size: int = doc(7, "Attention window (tokens per side).")
    mlp_ratio: float = doc(4.0, "MLP hidden width / token width.")
    qkv_bias: bool = doc(True, "Bias in the query/key/value projection.")
    drop_rate: float = doc(0.0, "Dropout after attention/MLP projections.")
    attn_drop_rate: float = doc(0.0, "Attention-weight dropout.")
    drop_path_rate: float = doc(0.1, "Stochastic depth, increasing linearly to this rate over the encoder blocks.")
    refine_head: bool = doc(True, "Source paper's 3x3 conv + LayerNorm + LeakyReLU refinement before the 1x1 classifier.")
    use_checkpoint: bool = doc(False, "Gradient checkpointing of every Swin block (less memory, slower).")
    pretrained_path: Optional[str] = doc(None, "Local Swin(-UNet) state dict to initialise from (strict=False; mismatches are logged).")

    def __post_init__(self) -> None:
        key = "model.params (swin_unet)"
        if len(self.depths) < 2 or len(self.depths) != len(self.num_heads):
            raise ConfigError(f"{key}: depths and num_heads need the same length >= 2, got {self.depths}, {self.num_heads}")
        if min(self.depths) < 1 or min(self.num_heads) < 1:
            raise ConfigError(f"{key}: depths and num_heads must be >= 1")
        if self.patch_size < 1 or self.window_size < 1 or self.embed_dim < 1:
            raise ConfigError(f"{key}: patch_size, window_size and embed_dim must be >= 1")
        for i, h in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % h:
                raise ConfigError(f"{key}.num_heads[{i}]={h} does not divide the stage width {self.embed_dim * 2**i}")
        if self.embed_dim % 2:
            raise ConfigError(f"{key}.embed_dim must be even (patch expanding halves widths), got {self.embed_dim}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{key}.{name} must be in [0, 1)")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"{key}.mlp_ratio must be > 0")

    @property
    def divisible_by(self) -> int:
        """Input sizes must be multiples of this: every stage must tile into whole windows."""
        return self.patch_size * 2 ** (len(self.depths) - 1) * self.window_size


# ------------------------------------------------------------------ window helpers
def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, nWin, ws*ws, C)``, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_merge(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`."""
    b, _, _, c = x.shape
    x = x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device: torch.device) -> torch.Tensor:
    """``(nWin, N, N)`` additive mask: after the cyclic shift, tokens that came from different
    image regions share a window; they must not attend to each other."""
    def region(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - ws).long() + (i >= n - shift).long()

    ids = (region(h)[:, None] * 3 + region(w)[None, :]).view(1, h, w, 1).float()
    win = window_partition(ids, ws)[0, :, :, 0]  # (nWin, N)
    same = win[:, :, None] == win[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill(~same, -100.0)


# ------------------------------------------------------------------ blocks
class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample during training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, ws: int, qkv_bias: bool, attn_drop: float, drop: float) -> None:
        super().__init__()
        self.heads, self.ws, self.attn_drop = heads, ws, attn_drop
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]) + (ws - 1)  # (2, N, N), in [0, 2ws-2]
        # Derived, not learned: kept out of the state dict.
        self.register_buffer("relative_position_index", rel[0] * (2 * ws - 1) + rel[1], persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, nw, n, c = x.shape
        q, k, v = self.qkv(x).view(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            bias = bias + mask[:, None]  # (nWin, heads, N, N), broadcast over the batch
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(2, 3).reshape(b, nw, n, c)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention block on ``(B, H, W, C)`` tokens."""

    def __init__(self, dim: int, heads: int, ws: int, shift: int, p: SwinUNetParams, drop_path: float) -> None:
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, ws, p.qkv_bias, p.attn_drop_rate, p.drop_rate)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * p.mlp_ratio), p.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        # A window covering the whole map has nothing to shift into (Swin's rule).
        shift = self.shift if min(h, w) > self.ws else 0
        y = self.norm1(x)
        mask = None
        if shift:
            y = torch.roll(y, (-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(h, w, self.ws, shift, x.device)
        y = window_merge(self.attn(window_partition(y, self.ws), mask), self.ws, h, w)
        if shift:
            y = torch.roll(y, (shift, shift), dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one token of twice the width (halves H and W)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Order (0,0), (1,0), (0,1), (1,1) matches the Swin checkpoints' reduction weights.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """One token -> ``scale x scale`` tokens of width ``out_dim`` (a learned pixel shuffle)."""

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale, self.out_dim = scale, out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x).view(b, h, w, s, s, self.out_dim).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(b, h * s, w * s, self.out_dim))


class SwinStage(nn.Module):
    """Blocks of one resolution, alternating regular and shifted windows."""

    def __init__(self, dim: int, depth: int, heads: int, p: SwinUNetParams, dpr: Sequence[float]) -> None:
        super().__init__()
        ws = p.window_size
        self.use_checkpoint = p.use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, ws, 0 if i % 2 == 0 else ws // 2, p, dpr[i]) for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.use_checkpoint and self.training else blk(x)
        return x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ------------------------------------------------------------------ network
class SwinUNet(nn.Module):
    """Swin-UNet; see the module docstring.

    Args:
        p: Validated params.
        in_channels: Input channels.
        num_classes: Output classes.
    """

    def __init__(self, p: SwinUNetParams, in_channels: int, num_classes: int) -> None:
        super().__init__()
        n, e = len(p.depths), p.embed_dim
        dims = [e * 2**i for i in range(n)]
        self.spatial_dims = 2
        self.divisible_by = p.divisible_by
        self.divisible_by_axes = (p.divisible_by, p.divisible_by)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, e, p.patch_size, stride=p.patch_size)
        self.patch_embed.norm = nn.LayerNorm(e)
        dpr = torch.linspace(0, p.drop_path_rate, sum(p.depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            stage = SwinStage(dims[i], p.depths[i], p.num_heads[i], p, dpr[sum(p.depths[:i]): sum(p.depths[: i + 1])])
            stage.downsample = PatchMerging(dims[i]) if i < n - 1 else None
            self.layers.append(stage)
        self.norm = nn.LayerNorm(dims[-1])
        # Decoder level l (n-2 .. 0): expand from level l+1, fuse the skip, run the blocks.
        self.layers_up = nn.ModuleList()
        for l in range(n - 2, -1, -1):
            stage = SwinStage(dims[l], p.depths[l], p.num_heads[l], p, [0.0] * p.depths[l])
            stage.upsample = PatchExpand(dims[l + 1], dims[l], 2)
            stage.concat = nn.Linear(2 * dims[l], dims[l])
            self.layers_up.append(stage)
        self.norm_up = nn.LayerNorm(e)
        self.final_expand = PatchExpand(e, e, p.patch_size)
        if p.refine_head:
            self.seg_head = nn.Sequential(
                nn.Conv2d(e, e, 3, padding=1), LayerNorm2d(e), nn.LeakyReLU(0.01, inplace=True),
                nn.Conv2d(e, num_classes, 1),
            )
        else:
            self.seg_head = nn.Sequential(nn.Conv2d(e, num_classes, 1))
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.divisible_by or w % self.divisible_by:
            raise ValueError(
                f"swin_unet: input size {h}x{w} must be a multiple of {self.divisible_by} "
                "(patch_size * 2**(stages-1) * window_size); pad or crop the input"
            )
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))
        skips = []
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                skips.append(x)
                x = stage.downsample(x)
        x = self.norm(x)
        for stage, skip in zip(self.layers_up, reversed(skips)):
            x = stage(stage.concat(torch.cat((stage.upsample(x), skip), dim=-1)))
        x = self.final_expand(self.norm_up(x)).permute(0, 3, 1, 2)
        return self.seg_head(x)


def load_pretrained(model: SwinUNet, path: str) -> Dict[str, List[str]]:
    """Initialise from a local Swin / Swin-UNet state dict, tolerating mismatches.

    Args:
        model: The network to initialise in place.
        path: A ``torch.save``-d state dict (optionally under a ``model`` or ``state_dict`` key).

    Returns:
        ``{"loaded", "missing", "unexpected", "shape_mismatch"}`` key lists (also logged).

    Raises:
        ConfigError: the file is missing or is not a state dict.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"model.params.pretrained_path: {path}: file not found")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(k), dict):
            raw = raw[k]
    if not isinstance(raw, dict):
        raise ConfigError(f"model.params.pretrained_path: {path}: not a state dict")
    sd = dict(raw)
    n = len(model.layers)
    # Swin-UNet initialises each decoder stage from the encoder stage of the same width.
    for k, v in raw.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[2] == "blocks" and int(parts[1]) < n - 1:
            sd.setdefault(".".join(["layers_up", str(n - 2 - int(parts[1]))] + parts[2:]), v)
    own = model.state_dict()
    w = sd.get("patch_embed.proj.weight")
    if w is not None and own["patch_embed.proj.weight"].shape[1] != w.shape[1] and w.dim() == 4:
        # An RGB-trained embedding sees a grey image replicated into every channel: summing
        # over its input channels keeps that response for any channel count.
        c = own["patch_embed.proj.weight"].shape[1]
        sd["patch_embed.proj.weight"] = w.sum(1, keepdim=True).repeat(1, c, 1, 1) / c
    mismatch = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for k in mismatch:
        sd.pop(k)
    res = model.load_state_dict(sd, strict=False)
    report = {
        "loaded": sorted(set(sd) & set(own)),
        "missing": sorted(res.missing_keys),
        "unexpected": sorted(res.unexpected_keys),
        "shape_mismatch": sorted(mismatch),
    }
    log.info("swin_unet: loaded %d tensors from %s; missing %s; unexpected %s; shape mismatch %s",
             len(report["loaded"]), path, report["missing"], report["unexpected"], report["shape_mismatch"])
    return report


@BACKBONES.register("swin_unet", params=SwinUNetParams, spatial_dims=2)
def swin_unet(p: SwinUNetParams, in_channels: int, num_classes: int, patch_size: Sequence[int],
              spacing: Optional[Sequence[float]]) -> SwinUNet:
    """Build a Swin-UNet with the source paper's refinement head.

    Args:
        p: Validated params.
        in_channels: Input channels.
        num_classes: Output classes.
        patch_size: Training patch (H, W), multiples of ``p.divisible_by``.
        spacing: Unused.

    Raises:
        ConfigError: patch not 2D or not divisible, or an unreadable ``pretrained_path``.
    """
    if len(patch_size) != 2:
        raise ConfigError(f"swin_unet: patch_size must be (H, W), got {tuple(patch_size)}")
    check_patch("swin_unet", patch_size, (p.divisible_by, p.divisible_by))
    model = SwinUNet(p, in_channels, num_classes)
    if p.pretrained_path:
        model.pretrained_report = load_pretrained(model, p.pretrained_path)
    return model


__all__ = ["SwinUNetParams", "SwinUNet", "swin_unet", "load_pretrained", "window_partition", "window_merge"]
