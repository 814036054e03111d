"""Numerics per device: bf16 autocast where it pays (CUDA, CPUs with AMX), float32 elsewhere.

The suite runs with ``ROBUSTSEG_CPU_BF16=0`` (conftest) so cross-path equality tests compare
float32 results on every machine; these tests switch the CPU bf16 path on explicitly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from robustseg.engine import precision
from robustseg.engine.inference import sliding_window_2d
from robustseg.engine.train import train_from_config
from tiny import tiny_cfg

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("env,setting,device,expected", [
    ("0", "auto", CPU, None), ("1", "auto", CPU, torch.bfloat16), ("0", "bf16", CPU, torch.bfloat16),
    ("1", "off", CPU, None), ("0", "auto", CUDA, torch.bfloat16), ("0", "off", CUDA, None),
])
def test_autocast_dtype_by_setting_device_and_override(monkeypatch, env, setting, device, expected):
    monkeypatch.setenv(precision.ENV, env)
    assert precision.autocast_dtype(setting, device) is expected
    assert precision.inference_amp(device) is (precision.autocast_dtype("auto", device) is not None)


def test_cpu_default_follows_the_native_bf16_flags(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    # The flag parser itself, on this machine: whatever it reports is one of the known flags.
    assert precision.cpu_native_bf16() in ("",) + precision.NATIVE_BF16_FLAGS
    for flag, fast in (("amx_bf16", True), ("avx512_bf16", True), ("", False)):
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: flag)
        assert precision.cpu_bf16_fast() is fast


class Bright(torch.nn.Module):
    def forward(self, x):
        return torch.cat([-4 * x, 4 * x], dim=1)


def test_cpu_bf16_inference_gives_float32_probabilities_and_the_same_labels():
    image = torch.linspace(-1, 1, 3 * 40 * 40).reshape(3, 40, 40)
    fp32 = sliding_window_2d(Bright(), image, 2, patch_size=(16, 16), tta=True, amp=False)
    bf16 = sliding_window_2d(Bright(), image, 2, patch_size=(16, 16), tta=True, amp=True)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.sum(0), torch.ones(3, 40, 40), atol=1e-5)
    assert (bf16 - fp32).abs().max() < 0.05  # bf16 logits: ~3 significant digits
    away = (image.abs() > 0.02)[None].expand(2, -1, -1, -1)[0]  # ties at 0 may flip
    assert torch.equal(bf16.argmax(0)[away], fp32.argmax(0)[away])


@pytest.mark.slow
def test_cpu_bf16_training_keeps_float32_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENV, "1")
    res = train_from_config(tiny_cfg(tmp_path, **{"optim.epochs": 1}), out_dir=tmp_path / "run", device=CPU)
    assert np.isfinite(res.history[-1]["loss"]) and np.isfinite(res.history[-1]["val_dice"])
    state = torch.load(res.last_checkpoint, map_location="cpu", weights_only=False)["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if torch.is_floating_point(v))
