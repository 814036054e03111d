"""One search space per training regime that exists (today: ``supervised``).

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


REGIME_SPACES = ("supervised",)

__all__ = ["REGIME_SPACES", "supervised"]
