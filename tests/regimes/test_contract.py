"""Every registered regime keeps the `robustseg.regimes.Regime` contract (issue 13, item 4).

One parametrised test per property, over every name in `REGIMES`, with the fit loop's own
`build_regime` on a tiny 2D net: a step changes the weights; ``state_dict`` round-trips
bit-exact into a fresh regime; two runs from the same seed take identical steps.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import pytest
import torch

from robustseg.config import ExperimentConfig
from robustseg.engine.fit import build_optimisation, build_regime
from robustseg.models import build_model
from robustseg.regimes import Regime
from robustseg.registry import REGIMES

CPU = torch.device("cpu")
PATCH = (32, 32)


def cfg_for(name: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "model": {"name": "unet2d", "params": {"filters_base": 4, "filters_max": 8, "max_stages": 3}},
        "regime": {"name": name},
        "optim": {"batch_size": 2, "amp": "off"},
        "augment": {"preset": "none"},
    })


def batches(seed: int, labelled: bool) -> Iterator[Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        image = torch.randn((2, 1) + PATCH, generator=g)
        label = torch.zeros((2, 1) + PATCH, dtype=torch.long)
        label[:, :, 8:24, 8:24] = 1
        label[:, :, 12:20, 12:20] = 2
        yield {"image": image, "label": label} if labelled else {"image": image}


def build(name: str, seed: int = 0) -> Tuple[Any, torch.nn.Module]:
    """A regime set up the way `fit` sets it up, on a fresh seeded model."""
    torch.manual_seed(seed)
    cfg = cfg_for(name)
    model = build_model(cfg.model, PATCH, None).to(CPU)
    optimizer, _ = build_optimisation(cfg, model, None)
    semi = REGIMES.meta(name).get("data") == "semi"
    regime = build_regime(cfg, model, optimizer, 2, torch.Generator().manual_seed(seed), CPU, None,
                          batches(seed + 1, labelled=False) if semi else None)
    return regime, model


def weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested state (tensors, containers, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


NAMES = REGIMES.names()


def test_every_regime_is_covered() -> None:
    assert {"supervised", "advchain", "genesis", "mean_teacher"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_step_changes_the_weights_and_reports_finite_terms(name: str) -> None:
    regime, model = build(name)
    assert isinstance(regime, Regime)
    before = weights(model)
    parts = regime.train_step(next(batches(0, labelled=True)))
    assert "loss" in parts and all(torch.isfinite(torch.as_tensor(v)).all() for v in parts.values())
    after = weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_bit_exact(name: str) -> None:
    regime, _ = build(name)
    data = batches(0, labelled=True)
    for _ in range(2):
        regime.train_step(next(data))
    state = regime.state_dict()
    fresh, _ = build(name, seed=5)
    fresh.load_state_dict(state)
    assert same(fresh.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_two_seeded_runs_take_identical_steps(name: str) -> None:
    runs = []
    for _ in range(2):
        regime, model = build(name, seed=3)
        data = batches(3, labelled=True)
        for _ in range(2):
            regime.train_step(next(data))
        runs.append(weights(model))
    assert same(runs[0], runs[1])
