"""A tiny two-member ensemble (unet2d fold 0 + unet fold 1) for ensemble, registry and Serve tests.

Both members train for seconds on the tiny synthetic config (`tiny.tiny_cfg`), so their masks
are rough, but every code path (grouping, two-stage centring, inversion to the input grid)
runs on real checkpoints.
"""
import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, List

import torch

from robustseg.engine.train import train_from_config
from tiny import tiny_cfg


def tiny_member_checkpoints(root: Path) -> List[Path]:
    """Train (once per ``root``) the two members and return their ``best.pt`` paths."""
    out = []
    for fold, (backbone, params) in enumerate([("unet2d", {"filters_base": 4, "filters_max": 16, "max_stages": 3}),
                                               ("unet", {"base": 4, "depth": 3})]):
        ckpt = root / f"member{fold}" / "best.pt"
        if not ckpt.is_file():
            # Name and params together: the load-time check fits unet2d's params to unet otherwise.
            cfg = tiny_cfg(root, **{"data.val_fold": fold, "model.name": backbone, "model.params": params,
                                    "optim.epochs": 2})
            train_from_config(cfg, out_dir=ckpt.parent, device=torch.device("cpu"))
        out.append(ckpt)
    return out


def tiny_ensemble_folder(root: Path, **spec_kwargs) -> Path:
    """An ensemble folder (`robustseg.ensemble.Ensemble.save`) over the two tiny members."""
    from robustseg.ensemble import Ensemble

    ens = Ensemble.from_checkpoints(tiny_member_checkpoints(root), name="tiny", device=torch.device("cpu"),
                                    **spec_kwargs)
    return ens.save(root / "ensemble")


@contextlib.contextmanager
def local_serve(settings: Any) -> Iterator[str]:
    """A real local Ray + Serve app for one test module: yields its base URL, stops what it started."""
    import ray

    from conftest import free_port
    from deploy.serve_app import start_local, stop

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        yield start_local(settings, "127.0.0.1", free_port())
    finally:
        try:
            stop()
        finally:
            ray.shutdown()
