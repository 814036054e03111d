"""Transfer learning (lung CT thesis Ch. 3): fine-tuning modes, freezing, re-initialisation, 3D -> 2D."""
from __future__ import annotations

import pytest
import torch

from robustseg.config import ExperimentConfig, ModelConfig
from robustseg.engine.checkpoint import load_checkpoint, save_checkpoint
from robustseg.engine.init import apply_init, resolve_init
from robustseg.engine.train import train_from_config
from robustseg.errors import ConfigError
from robustseg.models import build_model
from robustseg.models.transfer import apply_finetune, flatten_3d_to_2d, transfer_layout
from tiny import tiny_cfg

CPU = torch.device("cpu")
DYN = {"filters_base": 4, "filters_max": 16, "max_stages": 3}


def _model(name, params=None, patch=(64, 64)):
    return build_model(ModelConfig(name=name, num_classes=4, params=dict(params or {})), list(patch), None)


def test_flatten_known_kernel_sum_and_centre():
    conv3, conv2 = torch.nn.Conv3d(2, 3, 3, bias=False), torch.nn.Conv2d(2, 3, 3, bias=False)
    kernel = torch.arange(3 * 2 * 27, dtype=torch.float32).reshape(3, 2, 3, 3, 3)
    summed = flatten_3d_to_2d({"weight": kernel}, conv2, mode="sum")
    assert summed["flattened"] == ["weight"]
    # Element (0, 0, :, 0, 0) is 0, 9, 18 along depth: 27 summed, 9 at the centre.
    assert conv2.weight[0, 0, 0, 0].item() == 27.0
    assert torch.equal(conv2.weight, kernel.sum(2))
    flatten_3d_to_2d({"weight": kernel}, conv2, mode="centre")
    assert conv2.weight[0, 0, 0, 0].item() == 9.0 and torch.equal(conv2.weight, kernel[:, :, 1])
    # Summing reproduces the 3D response to a volume that is constant along depth.
    conv3.weight.data.copy_(kernel / 100)
    flatten_3d_to_2d(conv3.state_dict(), conv2, mode="sum")
    image = torch.randn(1, 2, 9, 9)
    volume = image[:, :, None].expand(1, 2, 3, 9, 9)
    assert torch.allclose(conv3(volume)[:, :, 0], conv2(image), atol=1e-5)
    with pytest.raises(ValueError, match="flatten mode"):
        flatten_3d_to_2d({"weight": kernel}, conv2, mode="mean")


def test_unet3d_checkpoint_initialises_unet2d(tmp_path):
    m3 = _model("unet3d", DYN, (8, 64, 64))
    save_checkpoint(tmp_path / "g3d.pt", {"model": m3.state_dict(), "backbone": "unet3d",
                                           "config": {"model": {"name": "unet3d"}}})
    cfg = tiny_cfg(tmp_path, **{"regime.init": str(tmp_path / "g3d.pt"), "regime.init_flatten": "centre",
                                "regime.init_strict": False})
    m2 = _model("unet2d", DYN)
    state = apply_init(m2, resolve_init(cfg), cfg)
    own = m2.state_dict()
    flat = [k for k, v in m3.state_dict().items() if v.dim() == 5 and k in own and own[k].dim() == 4]
    assert flat, "no 3D kernel mapped"
    for k in flat:
        src = m3.state_dict()[k]
        assert torch.equal(own[k], src[:, :, src.shape[2] // 2])
    assert isinstance(state.skipped, list)


def test_layouts_name_real_blocks_in_order():
    for name, params, first, out in [("unet2d", DYN, "net.input_block.", "net.output_block."),
                                     ("unet", {"base": 4, "depth": 3}, "down.0.", "head."),
                                     ("attention_unet", {"channels": [4, 8, 16, 32], "strides": [2, 2, 2]},
                                      "model.0.", "model.2.")]:
        model = _model(name, params)
        layout = transfer_layout(model, name)
        names = [n for n, _ in model.named_parameters()]
        assert layout.encoder[0] == first and layout.output[0] == out
        for prefix in layout.encoder + layout.output + layout.last_block:
            assert any(n.startswith(prefix) for n in names), (name, prefix)
        assert len(layout.encoder) >= 3
    att = transfer_layout(_model("attention_unet", {"channels": [4, 8, 16, 32], "strides": [2, 2, 2]}),
                          "attention_unet")
    assert att.encoder == ["model.0.", "model.1.submodule.0.", "model.1.submodule.1.submodule.0.",
                           "model.1.submodule.1.submodule.1.submodule."]
    with pytest.raises(ValueError, match="U-Net layout"):
        transfer_layout(torch.nn.Linear(2, 2), "swin_unet")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    cfg = tiny_cfg(root, **{"optim.epochs": 1})
    train_from_config(cfg, out_dir=root / "source", device=CPU)
    return root, root / "source" / "best.pt"


def _finetune(root, src, mode, out):
    cfg = tiny_cfg(root, **{"regime.init": str(src), "regime.finetune": mode, "optim.epochs": 2,
                            "optim.name": "adam", "optim.lr": 1e-3})
    train_from_config(cfg, out_dir=root / out, device=CPU)
    return load_checkpoint(root / out / "last.pt")["model"]


def test_finetune_decoder_freezes_first_half_of_encoder(source):
    root, src = source
    before = load_checkpoint(src)["model"]
    after = _finetune(root, src, "decoder", "decoder")
    layout = transfer_layout(_model("unet2d", DYN), "unet2d")
    frozen_prefixes = layout.encoder[: len(layout.encoder) // 2]
    frozen = [k for k in before if any(k.startswith(p) for p in frozen_prefixes)]
    trained = [k for k in before if k.startswith("net.upsamples.") and k.endswith("weight")]
    assert frozen and trained
    for k in frozen:  # bit-identical after 6 optimiser steps
        assert torch.equal(before[k], after[k]), k
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    # The output layer was re-initialised (and then trained): far from the source weights.
    out_w = "net.output_block.conv.conv.weight"
    assert not torch.allclose(before[out_w], after[out_w], atol=1e-2)


def test_finetune_all_reinitialises_last_block_and_trains_everything(source):
    root, src = source
    before = load_checkpoint(src)["model"]
    after = _finetune(root, src, "all", "all")
    weights = [k for k in before if k.endswith("conv.weight") or k.endswith("conv1.conv.weight")]
    assert weights and all(not torch.equal(before[k], after[k]) for k in weights)
    # Re-initialised, not just trained: the last decoder block moved far from its source values.
    model = _model("unet2d", DYN)
    model.load_state_dict(before)
    report = apply_finetune(model, "unet2d", "all")
    assert report["frozen"] == [] and any(r.startswith("net.upsamples.1") for r in report["reinitialised"])
    moved = [k for k in before if k.startswith("net.upsamples.1.") and k.endswith("weight")]
    assert any(not torch.allclose(model.state_dict()[k], before[k], atol=1e-2) for k in moved)


def test_finetune_config_rules(tmp_path):
    with pytest.raises(ConfigError, match="set regime.init"):
        ExperimentConfig.from_dict({"regime": {"finetune": "decoder"}})
    with pytest.raises(ConfigError, match="random weights"):
        ExperimentConfig.from_dict({"regime": {"finetune": "scratch", "init": "x.pt"}})
    with pytest.raises(ConfigError, match="regime.finetune"):
        ExperimentConfig.from_dict({"regime": {"finetune": "encoder", "init": "x.pt"}})
    with pytest.raises(ConfigError, match="init_optimizer: fresh"):
        ExperimentConfig.from_dict({"regime": {"finetune": "decoder", "init": "x.pt", "init_optimizer": "checkpoint"}})
    with pytest.raises(ConfigError, match="init_flatten"):
        ExperimentConfig.from_dict({"regime": {"init_flatten": "max"}})
    assert ExperimentConfig.from_dict({"regime": {"finetune": "scratch"}}).regime.finetune == "scratch"
