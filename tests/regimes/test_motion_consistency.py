"""The supervised regime's clean/motion pair consistency (``regime.params.motion_consistency``)."""
from __future__ import annotations

import pytest
import torch

from robustseg.config import ConfigError, ExperimentConfig
from robustseg.engine.fit import build_optimisation, build_regime
from robustseg.models import build_model
from robustseg.regimes.supervised import SupervisedParams, motion_consistency

CPU = torch.device("cpu")
PATCH = (32, 32)


def test_consistency_is_zero_for_equal_halves_and_positive_otherwise() -> None:
    logits = torch.randn(2, 4, 8, 8)
    assert float(motion_consistency(torch.cat([logits, logits]))) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 4, 8, 8)
    assert float(motion_consistency(torch.cat([logits, other]))) > 0.01


def test_only_the_motion_half_receives_gradient() -> None:
    logits = torch.randn(4, 3, 8, 8, requires_grad=True)
    motion_consistency(logits).backward()
    assert float(logits.grad[:2].abs().sum()) == 0.0
    assert float(logits.grad[2:].abs().sum()) > 0.0


def test_a_negative_weight_is_refused() -> None:
    with pytest.raises(ConfigError, match="motion_consistency"):
        SupervisedParams(motion_consistency=-1.0)


def paired_cfg(**augment) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": {"name": "unet2d", "params": {"filters_base": 4, "filters_max": 8, "max_stages": 3}},
        "regime": {"name": "supervised", "params": {"motion_consistency": 1.0}},
        "optim": {"batch_size": 4, "amp": "off"},
        "augment": {"preset": "cardiac", **augment},
        "data": {"plan": "cmr"},
    })


def test_pairs_with_mixup_are_refused() -> None:
    cfg = paired_cfg(mixup=0.5, mixup_alpha=0.4)
    model = build_model(cfg.model, PATCH, None)
    optimizer, _ = build_optimisation(cfg, model, None)
    with pytest.raises(ConfigError, match="mixup"):
        build_regime(cfg, model, optimizer, 2, torch.Generator().manual_seed(0), CPU, None, None)


def test_a_paired_step_trains_and_reports_the_consistency() -> None:
    cfg = paired_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, PATCH, None).to(CPU)
    optimizer, _ = build_optimisation(cfg, model, None)
    regime = build_regime(cfg, model, optimizer, 2, torch.Generator().manual_seed(0), CPU, None, None)
    before = [p.detach().clone() for p in model.parameters()]
    label = torch.zeros((4, 1) + PATCH, dtype=torch.long)
    label[:, :, 8:24, 8:24] = 1
    out = regime.train_step({"image": torch.randn((4, 1) + PATCH), "label": label})
    assert "motion_consistency" in out and float(out["motion_consistency"]) > 0
    assert torch.isfinite(out["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
