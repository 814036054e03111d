"""Entry point of a sweep submitted to an existing Ray cluster with ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env deploy/runtime_env.yaml -- \\
        python -m deploy.job_entry --config configs/acdc_unet2d.yaml --space unet2d --trials 8

Inside a job ``ray.init()`` attaches to the cluster the job runs on, so the sweep's Train
workers land on the cluster's GPU nodes. Shards must be in storage every node can read
(``s3://``, or a shared filesystem path) and the MLflow tracking URI must be a server or
a shared path: set them with config overrides (``data.shards_uri=s3://...``
``tracking.tracking_uri=http://mlflow:5000``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments, attach to the cluster, run the sweep, print the best result."""
    p = argparse.ArgumentParser(prog="python -m deploy.job_entry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--space", required=True, help="registered search space (e.g. unet2d)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--scheduler", choices=("asha",), default=None)
    p.add_argument("--storage", default=None, help="Ray storage path/URI shared by the cluster")
    p.add_argument("--name", default=None, help="sweep name (resume with the same name and --resume)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = p.parse_args(argv)

    import ray

    from robustseg.config import ExperimentConfig
    from trainables.tune_driver import run_sweep

    cfg = ExperimentConfig.from_yaml(args.config, args.overrides)
    ray.init(ignore_reinit_error=True)  # inside `ray job submit`: the job's cluster
    result = run_sweep(cfg, space=args.space, trials=args.trials, concurrency=args.concurrency,
                       scheduler=args.scheduler, resume=args.resume, storage_path=args.storage,
                       sweep_name=args.name, mlflow=True)
    print(f"best cross-validated Dice {result.best_cv_dice:.4f}; best config at {result.path}/best_config.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
