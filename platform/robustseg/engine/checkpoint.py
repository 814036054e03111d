"""Checkpoints that resume exactly and explain themselves.

A checkpoint holds the model, optimiser, scheduler and regime state, every RNG that feeds
training (torch CPU/CUDA, numpy, python, and the engine's explicit data generator), the
epoch/iteration counters, the best validation score, the history, and the resolved config
and preprocessing plan it was trained with, so `robustseg predict` can rebuild the model
and invert predictions without any other file. Writes are atomic (temp file + rename): a
killed process leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from robustseg.errors import RobustsegError

FORMAT = 1


class CheckpointError(RobustsegError, ValueError):
    """A checkpoint that cannot be used: names the file and the cause."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind any nesting of torch.compile / DDP wrappers (their state-dict keys differ)."""
    while True:
        inner = getattr(model, "_orig_mod", model)
        inner = getattr(inner, "module", inner)
        if inner is model:
            return model
        model = inner


def rng_state(generator: Optional[torch.Generator]) -> Dict[str, Any]:
    """Snapshot of every RNG that influences training."""
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: Dict[str, Any], generator: Optional[torch.Generator]) -> None:
    """Restore a `rng_state` snapshot."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(path: Union[str, Path], payload: Dict[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: missing, unreadable, or not a robustseg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a robustseg checkpoint (no model/config entries)")
    return ckpt


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str,
                     expected_backbone: Optional[str] = None, found_backbone: Optional[str] = None) -> None:
    """Load weights strictly, explaining a mismatch instead of dumping key lists.

    Raises:
        CheckpointError: another backbone, or missing/unexpected/mis-shaped parameters.
    """
    if expected_backbone and found_backbone and expected_backbone != found_backbone:
        raise CheckpointError(f"{where}: checkpoint is a {found_backbone!r} model, the config asks for {expected_backbone!r}")
    target = unwrap(model)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        def head(keys: list) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: " + head(
                [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes]))
        raise CheckpointError(f"{where}: weights do not fit the model ({'; '.join(parts)})")
    target.load_state_dict(state)


def split_payload(ckpt: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(config dict, plan dict) stored in a checkpoint."""
    return ckpt["config"], ckpt.get("plan") or {}
