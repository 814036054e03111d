"""The tiny experiment every training test uses (importable: pytest's pythonpath has tests/).

Four synthetic subjects, 64x64 crops, a 4-16-filter 3-stage U-Net, 2 epochs x 3 iterations:
seconds per fit on a 2-core CPU, yet every part of the engine runs.
"""
from pathlib import Path

from robustseg.config import ExperimentConfig


def tiny_cfg(root: Path, **overrides) -> ExperimentConfig:
    """The tiny config rooted at ``root``; ``overrides`` are dotted keys (``{"optim.epochs": 3}``)."""
    cfg = ExperimentConfig.from_dict({
        "name": "tiny",
        "data": {"sources": [{"name": "synthetic_cmr", "path": "", "options": {"n_subjects": 4, "motion_levels": [0]}}],
                 "shards_uri": str(root / "shards"), "cmr": {"target_spacing": [1.5, 1.5], "crop_size": [64, 64]},
                 "folds": 2},
        "model": {"name": "unet2d", "params": {"filters_base": 4, "filters_max": 16, "max_stages": 3}},
        "optim": {"epochs": 2, "iters_per_epoch": 3, "batch_size": 4},
        "inference": {"batch_size": 16, "val_max_cases": 2, "tta": False},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "tracking": {"workdir": str(root)},
    })
    return cfg.with_overrides([f"{k}={v}" for k, v in overrides.items()])


class Stop(Exception):
    """Raised by `stop_after`: a run "killed" between epochs."""


def stop_after(n: int):
    """A fit callback that kills the run after epoch ``n`` (its checkpoint is already written)."""
    def cb(epoch, metrics, path):
        if epoch >= n:
            raise Stop()
    return cb
