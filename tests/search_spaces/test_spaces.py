"""Every registered search space samples valid, buildable configs (no Ray here)."""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Dict, List

import optuna
import pytest

import robustseg.regimes  # noqa: F401  (registers the regimes)
import search_spaces
from robustseg.config import ExperimentConfig, from_dict
from robustseg.errors import ConfigError, UnknownNameError
from robustseg.models import build_model
from robustseg.registry import BACKBONES, REGIMES, SEARCH_SPACES
from search_spaces import apply_sample, flatten_sample, get_space, nest_sample

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Patch (and spacing) each backbone is built at: small, but valid for the sampled architecture
# (swin_unet's input must be a multiple of 4 * 2**3 * window = 224).
BUILD_AT = {
    "unet2d": ((64, 64), None),
    "unet3d": ((16, 64, 64), (5.0, 1.5, 1.5)),
    "swin_unetr": ((64, 64), None),
    "swin_unet": ((224, 224), None),
    "attention_unet": ((64, 64), None),
    "unet": ((64, 64), None),
}
# Build-check-only overrides that keep the sampled widths but cut the time to build: one
# Swin block per stage instead of two (the input-size contract does not depend on depths).
BUILD_OVERRIDES = {"swin_unet": {"depths": [1, 1, 1, 1]}}
N_TRIALS = 6


def base_config() -> ExperimentConfig:
    # Deliberately another backbone with its own params: a space switching the backbone must
    # not inherit them.
    return ExperimentConfig.from_dict({"model": {"name": "unet", "params": {"base": 8, "depth": 2}},
                                       "data": {"folds": 2}})


def sample_with_study(name: str, n: int = N_TRIALS) -> List[Any]:
    """Run the space under a real TPE study; returns (frozen trial, returned point) pairs."""
    space = get_space(name)
    points: List[Dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        points.append(space(trial))
        return float(len(points) % 3)  # dummy value: TPE needs some spread

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=3))
    study.optimize(objective, n_trials=n)
    return list(zip(study.trials, points))


_BUILT: set = set()


def check_point(name: str, point: Dict[str, Any]) -> ExperimentConfig:
    """Merge into the base config, validate, and build what the space configures.

    Every point's params are validated; a model is built once per architecture (params up to
    their float-valued rates, which the params dataclass range-checks without building).
    """
    assert all(isinstance(k, str) and "/" in k for k in point), point
    cfg = ExperimentConfig.from_dict(apply_sample(base_config().to_dict(), point))
    meta = SEARCH_SPACES.meta(name)
    if "backbones" in meta:  # multi-backbone spaces (tiny): the chosen one builds at the demo size
        assert cfg.model.name in meta["backbones"]
        model = build_model(cfg.model, (64, 64), (1.5, 1.5))
        assert sum(p.numel() for p in model.parameters()) > 0
    if "backbone" in meta:
        assert cfg.model.name == meta["backbone"]
        from_dict(BACKBONES.meta(cfg.model.name)["params"], cfg.model.params, "model.params")
        arch = (cfg.model.name, repr(sorted((k, v) for k, v in cfg.model.params.items() if not isinstance(v, float))))
        if arch not in _BUILT:
            patch, spacing = BUILD_AT[meta["backbone"]]
            params = {**cfg.model.params, **BUILD_OVERRIDES.get(cfg.model.name, {})}
            model = build_model(dataclasses.replace(cfg.model, params=params), patch, spacing)
            assert sum(p.numel() for p in model.parameters()) > 0
            _BUILT.add(arch)
    if "regime" in meta:
        assert cfg.regime.name == meta["regime"]
        from_dict(REGIMES.meta(meta["regime"])["params"], cfg.regime.params, "regime.params")
    return cfg


def test_every_backbone_and_regime_has_a_space():
    assert set(BACKBONES.names()) <= set(SEARCH_SPACES.names())
    assert set(REGIMES.names()) <= set(SEARCH_SPACES.names())
    for name in SEARCH_SPACES.names():
        meta = SEARCH_SPACES.meta(name)
        kinds = [k for k in ("backbone", "backbones", "regime") if k in meta]
        assert len(kinds) == 1, f"space {name} must declare one of backbone=, backbones= or regime="
    assert set(BUILD_AT) == set(BACKBONES.names()), "a new backbone needs a BUILD_AT entry"


@pytest.mark.parametrize("name", SEARCH_SPACES.names())
def test_space_under_study_and_fixed_trial(name):
    pairs = sample_with_study(name)
    for frozen, point in pairs:
        # Replaying the recorded parameters gives the same point: the space is a pure
        # function of the trial (what OptunaSearch and Tune restore rely on).
        assert get_space(name)(optuna.trial.FixedTrial(frozen.params)) == point
        check_point(name, point)


@pytest.mark.parametrize("params", [
    {"model/params/deformable": True, "model/params/deformable_modulated": True, "choice/mixup": True,
     "augment/mixup": 0.3, "augment/mixup_alpha": 0.4},
    {"model/params/deformable": False, "choice/mixup": False},
])
def test_unet2d_conditional_branches(params):
    fixed = {"optim/lr": 1e-2, "optim/weight_decay": 3e-5, "optim/momentum": 0.99, "loss/ce_weight": 1.0,
             "loss/ds_decay": 0.5, "augment/preset": "nnunet", "model/params/filters_base": 16,
             "model/params/res_block": False, **params}
    point = get_space("unet2d")(optuna.trial.FixedTrial(fixed))
    cfg = check_point("unet2d", point)
    assert cfg.model.params["deformable"] is params["model/params/deformable"]
    assert cfg.model.params["deformable_modulated"] is params.get("model/params/deformable_modulated", False)
    assert cfg.augment.mixup == params.get("augment/mixup", 0.0)
    assert "base" not in cfg.model.params  # the base's `unet` params were dropped with the switch


def test_supervised_space_switches_clipping_off():
    point = get_space("supervised")(optuna.trial.FixedTrial({"choice/grad_clip": False, "choice/mixup": False}))
    assert point["regime/params/grad_clip"] == 0.0 and point["augment/mixup"] == 0.0
    check_point("supervised", point)


def test_family_recipes():
    """Optimiser families and learning-rate ranges follow the published recipes."""
    lr = {name: [] for name in BACKBONES.names()}
    for name in BACKBONES.names():
        for _, point in sample_with_study(name, n=4):
            lr[name].append(point["optim/lr"])
            opt = point["optim/name"]
            assert opt == {"unet2d": "sgd_nesterov", "unet3d": "sgd_nesterov", "swin_unetr": "adamw",
                           "swin_unet": "sgd", "attention_unet": "adam", "unet": "adam"}[name]
    assert all(1e-3 <= v <= 3e-2 for v in lr["unet2d"] + lr["unet3d"])
    assert all(1e-4 <= v <= 1e-3 for v in lr["swin_unetr"])
    assert all(1e-2 <= v <= 1e-1 for v in lr["swin_unet"])


def test_get_space_unknown_lists_valid():
    with pytest.raises(UnknownNameError, match="unet2d"):
        get_space("no_such_space")


def test_spaces_pickle_by_reference():
    # OptunaSearch pickles its space with the searcher state (sweep resume).
    for name in SEARCH_SPACES.names():
        assert pickle.loads(pickle.dumps(get_space(name))) is get_space(name)


# --------------------------------------------------------------------------- apply_sample
def test_apply_sample_flat_nested_and_mixed_agree():
    base = ExperimentConfig().to_dict()
    flat = {"optim/lr": 0.003, "model/params/filters_base": 16, "augment/preset": "light"}
    nested = {"optim": {"lr": 0.003}, "model": {"params": {"filters_base": 16}}, "augment": {"preset": "light"}}
    mixed = {"optim/lr": 0.003, "model": {"params/filters_base": 16}, "augment": {"preset": "light"}}
    outs = [apply_sample(base, s) for s in (flat, nested, mixed)]
    assert outs[0] == outs[1] == outs[2]
    cfg = ExperimentConfig.from_dict(outs[0])
    assert cfg.optim.lr == 0.003 and cfg.model.params == {"filters_base": 16} and cfg.augment.preset == "light"
    assert base["optim"]["lr"] is None  # input untouched (null: the optimiser's default rate)


def test_apply_sample_keeps_params_of_same_backbone_drops_on_switch():
    base = ExperimentConfig.from_dict({"model": {"name": "unet2d", "params": {"filters_base": 4, "filters_max": 16}},
                                       "regime": {"name": "supervised", "params": {"grad_clip": 5.0}}})
    same = apply_sample(base.to_dict(), {"model/name": "unet2d", "model/params/filters_base": 8})
    assert same["model"]["params"] == {"filters_base": 8, "filters_max": 16}
    switched = apply_sample(base.to_dict(), {"model/name": "unet", "model/params/base": 8})
    assert switched["model"]["params"] == {"base": 8}
    assert switched["regime"]["params"] == {"grad_clip": 5.0}  # regime untouched


def test_apply_sample_lists_replace_and_bad_keys_fail():
    base = ExperimentConfig.from_dict({"model": {"name": "attention_unet", "params": {"channels": [4, 8, 16], "strides": [2, 2]}}})
    out = apply_sample(base.to_dict(), {"model/params/channels": [2, 4]})
    assert out["model"]["params"]["channels"] == [2, 4]
    with pytest.raises(ConfigError, match="no_such"):
        ExperimentConfig.from_dict(apply_sample(base.to_dict(), {"optim/no_such": 1}))
    with pytest.raises(ValueError):
        nest_sample({"optim": 1, "optim/lr": 2})


def test_flatten_nest_roundtrip():
    flat = {"a/b/c": 1, "a/b/d": [1, 2], "e": "x"}
    assert flatten_sample(nest_sample(flat)) == flat


def test_params_dataclasses_accept_every_sampled_key():
    """Every ``model/params/...`` key a backbone space emits is a field of that backbone's params."""
    for name in BACKBONES.names():
        fields = {f.name for f in dataclasses.fields(BACKBONES.meta(name)["params"])}
        for _, point in sample_with_study(name, n=3):
            keys = {k.split("/", 2)[2] for k in point if k.startswith("model/params/")}
            assert keys <= fields, (name, keys - fields)


def test_package_exports():
    assert set(search_spaces.space_names()) == set(SEARCH_SPACES.names())
