"""The AdvChain regime: inner maximisation, frozen network, the network step, config, a short fit."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from robustseg.augment import build_augmenter
from robustseg.config import AugmentConfig, ConfigError, LossConfig, from_dict
from robustseg.engine.losses import DiceCELoss
from robustseg.regimes import StepContext
from robustseg.regimes.advchain import (PAPER_FINETUNE_AUGMENT, AdvChainParams, AdvChainRegime, consistency_loss,
                                        frozen)
from robustseg.registry import REGIMES

ALL = ["noise", "bias", "affine", "deformation"]


class DeepSup(nn.Module):
    """Tiny conv net with batch norm and dropout; in train mode returns [full, half] logits."""

    def __init__(self, dims: int = 2, k: int = 4) -> None:
        super().__init__()
        conv, bn, drop = (nn.Conv2d, nn.BatchNorm2d, nn.Dropout2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d, nn.Dropout3d)
        self.body = nn.Sequential(conv(1, 8, 3, padding=1), bn(8), nn.ReLU(), drop(0.3), conv(8, 8, 3, padding=2, dilation=2),
                                  nn.ReLU())
        self.head, self.aux = conv(8, k, 3, padding=1), conv(8, k, 1)
        self.dims = dims

    def forward(self, x):
        f = self.body(x)
        out = self.head(f)
        if not self.training:
            return out
        pool = nn.functional.avg_pool2d if self.dims == 2 else nn.functional.avg_pool3d
        return [out, self.aux(pool(f, 2))]


def _disk_batch(n: int = 2, size: int = 32, dims: int = 2):
    axes = torch.meshgrid(*[torch.arange(size)] * 2, indexing="ij")
    disk = ((axes[0] - size // 2) ** 2 + (axes[1] - size // 2 + 1) ** 2 < (size // 4) ** 2).long()
    label = disk[None, None].repeat(n, 1, 1, 1)
    label[:, :, size // 2:, : size // 3] = 2
    if dims == 3:
        label = label[:, :, None].repeat(1, 1, 4, 1, 1)
    g = torch.Generator().manual_seed(0)
    image = label.float() + 0.1 * torch.randn(label.shape, generator=g)
    return {"image": image, "label": label}


def _regime(model, seed: int = 0, augmenter=None, **params) -> AdvChainRegime:
    torch.manual_seed(seed)
    ctx = StepContext(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                      loss_fn=DiceCELoss(LossConfig(), 4), augmenter=augmenter or (lambda i, l, g: (i, l)),
                      generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), amp_dtype=None,
                      num_classes=4)
    regime = REGIMES.get("advchain")()
    regime.setup(ctx, AdvChainParams(**params))
    return regime


def test_registered_with_its_params_dataclass():
    assert REGIMES.get("advchain") is AdvChainRegime
    assert REGIMES.meta("advchain")["params"] is AdvChainParams


@pytest.mark.parametrize("names", [["noise"], ["bias"], ["affine"], ["deformation"], ALL])
def test_inner_loop_increases_the_consistency_loss(names):
    torch.manual_seed(1)
    model = DeepSup()
    batch = _disk_batch()
    for seed in range(3):
        regime = _regime(model, seed, transforms=names, n_iter=1)
        ref, losses = regime.attack(batch["image"], names)
        with frozen(model):
            after = regime.inner_consistency(batch["image"], ref)
        assert len(losses) == 1 and float(losses[0]) > 0
        assert float(after) > 1.05 * float(losses[0]), (names, seed)


def test_small_inner_steps_raise_the_consistency_at_every_iteration():
    torch.manual_seed(1)
    model = DeepSup()
    batch = _disk_batch()
    steps = {f"step_{n}": 0.05 for n in ALL}
    regime = _regime(model, 0, transforms=ALL, n_iter=4, **steps)
    ref, losses = regime.attack(batch["image"], ALL)
    with frozen(model):
        losses.append(regime.inner_consistency(batch["image"], ref).detach())
    assert all(b > a for a, b in zip(losses, losses[1:])), losses


def test_network_weights_and_bn_statistics_are_untouched_by_the_inner_loop():
    torch.manual_seed(2)
    model = DeepSup()
    model.body[0].bias.requires_grad_(False)  # a frozen layer must stay frozen
    batch = _disk_batch()
    model.train()
    model(batch["image"])  # non-trivial running statistics
    model.body[3].eval()  # a submodule kept in eval mode must stay there
    before = {k: v.clone() for k, v in model.state_dict().items()}
    regime = _regime(model, transforms=ALL, n_iter=3)
    regime.attack(batch["image"], ALL)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.body[1].training and not model.body[3].training
    assert [p.requires_grad for p in model.parameters()].count(False) == 1
    assert not model.body[0].bias.requires_grad and model.body[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(not p.requires_grad for p in regime.chain.parameters())


def test_frozen_restores_running_statistics_even_when_a_forward_updates_them():
    model = DeepSup()
    bn = model.body[1]
    saved = bn.running_mean.clone()
    with frozen(model):
        assert not model.training and all(not p.requires_grad for p in model.parameters())
        model.train()  # a careless callee: would update the statistics...
        model(torch.randn(2, 1, 16, 16) + 3)
        assert not torch.equal(bn.running_mean, saved)
    assert torch.equal(bn.running_mean, saved)  # ...but they come back bit-for-bit


def test_train_step_updates_the_network_and_returns_finite_parts():
    torch.manual_seed(3)
    model = DeepSup()
    batch = _disk_batch()
    regime = _regime(model, transforms=ALL, n_iter=2, adv_supervised_weight=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    out = regime.train_step(batch)
    assert set(out) == {"loss", "ce", "dice_loss", "adv_consistency", "inner_start", "inner_gain", "adv_applied"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and math.isfinite(float(v)) for v in out.values())
    assert float(out["adv_applied"]) == 1.0 and float(out["adv_consistency"]) > 0
    assert float(out["inner_gain"]) == pytest.approx(float(out["adv_consistency"] - out["inner_start"]))
    assert float(out["loss"]) > float(out["ce"])  # supervised + consistency (+ adversarial supervised)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_consistency_weight_enters_the_loss():
    def loss(weight):
        torch.manual_seed(4)
        model = DeepSup()
        return _regime(model, seed=4, transforms=["bias", "affine"], consistency_weight=weight).train_step(_disk_batch())

    a, b = loss(0.0), loss(10.0)
    assert float(a["loss"]) == pytest.approx(float(a["ce"] + a["dice_loss"]), rel=1e-5)
    assert float(b["loss"]) == pytest.approx(float(b["ce"] + b["dice_loss"] + 10 * b["adv_consistency"]), rel=1e-4)


def test_adv_p_zero_gives_plain_supervised_steps():
    model = DeepSup()
    out = _regime(model, adv_p=0.0).train_step(_disk_batch())
    assert float(out["adv_applied"]) == 0.0 and float(out["adv_consistency"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(out["ce"] + out["dice_loss"]), rel=1e-5)


def test_3d_batches_leave_out_the_deformation(caplog):
    torch.manual_seed(5)
    model = DeepSup(dims=3)
    regime = _regime(model, transforms=ALL, n_iter=1)
    with caplog.at_level(logging.WARNING, logger="robustseg.regimes.advchain"):
        for _ in range(3):
            out = regime.train_step(_disk_batch(dims=3))
            assert math.isfinite(float(out["loss"])) and "deformation" not in regime.chain.names
    assert sum("leave out the deformation" in r.message for r in caplog.records) == 1
    with pytest.raises(ConfigError, match="nothing left for 3D"):
        _regime(DeepSup(dims=3), transforms=["deformation"]).train_step(_disk_batch(dims=3))


def test_consistency_loss_values():
    ref = torch.softmax(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), 1)
    mask = torch.ones(2, 1, 8, 8)
    assert float(consistency_loss(ref, ref, mask)) == 0.0
    other = ref.roll(2, dims=-1)
    mse = ((other - ref) ** 2).sum(1).mean()
    assert float(consistency_loss(other, ref, mask, 1.0, 0.0)) == pytest.approx(float(mse), rel=1e-5)
    assert float(consistency_loss(other, ref, mask, 1.0, 0.5)) > float(mse)  # the contour term adds
    half = mask.clone()
    half[..., 4:] = 0
    masked = ((other - ref) ** 2).sum(1, keepdim=True)[half.bool()].mean()
    assert float(consistency_loss(other, ref, half, 1.0, 0.0)) == pytest.approx(float(masked), rel=1e-5)


@pytest.mark.parametrize("key, value, match", [
    ("noise_epsilon", -1.0, "regime.params.noise_epsilon must be > 0"),
    ("n_iter", -2, "regime.params.n_iter must be an integer >= 0"),
    ("scale", 1.5, r"regime.params.scale must be in \[0, 1\)"),
    ("adv_p", 2.0, "regime.params.adv_p must be a probability"),
    ("step_affine", -0.1, "regime.params.step_affine must be >= 0"),
    ("transforms", ["noise", "blur"], r"unknown transform\(s\) \['blur'\]; valid: \['noise', 'bias'"),
    ("transforms", [], "regime.params.transforms must name at least one"),
    ("bias_spacing", 0.0, r"regime.params.bias_spacing must be in \(0, 1\]"),
])
def test_config_validation_names_the_bad_field(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(AdvChainParams, {key: value}, "regime.params (advchain)")


def test_unknown_param_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epsilon'\].*valid keys: \['transforms', 'n_iter'"):
        from_dict(AdvChainParams, {"epsilon": 1.0}, "regime.params (advchain)")


def test_mixup_is_rejected():
    ctx = StepContext(model=DeepSup(), optimizer=None, loss_fn=None, augmenter=None, generator=torch.Generator(),
                      device=torch.device("cpu"), amp_dtype=None, num_classes=4, mixup_p=0.5)
    with pytest.raises(ConfigError, match="augment.mixup"):
        AdvChainRegime().setup(ctx, AdvChainParams())


def test_paper_finetune_overrides_switch_off_noise_rotation_and_scaling_only():
    aug = build_augmenter(AugmentConfig(preset="nnunet", params=PAPER_FINETUNE_AUGMENT), 2)
    assert aug.params["noise"]["p"] == aug.params["rotation"]["p"] == aug.params["scaling"]["p"] == 0.0
    assert aug.params["gamma"]["p"] == 0.3 and aug.params["mirror"]["p"] == 0.5  # the rest stays on


def test_short_fit_with_advchain_writes_a_checkpoint(tmp_path):
    from robustseg.engine.checkpoint import load_checkpoint
    from robustseg.engine.train import train_from_config
    from tiny import tiny_cfg

    cfg = tiny_cfg(tmp_path, **{"optim.epochs": 1, "optim.iters_per_epoch": 2, "regime.name": "advchain"})
    cfg.augment.params = dict(PAPER_FINETUNE_AUGMENT)
    cfg.regime.params = {"transforms": ALL, "n_iter": 1}
    res = train_from_config(cfg, out_dir=tmp_path / "run", device=torch.device("cpu"))
    assert res.epochs_run == 1 and res.last_checkpoint.exists()
    h = res.history[-1]
    for key in ("loss", "adv_consistency", "inner_gain", "val_dice"):
        assert math.isfinite(h[key])
    assert h["adv_applied"] == 1.0 and h["adv_consistency"] > 0
    ck = load_checkpoint(res.last_checkpoint)
    assert ck["config"]["regime"]["name"] == "advchain"
    assert ck["config"]["regime"]["params"] == {"transforms": ALL, "n_iter": 1}
    assert ck["regime"] == {}
