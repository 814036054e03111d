"""One search space per training regime that exists (``supervised``, ``advchain``, ``genesis``, ...).

A regime space samples the regime's own parameters (``regime/params/...``) and the
step-level options the regime applies (mixup), and leaves the backbone and optimiser to the
base config, so it composes with any backbone: ``robustseg tune --space supervised`` tunes
the training step of whatever model the config names.
"""
from __future__ import annotations

from typing import Any, Dict

from robustseg.registry import SEARCH_SPACES
from search_spaces.backbones import sample_mixup

Sample = Dict[str, Any]


@SEARCH_SPACES.register("supervised", regime="supervised")
def supervised(trial: Any) -> Sample:
    """Gradient-norm clipping (nnU-Net clips at 12; 0 disables) and mixup (thesis).

    Clipping on/off is a choice of its own so the clip value is only sampled when it is used.
    """
    out: Sample = {"regime/name": "supervised"}
    if trial.suggest_categorical("choice/grad_clip", [True, False]):
        out["regime/params/grad_clip"] = trial.suggest_float("regime/params/grad_clip", 1.0, 20.0, log=True)
    else:
        out["regime/params/grad_clip"] = 0.0
    out.update(sample_mixup(trial))
    return out


@SEARCH_SPACES.register("advchain", regime="advchain")
def advchain(trial: Any) -> Sample:
    """AdvChain fine-tuning: the consistency weight, inner steps and the transform family.

    No mixup: the regime refuses it (a mixed image has no single spatial transform to undo).
    Ranges bracket the AdvChain defaults (lambda 1, one inner step, contour weight 0.5).
    """
    family = trial.suggest_categorical("choice/advchain_family", ["paper", "full"])
    return {
        "regime/name": "advchain",
        "regime/params/transforms": ["noise", "affine", "deformation"] + (["bias"] if family == "full" else []),
        "regime/params/n_iter": trial.suggest_int("regime/params/n_iter", 1, 2),
        "regime/params/consistency_weight": trial.suggest_float("regime/params/consistency_weight", 0.3, 3.0, log=True),
        "regime/params/contour_weight": trial.suggest_float("regime/params/contour_weight", 0.0, 1.0),
        "augment/mixup": 0.0,
    }


@SEARCH_SPACES.register("genesis", regime="genesis")
def genesis(trial: Any) -> Sample:
    """Models-Genesis pre-training: how hard the restoration task is.

    The corruption rates bracket Models Genesis's defaults (local shuffle 0.5, painting 0.9,
    out-painting 0.8 of that); the score is the validation restoration error. No mixup: the
    regime refuses it (a mixed image has no single original to restore).
    """
    return {
        "regime/name": "genesis",
        "regime/params/local_p": trial.suggest_float("regime/params/local_p", 0.25, 0.75),
        "regime/params/paint_p": trial.suggest_float("regime/params/paint_p", 0.6, 1.0),
        "regime/params/outpaint_p": trial.suggest_float("regime/params/outpaint_p", 0.5, 0.9),
        "regime/params/input_space": trial.suggest_categorical("regime/params/input_space", ["plan", "unit"]),
        "augment/mixup": 0.0,
    }


@SEARCH_SPACES.register("mean_teacher", regime="mean_teacher")
def mean_teacher(trial: Any) -> Sample:
    """Mean teacher: EMA decay, consistency weight and ramp-up, and the labelled batch's mixup.

    Ranges bracket Tarvainen & Valpola / UA-MT (decay 0.99, weight 0.1); the ramp-up is short
    because small-data runs take few steps. The mixup kind and ``augment.mixup`` are sampled
    together: the regime refuses a kind that contradicts the probability.
    """
    kind = trial.suggest_categorical("regime/params/mixup", ["none", "symmetric", "asymmetric"])
    return {
        "regime/name": "mean_teacher",
        "regime/params/decay": trial.suggest_float("regime/params/decay", 0.95, 0.999, log=True),
        "regime/params/consistency_weight": trial.suggest_float("regime/params/consistency_weight", 0.01, 1.0, log=True),
        "regime/params/rampup_steps": trial.suggest_int("regime/params/rampup_steps", 100, 3000, log=True),
        "regime/params/mixup": kind,
        "augment/mixup": 0.0 if kind == "none" else trial.suggest_float("augment/mixup", 0.1, 0.5),
    }


REGIME_SPACES = ("supervised", "advchain", "genesis", "mean_teacher")

__all__ = ["REGIME_SPACES", "advchain", "genesis", "mean_teacher", "supervised"]
