"""Serving latency under concurrent load: real HTTP against a local Ray Serve app.

Issue 16, item 4: the same engine serves, and 8 concurrent requests must not queue behind a
slow CPU batch (goal: p95 <= 5 s for 8 concurrent requests on 2 idle cores).

What it does, for each ``--max-batch-size`` value:

1. starts Ray (local) and the segmentation service (`deploy.serve_app.start_local`, one
   replica) on 127.0.0.1 with the ensemble folder ``--ensemble``;
2. one warm-up request, then ``--single`` sequential requests (latency of one request alone);
3. ``--rounds`` rounds of ``--concurrency`` requests sent at once by an asyncio client
   bounded to that many connections (each round waits for all of its answers);
4. records median / p95 / max seconds per request, the replica's batching counters and
   the HTTP status of every answer (anything but 200 fails the run), then stops what it started.

Volumes: the first ``--volumes`` ACDC volumes of the shared set (sorted by file name) (h5, original grid),
written as NIfTI with 1.25 mm in-plane spacing (the cmr plan's target: no resampling), or
``--shape ZxHxW`` synthetic hearts. The ensemble: ``--ensemble FOLDER``, or built from
``--checkpoint`` files (repeatable) into ``robustseg_work/serve_latency/ensemble``.

    python benchmarks/serve_latency.py --checkpoint robustseg_work/accuracy_budget/e24_i40_b16-C/robustseg/last.pt
    python benchmarks/serve_latency.py --ensemble robustseg_work/demo/ensemble --shape 12x128x128

Writes ``benchmarks/results/serve_latency_cpu.json`` (or ``--out``) with the machine named.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "serve_latency_cpu.json"
WORK = REPO / "robustseg_work" / "serve_latency"
ACDC = REPO.parent / "shared" / "data" / "acdc_h5"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ensemble", type=Path, help="ensemble folder to serve")
    src.add_argument("--checkpoint", type=Path, action="append", help="member checkpoint (repeatable)")
    p.add_argument("--volumes", type=int, default=8, help="distinct ACDC volumes to send (default 8)")
    p.add_argument("--shape", help="synthetic volumes ZxHxW instead of ACDC (e.g. 12x128x128)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of --concurrency requests (default 3)")
    p.add_argument("--single", type=int, default=5, help="sequential single requests (default 5)")
    p.add_argument("--max-batch-size", default="1,4", help="comma-separated values to compare (default 1,4)")
    p.add_argument("--replica-cpus", type=float, default=2.0, help="logical CPUs per replica (default 2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def machine() -> Dict[str, Any]:
    """Where the numbers come from."""
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "amx": "amx_bf16" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False}


def nifti_bytes(image: np.ndarray, spacing=(1.25, 1.25, 10.0)) -> bytes:
    """A (Z, Y, X) float volume as gzipped NIfTI bytes."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(image, dtype=np.float32))
    img.SetSpacing(spacing)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.nii.gz"
        sitk.WriteImage(img, str(path), useCompression=True)
        return path.read_bytes()


def volumes(args: argparse.Namespace) -> List[bytes]:
    """The request bodies: ACDC fold-0 volumes, or synthetic hearts of ``--shape``."""
    if args.shape:
        from robustseg.data.synthetic import make_cardiac_subject

        z, h, w = (int(v) for v in args.shape.lower().split("x"))
        return [nifti_bytes(make_cardiac_subject(i, 5, n_slices=z, size=(h, w))[0].image) for i in range(args.volumes)]
    import h5py

    files = sorted(ACDC.glob("*.h5"))
    if not files:
        raise SystemExit(f"no ACDC h5 files under {ACDC} (see ../shared/data/README.md); use --shape instead")
    out = []
    for f in files[: args.volumes]:
        with h5py.File(f, "r") as h:
            out.append(nifti_bytes(np.asarray(h["image"], dtype=np.float32)))
    return out


def ensemble_folder(args: argparse.Namespace) -> Path:
    """The folder to serve (built from the checkpoints when given)."""
    if args.ensemble:
        return args.ensemble.resolve()
    import torch

    from robustseg.ensemble import Ensemble

    ens = Ensemble.from_checkpoints([c.resolve() for c in args.checkpoint], name="serve-latency",
                                    device=torch.device("cpu"))
    return ens.save(WORK / "ensemble")


async def _post_all(url: str, bodies: Sequence[bytes], concurrency: int) -> List[Dict[str, Any]]:
    """Send every body at once through a client bounded to ``concurrency`` connections."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(i: int, body: bytes) -> Dict[str, Any]:
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(f"/v1/segment?filename=v{i}.nii.gz", content=body)
                return {"status": r.status_code, "s": time.perf_counter() - t0, "text": r.text[:200] if r.status_code != 200 else ""}

        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def summary(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, p95 (nearest rank) and max of request latencies."""
    s = sorted(seconds)
    p95 = s[min(len(s) - 1, int(np.ceil(0.95 * len(s))) - 1)]
    return {"n": len(s), "median_s": round(statistics.median(s), 3), "p95_s": round(p95, 3), "max_s": round(s[-1], 3)}


def run_one(folder: Path, bodies: Sequence[bytes], batch: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Start the service with ``max_batch_size=batch``, measure, stop."""
    import httpx
    import ray

    from deploy.serve_app import start_local, stop
    from robustseg.serving import ServeSettings

    settings = ServeSettings(model_uri=str(folder), device="cpu", max_batch_size=batch, batch_wait_timeout_s=0.05)
    ray.init(address="local", num_cpus=max(4, int(args.replica_cpus) + 2), include_dashboard=False)
    try:
        url = start_local(settings, "127.0.0.1", free_port(), num_cpus=args.replica_cpus)
        with httpx.Client(base_url=url, timeout=600) as c:
            c.post("/v1/segment?filename=warm.nii.gz", content=bodies[0]).raise_for_status()
            single = []
            for i in range(args.single):
                t0 = time.perf_counter()
                c.post(f"/v1/segment?filename=s{i}.nii.gz", content=bodies[i % len(bodies)]).raise_for_status()
                single.append(time.perf_counter() - t0)
        results = []
        t_all = time.perf_counter()
        for r in range(args.rounds):
            bodies_r = [bodies[(r * args.concurrency + i) % len(bodies)] for i in range(args.concurrency)]
            results += asyncio.run(_post_all(url, bodies_r, args.concurrency))
        wall = time.perf_counter() - t_all
        bad = [x for x in results if x["status"] != 200]
        if bad:
            raise SystemExit(f"max_batch_size={batch}: {len(bad)} requests failed, e.g. {bad[0]}")
        health = httpx.get(f"{url}/v1/health", timeout=30).json()
        return {"max_batch_size": batch, "single": summary(single),
                "concurrent": {**summary([x["s"] for x in results]), "concurrency": args.concurrency,
                               "rounds": args.rounds, "volumes_per_s": round(len(results) / wall, 3)},
                "replica": {k: health.get(k) for k in ("batches", "volumes", "largest_batch") if k in health}
                or health}
    finally:
        try:
            stop()
        finally:
            ray.shutdown()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    bodies = volumes(args)
    folder = ensemble_folder(args)
    shapes = "ACDC volumes (original grid)" if not args.shape else f"synthetic {args.shape}"
    rows = []
    for batch in (int(b) for b in args.max_batch_size.split(",")):
        row = run_one(folder, bodies, batch, args)
        print(f"max_batch_size {batch}: single median {row['single']['median_s']:.2f} s; "
              f"{args.concurrency} concurrent: median {row['concurrent']['median_s']:.2f} s, "
              f"p95 {row['concurrent']['p95_s']:.2f} s, {row['concurrent']['volumes_per_s']:.2f} volumes/s", flush=True)
        rows.append(row)
    doc = {"benchmark": "serve_latency", "machine": machine(), "ensemble": str(folder.relative_to(REPO))
           if folder.is_relative_to(REPO) else str(folder), "volumes": f"{len(bodies)} {shapes}",
           "replica_cpus": args.replica_cpus, "client": "httpx.AsyncClient on 127.0.0.1, bounded to --concurrency",
           "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
