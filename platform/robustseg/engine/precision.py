"""Numerics per device: when bf16 autocast pays.

On CUDA, bf16 autocast is the default (tensor cores). On a CPU it pays only where the CPU
multiplies bf16 natively: Intel AMX (Sapphire Rapids and later) or the AVX-512 BF16 dot
products (``avx512_bf16``: AMD Zen 4 and later, Cooper Lake); oneDNN picks those kernels by
itself. Measured with DynUNet 16 -> 256 on 16 x 128 x 128 patches, weights and optimiser
state staying float32 (`benchmarks/results/cpu_bf16.json`, `cpu_bf16_amd.json`): on a 2-core
Xeon with AMX a training step 2.1x and inference 2.2x faster than float32; on a 2-core AMD
EPYC with AVX-512 BF16 2.2x and 2.4x. Elsewhere (older CPUs) bf16 is emulated and slower,
so ``auto`` keeps float32 there.

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


#: /proc/cpuinfo flags of native bf16 matrix arithmetic (either one makes autocast pay).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> str:
    """The first of `NATIVE_BF16_FLAGS` this CPU reports, or "" (none, or no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split())
                    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), "")
    except OSError:
        pass
    return ""


def cpu_bf16_fast() -> bool:
    """Whether bf16 autocast speeds this CPU up (AMX or AVX-512 BF16), unless ``ROBUSTSEG_CPU_BF16`` says otherwise."""
    env = os.environ.get(ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return bool(cpu_native_bf16())


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
