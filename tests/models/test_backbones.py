"""Every registered backbone builds, runs forward and backward at a tiny size, and validates
its params; plus the pure-torch deformable convolution and Swin-UNet internals."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import robustseg.models  # noqa: F401  (registers the backbones)
from robustseg.config import ModelConfig
from robustseg.errors import ConfigError
from robustseg.models import build_model, spatial_dims
from robustseg.models.deformable import DeformableBlock, DeformableBottleneck, deform_conv2d
from robustseg.models.swin_unet import (
    SwinUNet,
    SwinUNetParams,
    WindowAttention,
    shifted_window_mask,
    window_merge,
    window_partition,
)
from robustseg.models.transfer import ENCODER_PREFIXES, flatten_3d_to_2d, freeze, reinitialize
from robustseg.registry import BACKBONES

NUM_CLASSES = 4

# name -> (tiny params, patch size, spacing). A backbone registered without an entry fails
# test_every_backbone_has_tiny_params: new families must join the parametrised test.
TINY = {
    "unet2d": ({"filters_base": 4, "filters_max": 16, "ds_heads": 2}, (64, 64), None),
    "unet3d": ({"filters_base": 4, "filters_max": 16, "ds_heads": 2}, (8, 32, 32), (10.0, 1.5, 1.5)),
    "swin_unetr": ({"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4}, (64, 64), None),
    "swin_unet": ({"embed_dim": 12, "depths": [1, 1, 1], "num_heads": [1, 2, 2], "window_size": 4}, (64, 64), None),
    "attention_unet": ({"channels": [4, 8, 16], "strides": [2, 2]}, (64, 64), None),
    "unet": ({"base": 4, "depth": 3}, (64, 64), None),
}

# One invalid value per backbone: __post_init__ must turn it into a ConfigError.
INVALID = {
    "unet2d": {"filters_base": 0},
    "unet3d": {"ds_heads": 0},
    "swin_unetr": {"feature_size": 20},
    "swin_unet": {"num_heads": [1, 2]},
    "attention_unet": {"strides": [2]},
    "unet": {"depth": 0},
}


def _build(name: str, **override):
    params, patch, spacing = TINY[name]
    return build_model(ModelConfig(name=name, params={**params, **override}, in_channels=1,
                                   num_classes=NUM_CLASSES), patch, spacing)


def test_every_backbone_has_tiny_params():
    names = BACKBONES.names()
    assert set(names) >= {"unet2d", "unet3d", "swin_unetr", "swin_unet", "attention_unet", "unet"}
    missing = sorted(set(names) - set(TINY))
    assert not missing, f"registered backbones without a TINY entry in this test: {missing}"
    assert not sorted(set(names) - set(INVALID))


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_forward_backward(name):
    torch.manual_seed(0)
    model = _build(name)
    _, patch, _ = TINY[name]
    dims = spatial_dims(name)
    assert model.spatial_dims == dims == len(patch)
    assert isinstance(model.divisible_by, int) and all(p % model.divisible_by == 0 for p in patch)
    assert all(p % d == 0 for p, d in zip(patch, model.divisible_by_axes))
    batch = 2 if dims == 2 else 1
    x = torch.randn(batch, 1, *patch)

    model.train()
    out = model(x)
    outs = out if isinstance(out, list) else [out]
    assert tuple(outs[0].shape) == (batch, NUM_CLASSES, *patch)
    for coarse, fine in zip(outs[1:], outs[:-1]):  # deep supervision: coarser and coarser
        assert coarse.shape[:2] == (batch, NUM_CLASSES)
        assert all(c <= f for c, f in zip(coarse.shape[2:], fine.shape[2:]))
    for o in outs:
        assert torch.isfinite(o).all()
    target = torch.randint(0, NUM_CLASSES, (batch, *patch))
    loss = sum(F.cross_entropy(o, F.interpolate(target[:, None].float(), size=o.shape[2:]).squeeze(1).long())
               for o in outs)
    loss.backward()
    first = next(model.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0, "no gradient at the first layer"
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad[:5]}"

    model.eval()
    with torch.no_grad():
        y = model(x)
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (batch, NUM_CLASSES, *patch)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", BACKBONES.names())
def test_params_validation(name):
    params_cls = BACKBONES.meta(name)["params"]
    params_cls()  # defaults are valid
    for f in dataclasses.fields(params_cls):
        assert f.metadata.get("doc"), f"{name}.{f.name} has no doc"
    valid = [f.name for f in dataclasses.fields(params_cls)]
    with pytest.raises(ConfigError, match="valid keys") as e:
        build_model(ModelConfig(name=name, params={"no_such_param": 1}), TINY[name][1], TINY[name][2])
    assert all(k in str(e.value) for k in valid)
    with pytest.raises(ConfigError):
        _build(name, **INVALID[name])


@pytest.mark.parametrize("name,patch", [("unet2d", (60, 64)), ("swin_unet", (96, 96)), ("swin_unetr", (48, 64)),
                                        ("unet", (36, 64)), ("unet3d", (8, 30, 32))])
def test_indivisible_patch_fails_early(name, patch):
    params, _, spacing = TINY[name]
    with pytest.raises(ConfigError, match="not divisible"):
        build_model(ModelConfig(name=name, params=params), patch, spacing)


def test_swin_unet_forward_rejects_bad_size():
    model = _build("swin_unet").eval()
    with pytest.raises(ValueError, match="multiple of 64"):
        model(torch.randn(1, 1, 96, 96))


def test_unet2d_deep_supervision_heads_native_resolution():
    model = _build("unet2d", ds_heads=3).train()
    outs = model(torch.randn(2, 1, 64, 64))
    assert [o.shape[-1] for o in outs] == [64, 32, 16, 8]
    model = _build("unet2d", deep_supervision=False).train()
    assert isinstance(model(torch.randn(2, 1, 64, 64)), torch.Tensor)


def test_unet3d_uses_anisotropic_topology():
    model = _build("unet3d")
    assert model.net.strides[1] == (1, 2, 2) and model.net.kernel_size[0] == (1, 3, 3)
    assert model.divisible_by_axes[0] < model.divisible_by_axes[1]


# ------------------------------------------------------------------ deformable convolution
@pytest.mark.parametrize("stride,padding,dilation,k,size", [
    (1, 1, 1, 3, (9, 7)), (2, 1, 1, 3, (8, 8)), (1, 2, 2, 3, (10, 10)), (2, 2, 1, 5, (11, 9)), (1, 1, 1, 3, (1, 1)),
])
def test_deform_conv_equals_conv2d_at_zero_offsets(stride, padding, dilation, k, size):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, *size), torch.randn(5, 3, k, k), torch.randn(5)
    ref = F.conv2d(x, w, b, stride, padding, dilation)
    offset = torch.zeros(2, 2 * k * k, *ref.shape[2:])
    out = deform_conv2d(x, offset, w, b, stride, padding, dilation)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_deform_conv_integer_offset_shifts_sampling():
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3)
    offset = torch.zeros(1, 18, 8, 8)
    offset[:, 0::2] = 1.0  # every tap reads one row lower
    ref = F.conv2d(F.pad(x, (1, 1, 0, 2)), w)
    torch.testing.assert_close(deform_conv2d(x, offset, w), ref, atol=1e-5, rtol=1e-5)


def test_deform_conv_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    # Fractional offsets away from integer grid points, where bilinear sampling is smooth.
    off = (torch.rand(1, 18, 5, 5, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: deform_conv2d(a, c, b), (x, w, off))


@pytest.mark.parametrize("modulated", [False, True])
def test_deformable_block_offsets_learn(modulated):
    torch.manual_seed(0)
    block = DeformableBlock(4, 6, modulated=modulated)
    x = torch.randn(2, 4, 8, 8)
    y0 = block(x)
    y0.square().mean().backward()
    assert block.offset.weight.grad is not None and block.offset.weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.offset.bias.normal_(0, 0.5)
    assert not torch.allclose(block(x), y0, atol=1e-4)


def test_unet2d_deformable_bottleneck():
    torch.manual_seed(0)
    model = _build("unet2d", deformable=True).train()
    assert isinstance(model.net.bottleneck, DeformableBottleneck)
    outs = model(torch.randn(2, 1, 64, 64))
    sum(o.square().mean() for o in outs).backward()
    g = model.net.bottleneck.block1.offset.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ConfigError, match="valid keys"):
        _build("unet3d", deformable=True)


# ------------------------------------------------------------------ Swin-UNet internals
def test_window_partition_roundtrip():
    x = torch.randn(2, 8, 12, 5)
    win = window_partition(x, 4)
    assert win.shape == (2, 6, 16, 5)
    torch.testing.assert_close(window_merge(win, 4, 8, 12), x)


def test_window_attention_matches_monai():
    from monai.networks.nets.swin_unetr import WindowAttention as MonaiWA
    from monai.networks.nets.swin_unetr import compute_mask

    torch.manual_seed(0)
    ws, dim, heads = 4, 8, 2
    ours = WindowAttention(dim, heads, ws, True, 0.0, 0.0).eval()
    ref = MonaiWA(dim, heads, (ws, ws), qkv_bias=True).eval()
    ref.load_state_dict(ours.state_dict(), strict=False)
    mask = shifted_window_mask(8, 8, ws, 2, torch.device("cpu"))
    torch.testing.assert_close(mask, compute_mask([8, 8], (ws, ws), (2, 2), torch.device("cpu")))
    x = torch.randn(3, 4, ws * ws, dim)  # (B, nWin, N, C)
    expected = ref(x.reshape(12, ws * ws, dim), mask).reshape(3, 4, ws * ws, dim)
    torch.testing.assert_close(ours(x, mask), expected, atol=1e-5, rtol=1e-5)


def test_swin_unet_loads_local_pretrained(tmp_path):
    torch.manual_seed(0)
    params = dict(TINY["swin_unet"][0])
    src = SwinUNet(SwinUNetParams(**params), in_channels=3, num_classes=7)
    # An encoder-only, RGB, classification-style checkpoint, as Swin-T ImageNet weights are.
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("layers_up", "seg_head"))}
    sd["head.weight"] = torch.zeros(1000, 48)
    path = tmp_path / "swin.pth"
    torch.save({"model": sd}, path)
    model = _build("swin_unet", pretrained_path=str(path))
    rep = model.pretrained_report
    assert "head.weight" in rep["unexpected"] and not rep["shape_mismatch"]
    assert any(k.startswith("seg_head") for k in rep["missing"])
    torch.testing.assert_close(model.layers[1].blocks[0].attn.qkv.weight, src.layers[1].blocks[0].attn.qkv.weight)
    # decoder level 0 is initialised from encoder stage 0 (same width)
    torch.testing.assert_close(model.layers_up[-1].blocks[0].mlp.fc1.weight, src.layers[0].blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    with pytest.raises(ConfigError, match="file not found"):
        _build("swin_unet", pretrained_path=str(tmp_path / "missing.pth"))


def test_swin_unet_default_divisibility():
    assert SwinUNetParams().divisible_by == 224  # Swin-T at 224: 4 * 2**3 * 7


# ------------------------------------------------------------------ transfer helpers
@pytest.mark.parametrize("name", sorted(ENCODER_PREFIXES))
def test_encoder_freeze_leaves_decoder_trainable(name):
    model = _build(name).train()
    frozen = freeze(model, ENCODER_PREFIXES[name])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert frozen and trainable and not set(frozen) & set(trainable)
    freeze(model, [""], frozen=False)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no parameter matches"):
        freeze(model, ["no_such_module."])


def test_reinitialize_resets_weights():
    model = _build("unet")
    before = model.head.weight.detach().clone()
    assert reinitialize(model, ["head."]) == ["head"]
    assert not torch.equal(before, model.head.weight)


def test_flatten_3d_to_2d():
    torch.manual_seed(0)
    m3 = _build("unet3d")
    m2 = build_model(ModelConfig(name="unet2d", params=TINY["unet3d"][0], num_classes=NUM_CLASSES), (32, 32))
    assert m2.topology.n_stages == m3.topology.n_stages
    rep = flatten_3d_to_2d(m3.state_dict(), m2)
    assert rep["flattened"] and not rep["missing"] and not rep["skipped"]
    w3 = m3.net.input_block.conv1.conv.weight  # (O, I, 1, 3, 3) on 10 mm slices
    torch.testing.assert_close(m2.net.input_block.conv1.conv.weight, w3.sum(2))
    m2.eval()(torch.randn(1, 1, 32, 32))
