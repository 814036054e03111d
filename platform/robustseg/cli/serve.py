"""``robustseg serve`` (the segmentation service on a local Ray) and the ``predict --endpoint`` client.

`register` and `cmd_serve` plug into `robustseg.cli`; `predict_endpoint` is what
``robustseg predict --endpoint URL`` runs instead of loading a checkpoint. Ray and the Serve
application are imported only when a command runs, so ``robustseg --help`` stays fast.

Start-up failures are one-line errors (exit 2): a busy port is found before Ray starts, a
model that cannot load shows its loading error. Ctrl-C during start-up shuts down whatever
was started (Serve, the local Ray) and exits 130 without a traceback; Ctrl-C while serving
is the normal way to stop (exit 0).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

# The light module only: building the parser must not import numpy, SimpleITK or torch.
from robustseg.serve_settings import (DEFAULT_ADMISSION_WAIT_S, DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_INFLIGHT_MB,
                                      ENV_MAX_DECODED_MB, ENV_MAX_INFLIGHT_MB, ENV_MAX_UPLOAD_MB, ENV_MODEL_URI,
                                      ENV_TRACKING_URI, ServeSettings, ServeStartError, check_port_free,
                                      settings_from)

ENDPOINTS = (
    ("GET ", "/v1/health", ""),
    ("GET ", "/v1/model", "name, version, alias, members, metrics"),
    ("POST", "/v1/segment", "NIfTI body or multipart 'file' -> mask .nii.gz in the input geometry "
                            "(label maps refused unless ?force=true)"),
    ("POST", "/v1/cardiac-function", "multipart 'ed' + 'es' -> volumes, EF, mass, flags (JSON)"),
)


def register(subparsers: Any) -> argparse.ArgumentParser:
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
    sp.add_argument("--max-decoded-mb", type=float, metavar="MB",
                    help="largest decoded volume, dtype size x voxels from the NIfTI header, refused with 413 "
                         f"before decoding (default ${ENV_MAX_DECODED_MB} or {DEFAULT_MAX_DECODED_MB:g})")
    sp.add_argument("--max-inflight-mb", type=float, metavar="MB",
                    help="memory budget per replica: estimated decode memory of all requests at once; a request "
                         f"over it waits, then gets 503 (default ${ENV_MAX_INFLIGHT_MB} or {DEFAULT_MAX_INFLIGHT_MB:g})")
    sp.add_argument("--admission-wait-s", type=float, metavar="S",
                    help=f"how long a request waits for room in that budget (default {DEFAULT_ADMISSION_WAIT_S:g})")
    sp.add_argument("--replicas", type=int, default=1, help="replicas of the model (default 1)")
    sp.add_argument("--device", choices=("cpu", "cuda"), help="inference device (default: CUDA when available)")
    sp.add_argument("--gpus", type=float, metavar="FRACTION",
                    help="GPU share per replica, e.g. 0.25 (default 1 with --device cuda, else 0)")
    sp.add_argument("--max-batch-size", type=int, metavar="N", help="volumes per ensemble call (default 4)")
    sp.add_argument("--num-cpus", type=int, metavar="N", help="logical CPUs of the local Ray (default max(4, cores))")
    sp.add_argument("--replica-resources", type=_resources, metavar="JSON", default={},
                    help='custom Ray resources per replica, to place replicas on chosen nodes '
                         '(e.g. \'{"serve_node": 0.01}\')')
    sp.add_argument("--max-replicas-per-node", type=int, metavar="N",
                    help="at most N replicas on one node (1: a dead node takes one replica with it)")
    sp.set_defaults(fn=cmd_serve)
    return sp


def _resources(text: str) -> Dict[str, float]:
    """``--replica-resources`` JSON: names to non-negative amounts."""
    try:
        value = json.loads(text)
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object of resource amounts, "
                                         'e.g. \'{"serve_node": 0.01}\'') from None
    return {str(k): float(v) for k, v in value.items()}


@dataclass
class _Started:
    """What `cmd_serve` has started so far, so that an interrupted start-up stops exactly that."""

    ray: bool = False
    serve: bool = False
    serving: bool = False


def cmd_serve(args: argparse.Namespace) -> int:
    """Run ``robustseg serve``: deploy, print the URL and endpoints, serve until Ctrl-C.

    Args:
        args: Parsed ``serve`` arguments.

    Returns:
        0 after a clean shutdown; 130 when interrupted during start-up.

    Raises:
        ConfigError: no model URI or invalid settings.
        ServeStartError: the port is in use, the model folder does not exist or the model
            cannot load (its loading error).
    """
    settings = settings_from({"model_uri": args.model, "tracking_uri": args.tracking_uri,
                              "max_upload_mb": args.max_upload_mb, "max_decoded_mb": args.max_decoded_mb,
                              "max_inflight_mb": args.max_inflight_mb, "admission_wait_s": args.admission_wait_s,
                              "device": args.device, "max_batch_size": args.max_batch_size})
    # Both checks take milliseconds; finding either problem after Ray has started takes many seconds.
    check_port_free(args.host, args.port)
    _check_model_location(settings.model_uri)
    started = _Started()
    _stop_on_signals()
    try:
        _run_service(args, settings, started)
    except KeyboardInterrupt:
        if not started.serving:
            print("robustseg serve: interrupted during start-up; stopping what was started", file=sys.stderr)
            return 130
        print("shutting down", file=sys.stderr)
    finally:
        _shutdown(started)
    return 0


def _run_service(args: argparse.Namespace, settings: ServeSettings, started: _Started) -> None:
    """Start Ray and Serve, print where the service listens, then block until interrupted."""
    import ray

    from deploy.serve_app import start_local
    from trainables.ray_session import init_ray

    gpus = args.gpus if args.gpus is not None else (1.0 if args.device == "cuda" else 0.0)
    # CPU replicas share the machine's cores: Ray caps an actor's torch threads at its CPUs
    # (OMP_NUM_THREADS), so one CPU each would leave a single replica on one core.
    cores = min(args.num_cpus or os.cpu_count() or 1, os.cpu_count() or 1)
    cpus = 1.0 if gpus else float(max(1, cores // max(1, args.replicas)))
    started.ray = not ray.is_initialized()
    init_ray(args.num_cpus)
    _stop_on_signals()  # ray.init replaces the SIGTERM handler with its own sys.exit
    print(f"starting the segmentation service: model {settings.model_uri}, {args.replicas} replica(s), "
          f"{gpus:g} GPU and {cpus:g} CPU each, upload limit {settings.max_upload_mb:g} MB, decoded volume limit "
          f"{settings.max_decoded_mb:g} MB, in-flight budget {settings.max_inflight_mb:g} MB per replica ...",
          flush=True)
    started.serve = True
    url = start_local(settings, args.host, args.port, num_replicas=args.replicas, num_cpus=cpus, num_gpus=gpus,
                      resources=args.replica_resources, max_replicas_per_node=args.max_replicas_per_node)
    started.serving = True
    print(f"serving at {url}  (docs: {url}/docs)")
    for method, path, what in ENDPOINTS:
        print(f"  {method} {url}{path}" + (f"  {what}" if what else ""))
    print("Ctrl-C to stop", flush=True)
    while True:
        time.sleep(3600)


def _check_model_location(model_uri: str) -> None:
    """A local model path that does not exist fails here, before Ray starts."""
    if not model_uri.startswith(("models:/", "runs:/")) and "://" not in model_uri \
            and not Path(model_uri).exists():
        raise ServeStartError(f"cannot load the model {model_uri}: no such folder (give an ensemble folder "
                              "or a models:/name@alias URI)")


def _shutdown(started: _Started) -> None:
    """Stop Serve and the local Ray this command started; a second Ctrl-C cannot interrupt it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    if started.serve:
        try:
            from deploy.serve_app import stop

            stop()
        except Exception as exc:  # noqa: BLE001 - Ray's shutdown below still ends the replicas
            print(f"robustseg serve: stopping Serve failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    if started.ray:
        import ray

        ray.shutdown()


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
                     timeout: float = 300.0, *, force: bool = False, fail_fast: bool = False) -> int:
    """Run ``robustseg predict --endpoint URL``: segment on a running service.

    Args:
        endpoint: Base URL of the service.
        inputs: A NIfTI file or a folder of them.
        out_dir: Where ``<stem>_seg.nii.gz`` masks go.
        timeout: Seconds per request.
        force: Send inputs that look like label maps too.
        fail_fast: Stop at the first input the service refuses.

    Returns:
        As `robustseg predict` with a model: 2 when an input failed (or all were skipped), 3
        when a mask is empty, else 0.

    Raises:
        EndpointError: unreachable service or an error answer (its message quoted).
        DataError: missing or non-NIfTI inputs.
    """
    from robustseg.cli.common import report_masks
    from robustseg.serving import post_volumes

    rows = post_volumes(endpoint, inputs, out_dir, timeout=timeout, force=force, fail_fast=fail_fast)
    return report_masks(rows, f"{len(rows)} masks from {endpoint} written to {out_dir}")
