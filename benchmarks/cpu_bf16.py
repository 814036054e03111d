"""CPU numerics: float32 vs bf16 autocast for the budget's DynUNet (training step and inference).

The question `robustseg.engine.precision` answers by hardware: does bf16 autocast pay on this
CPU? Same model (configs/acdc_budget.yaml: DynUNet 16 -> 256, deep supervision), a training
step on B x 128 x 128 (forward, Dice+CE on every head, backward, SGD step; weights stay
float32) and an inference pass over W windows of 128 x 128, each timed float32 and bf16 in
turn (alternating repeats, so background load hits both alike).

    python benchmarks/cpu_bf16.py                  # -> benchmarks/results/cpu_bf16.json

Needs only torch, numpy and this package.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from robustseg.config import ExperimentConfig  # noqa: E402
from robustseg.engine.losses import DiceCELoss  # noqa: E402
from robustseg.engine.precision import cpu_native_bf16  # noqa: E402
from robustseg.models import build_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_bf16.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = ExperimentConfig.from_yaml(REPO / "configs" / "acdc_budget.yaml")
    model = build_model(cfg.model, (128, 128), None)
    loss_fn = DiceCELoss(cfg.loss, cfg.model.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(a.batch, 1, 128, 128)
    y = torch.randint(0, 4, (a.batch, 1, 128, 128))
    xi = torch.randn(a.windows, 1, 128, 128)

    def train_step(amp: bool) -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss, _ = loss_fn(out, y)
        loss.backward()
        opt.step()

    def infer(amp: bool) -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(xi)

    res = {}
    for name, fn in (("train_step", train_step), ("inference", infer)):
        times = {False: [], True: []}
        for amp in (False, True):
            fn(amp)  # warm-up (oneDNN primitive creation)
        for _ in range(a.repeats):
            for amp in (False, True):
                t0 = time.perf_counter()
                fn(amp)
                times[amp].append(time.perf_counter() - t0)
        f32, b16 = statistics.median(times[False]), statistics.median(times[True])
        res[name] = {"fp32_s": f32, "bf16_s": b16, "speedup": f32 / b16}
        print(f"{name}: fp32 {f32 * 1000:.0f} ms, bf16 {b16 * 1000:.0f} ms, x{f32 / b16:.2f}", flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    doc = {"machine": f"{cpu}, {len(os.sched_getaffinity(0))} cores, native bf16 {cpu_native_bf16() or 'no'}; "
                      f"torch {torch.__version__} ({a.threads} threads), python {platform.python_version()}",
           "settings": {"model": "configs/acdc_budget.yaml DynUNet 16-256 deep supervision", "train_batch": a.batch,
                        "inference_windows": a.windows, "patch": [128, 128], "repeats": a.repeats},
           **res}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
