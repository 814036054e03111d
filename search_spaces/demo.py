"""``demo``: the `robustseg demo` sweep, one backbone that learns fast on a CPU core.

The demo has about two minutes of two cores for its sweep, so it spends them on few, good
trials rather than on a backbone choice: on the demo phantoms (1 thread, 2,400 samples of
128x128, all 32 cases of a fold validated) the thesis's plain ``unet`` at base width 8 and
depth 3 with Adam reached mean Dice 0.87 (LV 0.95, MYO 0.82, RV 0.84) in 34 s of training,
while the nnU-Net-like ``unet2d`` at 8-32 filters with SGD-Nesterov had not yet learned the
myocardium (0.48). A trial samples Adam's learning rate around the value that works.
"""
from __future__ import annotations

from typing import Any, Dict

from robustseg.registry import SEARCH_SPACES

#: The demo's backbone: the thesis U-Net at a width one CPU core trains in seconds.
DEMO_MODEL = {"model/name": "unet", "model/params": {"base": 8, "depth": 3}}


@SEARCH_SPACES.register("demo", backbone="unet")
def demo(trial: Any) -> Dict[str, Any]:
    """The tiny plain U-Net with Adam and poly decay; the learning rate is searched."""
    return {**DEMO_MODEL, "model/params": dict(DEMO_MODEL["model/params"]), "optim/name": "adam",
            "optim/schedule": "poly", "optim/lr": trial.suggest_float("optim/lr", 1e-3, 4e-3, log=True)}
