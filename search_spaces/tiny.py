"""``tiny``: two small backbones, the quickest space with an architecture choice.

A trial picks ``unet2d`` (nnU-Net-like, SGD-Nesterov) or the thesis's plain ``unet`` (Adam),
both at widths a CPU trains in seconds, then the learning rate of that family. The learning
rates are separate Optuna parameters per branch (one distribution per name, see
`search_spaces`). Tests, the cluster examples and ``ray job`` examples use it to exercise a
fold-by-architecture ensemble in seconds; `robustseg demo` uses ``demo`` (one backbone).
"""
from __future__ import annotations

from typing import Any, Dict

from robustseg.registry import SEARCH_SPACES

TINY = {
    "unet2d": {"filters_base": 8, "filters_max": 32, "max_stages": 4},
    "unet": {"base": 8, "depth": 3},
}


@SEARCH_SPACES.register("tiny", backbones=tuple(TINY))
def tiny(trial: Any) -> Dict[str, Any]:
    """Backbone choice among two tiny U-Nets, plus its optimiser's learning rate."""
    backbone = trial.suggest_categorical("model/name", list(TINY))
    out: Dict[str, Any] = {"model/name": backbone, "model/params": dict(TINY[backbone])}
    if backbone == "unet2d":
        out.update({"optim/name": "sgd_nesterov", "optim/momentum": 0.99, "optim/schedule": "poly",
                    "optim/lr": trial.suggest_float("optim/lr|sgd", 3e-3, 3e-2, log=True)})
    else:
        out.update({"optim/name": "adam", "optim/schedule": "poly",
                    "optim/lr": trial.suggest_float("optim/lr|adam", 3e-4, 3e-3, log=True)})
    return out
