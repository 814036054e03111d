"""Training throughput: the full step vs the compute limit, as a ratio.

Full step: batch sampled from shards already decoded on the device (`SliceBatcher`) ->
GPU-side augmentation (nnU-Net preset) -> forward/backward/optimiser step (regime
``supervised``). Compute limit: the same forward/backward/step on one fixed batch already on
the device, no sampling, no augmentation. Both run in this one process: no loader workers.

    python benchmarks/train_throughput.py --shards robustseg_work/acdc/shards           # GPU: batch 24, 256x256, bf16
    python benchmarks/train_throughput.py --synthetic --quick                            # CPU smoke: tiny model

Writes ``benchmarks/results/train_throughput_<device>.json`` naming the machine. Needs
only torch, numpy, pyarrow (+ monai for the DynUNet backbone): runs without Ray.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from robustseg.augment import build_augmenter  # noqa: E402
from robustseg.config import ExperimentConfig  # noqa: E402
from robustseg.data.manifest import read_manifest  # noqa: E402
from robustseg.data.storage import open_store  # noqa: E402
from robustseg.engine.data import SliceBatcher, load_slice_set  # noqa: E402
from robustseg.engine.fit import amp_dtype  # noqa: E402
from robustseg.engine.losses import DiceCELoss  # noqa: E402
from robustseg.engine.optim import build_optimizer  # noqa: E402
from robustseg.models import build_model  # noqa: E402
from robustseg.regimes import StepContext  # noqa: E402
from robustseg.regimes.supervised import Supervised, SupervisedParams  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(step, n_warm: int, n: int, dev: torch.device) -> float:
    """Seconds per step after warm-up."""
    for _ in range(n_warm):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(dev)
    return (time.perf_counter() - t0) / n


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": __import__("os").cpu_count()}
    try:
        cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        info["cpu"] = cpu[0] if cpu else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="prepared store (e.g. robustseg_work/acdc/shards)")
    p.add_argument("--synthetic", action="store_true", help="prepare a synthetic store first")
    p.add_argument("--quick", action="store_true", help="tiny model and batch (CPU smoke)")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both measurements)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ExperimentConfig()
    cfg.optim.amp = args.amp
    cfg.optim.batch_size = args.batch
    if args.quick:
        cfg.model.params = {"filters_base": 8, "filters_max": 64, "max_stages": 4}
        args.batch = cfg.optim.batch_size = min(args.batch, 8)
    uri = args.shards
    if args.synthetic or not uri:
        from robustseg.config import SourceSpec
        from robustseg.data.prepare import prepare

        uri = str(REPO / "robustseg_work" / "bench_synthetic")
        cfg.data.sources = [SourceSpec(name="synthetic_cmr", path="", options={"n_subjects": 8, "motion_levels": [0, 2]})]
        cfg.data.cmr.target_spacing = [1.5, 1.5]
        cfg.data.cmr.crop_size = [128, 128] if args.quick else [256, 256]
        cfg.data.shards_uri = uri
        prepare(cfg.data)
    store = open_store(uri)
    manifest = read_manifest(store)
    hw = (manifest.layout.height, manifest.layout.width)
    t_load = time.perf_counter()
    data = load_slice_set(store, manifest, device=dev)
    _sync(dev)
    load_s = time.perf_counter() - t_load

    torch.manual_seed(0)
    model = build_model(cfg.model, hw, None).to(dev)
    run_model = torch.compile(model) if args.compile else model
    g = torch.Generator(device=dev).manual_seed(0)
    amp = amp_dtype(cfg, dev)
    ctx = StepContext(model=run_model, optimizer=build_optimizer(cfg.optim, model.parameters()),
                      loss_fn=DiceCELoss(cfg.loss, 4), augmenter=build_augmenter(cfg.augment, 2), generator=g,
                      device=dev, amp_dtype=amp, num_classes=4)
    full = Supervised()
    full.setup(ctx, SupervisedParams())
    batches = SliceBatcher(data, args.batch, None, g)

    fixed = next(batches)
    limit_ctx = StepContext(**{**ctx.__dict__, "augmenter": lambda i, l, g: (i, l)})
    limit = Supervised()
    limit.setup(limit_ctx, SupervisedParams())

    t_limit = timed(lambda: limit.train_step(fixed), args.warmup, args.steps, dev)
    t_full = timed(lambda: full.train_step(next(batches)), args.warmup, args.steps, dev)
    t_limit2 = timed(lambda: limit.train_step(fixed), 0, args.steps, dev)  # guard against drift/thermal
    t_limit = min(t_limit, t_limit2)
    result = {
        "benchmark": "train_throughput",
        "device": str(dev), "machine": machine(),
        "backbone": cfg.model.name, "params": cfg.model.params, "batch": args.batch, "slice": list(hw),
        "amp": str(amp), "compile": args.compile, "cpu_processes_feeding": 1,
        "slices_in_memory": len(data), "decode_to_device_s": round(load_s, 3),
        "compute_limit_slices_per_s": round(args.batch / t_limit, 2),
        "full_step_slices_per_s": round(args.batch / t_full, 2),
        "ratio": round(t_limit / t_full, 4),
        "steps": args.steps, "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_result(result, args.out, "train_throughput", dev, ["compile" if args.compile else "",
                                                            "quick" if args.quick else ""])
    return 0


def write_result(result: dict, out_dir: str, name: str, dev: torch.device, suffixes: list) -> Path:
    """Write ``<out_dir>/<name>_<cpu|GPU name>[_suffix...].json``, print it and its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(0).replace(" ", "_")
    path = out / "_".join([f"{name}_{tag}", *[s for s in suffixes if s]]).replace("__", "_")
    path = path.with_name(path.name + ".json")
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
