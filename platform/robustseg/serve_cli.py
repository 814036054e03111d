"""``robustseg serve`` (the segmentation service on a local Ray) and the ``predict --endpoint`` client.

`add_serve_parser` and `cmd_serve` plug into `robustseg.cli`; `predict_endpoint` is what
``robustseg predict --endpoint URL`` runs instead of loading a checkpoint. Ray and the Serve
application are imported only when a command runs, so ``robustseg --help`` stays fast.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Union

from robustseg.serving import ENV_MAX_UPLOAD_MB, ENV_MODEL_URI, ENV_TRACKING_URI, post_volumes, settings_from

ENDPOINTS = (
    ("GET ", "/v1/health", ""),
    ("GET ", "/v1/model", "name, version, alias, members, metrics"),
    ("POST", "/v1/segment", "NIfTI body or multipart 'file' -> mask .nii.gz in the input geometry"),
    ("POST", "/v1/cardiac-function", "multipart 'ed' + 'es' -> volumes, EF, mass, flags (JSON)"),
)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the `robustseg` parser.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned.

    Returns:
        The new subparser (its ``fn`` default is `cmd_serve`).
    """
    sp = subparsers.add_parser(
        "serve", help="serve an ensemble over HTTP on a local Ray (Ray Serve)",
        description="Start Ray Serve with the segmentation service and block until Ctrl-C. For a cluster, use "
                    "`serve run deploy/serve_config.yaml` (replicas, autoscaling, GPU fraction).",
        epilog="examples:\n  robustseg serve --model robustseg_work/demo/ensemble\n"
               "  robustseg serve --model models:/robustseg-cmr@champion --tracking-uri sqlite:////abs/mlflow.db\n"
               "  curl --data-binary @case.nii.gz -o mask.nii.gz \\\n"
               "       'http://127.0.0.1:8000/v1/segment?filename=case.nii.gz'\n"
               "  curl -F ed=@ed.nii.gz -F es=@es.nii.gz http://127.0.0.1:8000/v1/cardiac-function",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("--model", metavar="URI",
                    help=f"ensemble folder or models:/name@alias (default ${ENV_MODEL_URI})")
    sp.add_argument("--tracking-uri", metavar="URI", help=f"MLflow tracking URI (default ${ENV_TRACKING_URI})")
    sp.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sp.add_argument("--max-upload-mb", type=float, metavar="MB",
                    help=f"largest accepted volume file (default ${ENV_MAX_UPLOAD_MB} or 64)")
    sp.add_argument("--replicas", type=int, default=1, help="replicas of the model (default 1)")
    sp.add_argument("--device", choices=("cpu", "cuda"), help="inference device (default: CUDA when available)")
    sp.add_argument("--gpus", type=float, metavar="FRACTION",
                    help="GPU share per replica, e.g. 0.25 (default 1 with --device cuda, else 0)")
    sp.add_argument("--max-batch-size", type=int, metavar="N", help="volumes per ensemble call (default 4)")
    sp.add_argument("--num-cpus", type=int, metavar="N", help="logical CPUs of the local Ray (default max(4, cores))")
    sp.set_defaults(fn=cmd_serve)
    return sp


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``robustseg serve``: deploy, print the URL and endpoints, serve until Ctrl-C.

    Args:
        args: Parsed ``serve`` arguments.

    Returns:
        0 after a clean shutdown.

    Raises:
        ConfigError: no model URI or invalid settings.
    """
    settings = settings_from({"model_uri": args.model, "tracking_uri": args.tracking_uri,
                              "max_upload_mb": args.max_upload_mb, "device": args.device,
                              "max_batch_size": args.max_batch_size})
    gpus = args.gpus if args.gpus is not None else (1.0 if args.device == "cuda" else 0.0)
    from deploy.serve_app import start_local, stop
    from robustseg.cli import init_ray

    init_ray(args.num_cpus)
    print(f"starting the segmentation service: model {settings.model_uri}, {args.replicas} replica(s), "
          f"{gpus:g} GPU each, upload limit {settings.max_upload_mb:g} MB ...", flush=True)
    try:
        url = start_local(settings, args.host, args.port, num_replicas=args.replicas, num_gpus=gpus)
        print(f"serving at {url}  (docs: {url}/docs)")
        for method, path, what in ENDPOINTS:
            print(f"  {method} {url}{path}" + (f"  {what}" if what else ""))
        print("Ctrl-C to stop", flush=True)
        _stop_on_signals()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        stop()
    return 0


def _stop_on_signals() -> None:
    """Make SIGTERM (process managers, `kill`) and SIGINT end the wait like Ctrl-C.

    SIGINT is set explicitly because a shell starting a background job makes it ignored,
    and then Python never raises KeyboardInterrupt.
    """
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass


def predict_endpoint(endpoint: str, inputs: Union[str, Path], out_dir: Union[str, Path],
                     timeout: float = 300.0) -> int:
    """Run ``robustseg predict --endpoint URL``: segment on a running service.

    Args:
        endpoint: Base URL of the service.
        inputs: A NIfTI file or a folder of them.
        out_dir: Where ``<stem>_seg.nii.gz`` masks go.
        timeout: Seconds per request.

    Returns:
        0, or 3 when a mask is empty (as `robustseg predict` with a checkpoint).

    Raises:
        EndpointError: unreachable service or an error answer (its message quoted).
        DataError: missing or non-NIfTI inputs.
    """
    from robustseg.cli import report_masks

    rows = post_volumes(endpoint, inputs, out_dir, timeout=timeout)
    return report_masks(rows, f"{len(rows)} masks from {endpoint} written to {out_dir}")
