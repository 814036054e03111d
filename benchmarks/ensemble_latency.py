"""Ensemble inference latency: the platform path vs a naive per-member, per-flip loop.

Both predict the mean softmax probabilities of M members x 4 mirror-TTA copies
(none, x, y, xy) on one Z x H x W volume already on the device:

* naive: for each member, for each flip, one forward of the volume's Z slices
  (flip -> forward -> softmax -> unflip -> accumulate), fp32 eager: M x 4 launches of Z
  slices. This is the STACK_NOTES anchor (15 members x 4 flips, 10 x 512 x 512: 766 ms on
  an H100).
* ours: ``robustseg.engine.inference.predict_volume(models, image, spatial_dims=2,
  tta=True, ...)``, the path ensembles serve through: every slice's mirror copies go in one
  batch (``--batch-size``, default Z x 4: one launch per member), optional bf16 autocast
  (``--amp``, CUDA only) and ``torch.compile`` (``--compile``).

The members are the anchor model: backbone ``unet2d`` (MONAI DynUNet, nnU-Net-like) built
for a 256 x 256 training patch, which gives 7 stages with 32-512 filters and deep
supervision; random init with a fixed seed (timing does not depend on the weights).
Windows are whole slices by default (``--patch`` = the slice), as in the anchor.

    python benchmarks/ensemble_latency.py --device cuda --amp --compile       # H100 target
    python benchmarks/ensemble_latency.py --device cpu --members 3 --shape 4x256x256 --repeats 2
    python benchmarks/ensemble_latency.py --quick                             # CPU smoke, tiny model

Writes ``benchmarks/results/ensemble_latency_<device>[_<tag>].json`` with the machine, the
settings, ms per volume (median and min over ``--repeats``) for both paths, the speed-up and
the largest absolute difference between the two probability volumes. Needs only torch,
numpy and monai (no Ray, no MLflow).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

from robustseg.config import ModelConfig  # noqa: E402
from robustseg.engine.inference import predict_volume  # noqa: E402
from robustseg.models import build_model, size_multiple  # noqa: E402

FLIPS: Tuple[Tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))  # the 4 in-plane mirror copies
QUICK_PARAMS = {"filters_base": 8, "filters_max": 64, "max_stages": 4}


def parse_size(text: str, n: int) -> Tuple[int, ...]:
    """Parse ``"10x512x512"`` into a tuple of ``n`` positive ints.

    Args:
        text: Sizes joined by ``x``.
        n: Number of entries expected.

    Returns:
        The sizes.

    Raises:
        argparse.ArgumentTypeError: wrong count or non-positive entries.
    """
    try:
        parts = tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != n or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected {n} positive sizes joined by 'x', got {text!r}")
    return parts


def machine(device: torch.device) -> dict:
    """Describe what the numbers were measured on.

    Args:
        device: The device the benchmark ran on.

    Returns:
        Host, CPU model and core count, torch version and, on CUDA, the GPU name.
    """
    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def build_members(n: int, params: dict, train_patch: Sequence[int], num_classes: int, device: torch.device,
                  seed: int) -> List[nn.Module]:
    """Build ``n`` randomly initialised ``unet2d`` members in eval mode on ``device``.

    Args:
        n: Number of members.
        params: ``unet2d`` params (`UNet2DParams` keys).
        train_patch: Training patch the topology is derived from (H, W).
        num_classes: Output classes.
        device: Where the members live (all resident at once).
        seed: Seed of the first member; member i uses ``seed + i``.

    Returns:
        The members.
    """
    members = []
    for i in range(n):
        torch.manual_seed(seed + i)
        cfg = ModelConfig(name="unet2d", params=dict(params), num_classes=num_classes)
        members.append(build_model(cfg, train_patch, None).to(device).eval())
    return members


def launches(n_slices: int, n_flips: int, batch_size: int) -> int:
    """Forward passes per member of the platform path for whole-slice windows.

    Mirrors `_sliding_window`'s chunking: ``batch_size // n_flips`` slices per chunk, each
    chunk's copies split into passes of at most ``batch_size``.
    """
    per_pass = max(1, batch_size // n_flips)
    chunks = [min(per_pass, n_slices - i) for i in range(0, n_slices, per_pass)]
    return sum(-(-n * n_flips // batch_size) for n in chunks)


def naive_predict(models: Sequence[nn.Module], image: Tensor) -> Tensor:
    """Mean softmax over members x 4 mirror copies, one forward per member and flip.

    Args:
        models: Members in eval mode, on the image's device.
        image: Volume ``(Z, H, W)``.

    Returns:
        float32 probabilities ``(C, Z, H, W)``.
    """
    x = image[:, None].float()
    acc = None
    with torch.inference_mode():
        for m in models:
            for f in FLIPS:
                xf = x.flip(f) if f else x
                p = torch.softmax(m(xf).float(), dim=1)
                p = p.flip(f) if f else p
                acc = p if acc is None else acc + p
    return (acc / (len(models) * len(FLIPS))).permute(1, 0, 2, 3)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(paths: Dict[str, Callable[[], Tensor]], warmup: int, repeats: int,
                     device: torch.device) -> Tuple[Dict[str, List[float]], Dict[str, Tensor]]:
    """Warm every path up, then time them in turn, one run of each per repeat.

    Interleaving gives every path the same share of a shared machine's background load, so
    the ratio stays fair when the load changes during the benchmark.

    Args:
        paths: Name -> one volume's prediction.
        warmup: Untimed runs of each path first (cuDNN autotuning, compilation, caches).
        repeats: Timed runs of each path.
        device: Synchronised around each timed run.

    Returns:
        Milliseconds of each timed run per path, and each path's last result.
    """
    outs: Dict[str, Tensor] = {}
    for name, fn in paths.items():
        for _ in range(warmup):
            outs[name] = fn()
    sync(device)
    times: Dict[str, List[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times, outs


def summary(times: List[float]) -> dict:
    """Median and minimum of the timed runs, in ms per volume."""
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "runs_ms": [round(t, 2) for t in times]}


def main(argv=None) -> int:
    """Parse the CLI, time both paths, write and print the JSON result."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1 or cpu")
    p.add_argument("--members", type=int, default=None, help="ensemble size (default 15; --quick: 3)")
    p.add_argument("--shape", type=lambda s: parse_size(s, 3), default=None,
                   help="volume ZxHxW (default 10x512x512; --quick: 2x64x64)")
    p.add_argument("--patch", type=lambda s: parse_size(s, 2), default=None,
                   help="inference window HxW for ours (default: the whole slice, as the anchor)")
    p.add_argument("--train-patch", type=lambda s: parse_size(s, 2), default=None,
                   help="training patch the unet2d topology is derived from (default 256x256: 7 stages)")
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows (mirror copies included) per forward for ours (default Z x 4: one launch per member)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for ours (CUDA only; ignored on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the members for ours")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune, ...)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off (both paths)")
    p.add_argument("--skip-naive", action="store_true", help="time only ours (no speed-up or difference)")
    p.add_argument("--skip-fp32-eager", action="store_true",
                   help="with --amp/--compile, do not also time ours in fp32 eager (the batching-only gain)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each path (default 10; --quick: 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs of each path first (default 3; --quick: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model and volume (CPU smoke test)")
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    args = p.parse_args(argv)

    params = dict(QUICK_PARAMS) if args.quick else {}
    # Options left out take the anchor's (or --quick's tiny) values; given ones always win.
    defaults = ({"members": 3, "shape": (2, 64, 64), "train_patch": (64, 64), "repeats": 5, "warmup": 1} if args.quick
                else {"members": 15, "shape": (10, 512, 512), "train_patch": (256, 256), "repeats": 10, "warmup": 3})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.members < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--members and --repeats must be >= 1, --warmup >= 0")

    device = torch.device(args.device)
    if device.type == "cuda":
        # Both paths see the same fixed shapes every run, so let cuDNN pick its fastest kernels.
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    z, h, w = args.shape
    patch = tuple(args.patch) if args.patch else (h, w)
    batch_size = args.batch_size or z * len(FLIPS)
    amp = bool(args.amp and device.type == "cuda")

    members = build_members(args.members, params, args.train_patch, args.num_classes, device, args.seed)
    div = size_multiple(members[0])
    if (h % div[0] or w % div[1]) and not args.skip_naive:
        # Ours pads to the multiple itself; the naive loop feeds whole slices as they are.
        p.error(f"--shape {h}x{w}: the naive loop needs H and W divisible by {div} (or pass --skip-naive)")
    image = torch.randn((z, h, w), generator=torch.Generator().manual_seed(args.seed)).to(device)

    def ours_with(models: Sequence[nn.Module], use_amp: bool) -> Callable[[], Tensor]:
        return lambda: predict_volume(list(models), image, spatial_dims=2, num_classes=args.num_classes,
                                      patch_size=patch, tta=True, batch_size=batch_size, divisible_by=div,
                                      amp=use_amp)

    result: dict = {
        "benchmark": "ensemble_latency",
        "device": str(device),
        "machine": machine(device),
        "settings": {
            "backbone": "unet2d", "params": params, "train_patch": list(args.train_patch),
            "stages": int(members[0].topology.n_stages),
            "params_per_member_m": round(sum(q.numel() for q in members[0].parameters()) / 1e6, 2),
            "members": args.members, "volume_zhw": [z, h, w], "num_classes": args.num_classes,
            "tta_flips": len(FLIPS), "patch": list(patch), "batch_size": batch_size,
            "launches_per_member_ours": launches(z, len(FLIPS), batch_size),
            "launches_per_member_naive": len(FLIPS),
            "amp_bf16": amp, "compile": args.compile, "compile_mode": args.compile_mode,
            "cudnn_benchmark": bool(device.type == "cuda" and not args.no_cudnn_benchmark),
            "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "quick": args.quick,
            "naive": "fp32 eager, one forward per member and flip over the Z slices",
        },
    }

    run_members: Sequence[nn.Module] = members
    if args.compile:
        import torch._dynamo as dynamo

        # Every member is a separate module instance; give each its compiled entry rather than
        # falling back to eager when the default recompile limit (8) is reached.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 4 * args.members))
        kw = {"mode": args.compile_mode} if args.compile_mode else {}
        run_members = [torch.compile(m, **kw) for m in members]
        t0 = time.perf_counter()
        ours_with(run_members, amp)()
        sync(device)
        result["compile_first_call_s"] = round(time.perf_counter() - t0, 2)

    paths: Dict[str, Callable[[], Tensor]] = {}
    if not args.skip_naive:
        paths["naive"] = lambda: naive_predict(members, image)
    if (amp or args.compile) and not args.skip_fp32_eager:
        paths["ours_fp32_eager"] = ours_with(members, False)
    paths["ours"] = ours_with(run_members, amp)
    times, outs = time_interleaved(paths, args.warmup, args.repeats, device)
    for name in paths:
        result[name] = summary(times[name])
        print(f"{name}: {result[name]['median_ms']:.1f} ms/volume (median)", file=sys.stderr)
    naive_out, ours_out = outs.get("naive"), outs["ours"]
    if naive_out is not None and "ours_fp32_eager" in outs:
        result["ours_fp32_eager"]["max_abs_diff_vs_naive"] = float((outs["ours_fp32_eager"] - naive_out).abs().max())

    if naive_out is not None:
        result["speedup_median"] = round(result["naive"]["median_ms"] / result["ours"]["median_ms"], 3)
        result["speedup_min"] = round(result["naive"]["min_ms"] / result["ours"]["min_ms"], 3)
        result["max_abs_diff_vs_naive"] = float((ours_out - naive_out).abs().max())
        result["max_abs_diff_note"] = ("bf16 autocast in ours vs fp32 naive: ~1e-2 is expected" if amp
                                       else "both fp32: should be ~1e-5 or less")
    result["sums_to_one_max_err"] = float((ours_out.sum(0) - 1).abs().max())
    if device.type == "cuda":  # over all timed paths
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if hasattr(os, "getloadavg"):
        # The CPU may be shared: a load above the core count means the figures are pessimistic.
        result["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")

    tag = f"_{args.tag}" if args.tag else ("_quick" if args.quick else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ensemble_latency_{device.type}{tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
