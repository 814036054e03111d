"""`robustseg cluster up|down|status|env`: a real 3-node Ray cluster on this machine.

Head and workers each run in their own network and mount namespace on a bridge, beside an
S3-compatible server and an MLflow tracking server (see `deploy.local_cluster`). Needs root.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from robustseg.errors import RobustsegError


class ClusterCommandError(RobustsegError):
    """The local cluster could not be started, found or stopped."""


def register(sub: Any) -> None:
    """Add the ``cluster`` subcommand to the `robustseg` parser's subparsers."""
    from deploy.local_cluster import default_state_dir

    p = sub.add_parser(
        "cluster", help="a local multi-node Ray cluster in network namespaces (with S3 and MLflow servers)",
        description="Start, inspect or stop a Ray cluster of a head and N workers, each in its own network "
                    "namespace (198.18.0.0/24 on a bridge) and mount namespace (private /tmp, /dev/shm and home; "
                    "the checkout read-only), plus a services node with an S3-compatible server (moto) and an "
                    "MLflow tracking server whose artifacts live in the bucket. Nothing passes between nodes "
                    "through a local path. `down` stops exactly what `up` recorded. Needs root.",
        epilog="examples:\n  sudo robustseg cluster up\n  eval \"$(robustseg cluster env)\"\n"
               "  ray job submit --working-dir DIR_WITH_CONFIG -- python -m deploy.job_entry --config job.yaml "
               "--space tiny --trials 2\n  robustseg cluster status\n  sudo robustseg cluster down",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down", "status", "env"),
                   help="up: start; down: stop what up started; status: nodes and addresses; env: export lines")
    p.add_argument("--state-dir", default=default_state_dir(),
                   help="node folders, logs and cluster.json, outside the checkout (default $ROBUSTSEG_CLUSTER_DIR "
                        "or %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--prefix", default="rs", help="prefix of namespace and link names (default rs)")
    p.add_argument("--subnet", default="198.18.0",
                   help="first three octets of the cluster's /24, inside 198.18.0.0/15 (default %(default)s); "
                        "two clusters on one machine need two subnets")
    p.set_defaults(fn=cmd_cluster)


def cmd_cluster(args: argparse.Namespace) -> int:
    """Run ``robustseg cluster ACTION``."""
    from deploy import local_cluster as lc

    try:
        if args.action == "up":
            c = lc.up(lc.ClusterSpec(state_dir=args.state_dir, workers=args.workers, prefix=args.prefix,
                                     subnet=args.subnet))
            print(f"cluster up in {c.started_s:.0f} s: head {c.head.ip}, workers {', '.join(w.ip for w in c.workers)}")
            print(f"  Ray jobs   {c.ray_address}\n  MLflow     {c.tracking_uri}\n  S3         {c.s3_endpoint} "
                  f"(bucket {c.spec.bucket})\n  storage    {c.storage_uri}")
            print(f'point a shell at it: eval "$(robustseg cluster env --state-dir {args.state_dir})"')
        elif args.action == "down":
            print("\n".join(f"stopped {line}" for line in lc.down(args.state_dir)) or "nothing to stop")
        elif args.action == "status":
            print(json.dumps(lc.status(args.state_dir), indent=1))
        else:
            print(lc.env_lines(args.state_dir))
    except lc.ClusterError as e:
        raise ClusterCommandError(str(e)) from None
    return 0
