"""Cost of one AdvChain step relative to one supervised step, same model, same batch.

Both regimes run on one fixed batch already on the device (synthetic disks + noise), with the
random augmentation switched off (an identity augmenter) so the ratio is the regime's own
cost: supervised = forward + backward + step; AdvChain = a no-grad reference forward,
``n_iter`` x (forward + backward to the perturbation), then forward + backward + step on the
doubled batch [clean; adversarial]. The chain is drawn at random each step (as in training);
the timings cover the draws. Steps are timed one by one, interleaved (one supervised step,
then one step of each AdvChain setting, per round) and summarised by their medians, so
drift and background load hit every setting alike.

    python benchmarks/advchain_step_cost.py                     # CUDA: unet2d nnU-Net-like, 8 x 256 x 256, bf16
    python benchmarks/advchain_step_cost.py --quick             # CPU smoke: small U-Net, 4 x 64 x 64
    python benchmarks/advchain_step_cost.py --size 128 --batch 2 --steps 5 --tag moderate   # CPU, full-size model

Writes ``benchmarks/results/advchain_step_cost_<device>[_<tag>][_quick].json`` naming the
machine. Needs only torch, numpy and this package (no Ray, no MLflow).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import _sync, machine, write_result  # noqa: E402

from robustseg.config import ExperimentConfig  # noqa: E402
from robustseg.engine.fit import amp_dtype  # noqa: E402
from robustseg.engine.losses import DiceCELoss  # noqa: E402
from robustseg.engine.optim import build_optimizer  # noqa: E402
from robustseg.models import build_model  # noqa: E402
from robustseg.regimes import StepContext  # noqa: E402
from robustseg.regimes.advchain import AdvChainParams, AdvChainRegime  # noqa: E402
from robustseg.regimes.supervised import Supervised, SupervisedParams  # noqa: E402


def disk_batch(n: int, size: int, dev: torch.device, seed: int = 0) -> dict:
    """``n`` images of a ring and a disk (4 classes) with noise; labels ``(n, 1, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n, 1, size, size, dtype=torch.int64)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * 0.3 + 0.35) * size
        r = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        labels[i, 0][r < 0.25 * size] = 2
        labels[i, 0][r < 0.18 * size] = 1
        labels[i, 0][(r > 0.25 * size) & (r < 0.3 * size) & (xx > cx)] = 3
    images = labels.float() / 3 + 0.1 * torch.randn(labels.shape, generator=g)
    return {"image": images.to(dev), "label": labels.to(dev)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small U-Net, 4 x 64 x 64 (CPU smoke)")
    p.add_argument("--size", type=int, default=256, help="square slice size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n-iter", type=int, nargs="+", default=[1], help="inner steps to time (one AdvChain run each)")
    p.add_argument("--transforms", nargs="+", default=None, help="AdvChain family (default: the regime's)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ExperimentConfig()
    cfg.optim.amp = args.amp
    if args.quick:
        cfg.model.params = {"filters_base": 8, "filters_max": 64, "max_stages": 4}
        args.size, args.batch = 64, min(args.batch, 4)
    hw = (args.size, args.size)
    torch.manual_seed(0)
    model = build_model(cfg.model, hw, None).to(dev)
    amp = amp_dtype(cfg, dev)
    batch = disk_batch(args.batch, args.size, dev)

    def context(seed: int) -> StepContext:
        return StepContext(model=model, optimizer=build_optimizer(cfg.optim, model.parameters()),
                           loss_fn=DiceCELoss(cfg.loss, cfg.model.num_classes), augmenter=lambda i, l, g: (i, l),
                           generator=torch.Generator(device=dev).manual_seed(seed), device=dev, amp_dtype=amp,
                           num_classes=cfg.model.num_classes)

    model.train()
    sup = Supervised()
    sup.setup(context(0), SupervisedParams())
    advs = []
    for n_iter in args.n_iter:
        params = AdvChainParams(n_iter=n_iter, **({"transforms": args.transforms} if args.transforms else {}))
        adv = AdvChainRegime()
        adv.setup(context(1), params)
        advs.append((params, adv))
    steps = [lambda: sup.train_step(batch)] + [lambda a=a: a.train_step(batch) for _, a in advs]
    for step in steps:
        for _ in range(args.warmup):
            step()
    # Interleaved, one step of each per round, medians: background load hits all alike.
    times: list = [[] for _ in steps]
    parts: list = [[] for _ in advs]
    for _ in range(args.steps):
        for k, step in enumerate(steps):
            _sync(dev)
            t0 = time.perf_counter()
            out = step()
            _sync(dev)
            times[k].append(time.perf_counter() - t0)
            if k:
                parts[k - 1].append(float(out["inner_gain"]))
    t_sup = statistics.median(times[0])
    runs = []
    for (params, _), t, gains in zip(advs, times[1:], parts):
        t_adv = statistics.median(t)
        runs.append({"n_iter": params.n_iter, "transforms": params.transforms,
                     "advchain_s_per_step_median": round(t_adv, 5), "advchain_s_per_step_mean": round(statistics.mean(t), 5),
                     "ratio_vs_supervised": round(t_adv / t_sup, 3), "mean_inner_gain": statistics.mean(gains)})

    n_params = sum(q.numel() for q in model.parameters())
    result = {
        "benchmark": "advchain_step_cost", "device": str(dev), "machine": machine(),
        "torch_threads": torch.get_num_threads(), "backbone": cfg.model.name, "model_params": cfg.model.params,
        "n_parameters": n_params, "batch": args.batch, "slice": list(hw), "amp": str(amp),
        "augmentation": "off (identity) in both", "steps": args.steps, "warmup": args.warmup,
        "supervised_s_per_step_median": round(t_sup, 5), "supervised_s_per_step_mean": round(statistics.mean(times[0]), 5),
        "advchain": runs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_result(result, args.out, "advchain_step_cost", dev, [args.tag or "", "quick" if args.quick else ""])
    return 0


if __name__ == "__main__":
    sys.exit(main())
