"""One search space per training regime that exists (``supervised``, ``advchain``).

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


REGIME_SPACES = ("supervised", "advchain")

__all__ = ["REGIME_SPACES", "advchain", "supervised"]
