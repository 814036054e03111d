"""Starting or joining Ray: the one place the platform calls ``ray.init`` for its commands."""
from __future__ import annotations

from typing import Optional

#: Ray Data's number of parquet footer-reading actors (ray.data datasource v2).
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def init_ray(num_cpus: Optional[int] = None) -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start a local Ray with room for Ray Data.

    On small machines Train workers plus a Tune trial can starve Ray Data of CPUs (see
    STACK_NOTES); declaring at least 4 logical CPUs avoids that deadlock.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # One node: Ray Data's parquet reader would start several footer-reading actors per read
        # (spread over nodes), each a new Python process (~2 s of CPU on a 2-core laptop) for every
        # fold's dataset; one reads a local store's few footers as fast. Workers inherit this
        # environment; an explicit setting wins.
        os.environ.setdefault(FOOTER_ACTORS_ENV, "1")
        # address="local": a fresh local cluster even if a stale /tmp/ray/ray_current_cluster
        # (left by an earlier `ray start`) names a dead head.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
