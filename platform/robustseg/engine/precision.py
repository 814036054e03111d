"""Numerics per device: when bf16 autocast pays.

On CUDA, bf16 autocast is the default (tensor cores). On a CPU it pays only where the CPU
multiplies bf16 natively: Intel AMX (Sapphire Rapids and later; oneDNN picks the AMX kernels
by itself). Measured on a 2-core Xeon with AMX, DynUNet 16 -> 256 on 16 x 128 x 128 patches:
a training step 2.1x and inference 2.2x faster than float32, weights and optimiser
state staying float32 (`benchmarks/results/cpu_bf16.json`). Elsewhere (no AMX: most AMD and
older Intel CPUs) bf16 is emulated and slower, so ``auto`` keeps float32 there.

``ROBUSTSEG_CPU_BF16=0`` switches the CPU default off (``1`` forces it on), e.g. for
bit-reproducible comparisons across machines.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

#: Environment override of the CPU default: "1" on, "0" off, unset: by hardware.
ENV = "ROBUSTSEG_CPU_BF16"


@functools.lru_cache(maxsize=1)
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def cpu_bf16_fast() -> bool:
    """Whether bf16 autocast speeds this CPU up (AMX), unless ``ROBUSTSEG_CPU_BF16`` says otherwise."""
    env = os.environ.get(ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return _cpu_has_amx()


def autocast_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for ``optim.amp`` (``auto``/``bf16``/``off``) on ``device``, or None.

    ``auto``: bf16 on CUDA, and on CPUs where `cpu_bf16_fast`; ``bf16``: everywhere.
    """
    if setting == "off":
        return None
    if setting == "bf16" or device.type == "cuda" or (device.type == "cpu" and cpu_bf16_fast()):
        return torch.bfloat16
    return None


def inference_amp(device: torch.device) -> bool:
    """Whether inference on ``device`` runs under bf16 autocast by default (as ``auto`` training)."""
    return autocast_dtype("auto", device) is not None
