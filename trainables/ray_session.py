"""Starting or joining Ray: the one place the platform calls ``ray.init`` for its commands."""
from __future__ import annotations

from typing import Optional

#: Ray Data's number of parquet footer-reading actors (ray.data datasource v2).
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
#: Ray Train V2: one preemption-watcher actor per run, polling the node's drain state.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
#: Ray Train V2: seconds between the controller's polls of its workers (Ray's default 2).
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

#: What a local one-node Ray gets unless the environment already says otherwise. Each is a
#: cost paid per fold, i.e. four times in `robustseg demo` on a 2-core laptop:
#: - one parquet footer reader, not several spread over nodes that are not there (each is a
#:   new Python process, ~2 s of CPU);
#: - no preemption watcher: a laptop's only node is never drained by a cluster manager, and
#:   the watcher is one more Python process per run;
#: - the controller polls its workers every 0.5 s instead of 2 s: a run's start, each state
#:   change and its end are noticed at the next poll, and a poll is one small actor call
#:   (a hung worker is still declared dead after Ray's 10-minute timeout, not sooner).
LOCAL_ENV_DEFAULTS = {FOOTER_ACTORS_ENV: "1", PREEMPTION_WATCHER_ENV: "0", HEALTH_CHECK_INTERVAL_ENV: "0.5"}


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
        # Workers inherit this environment; an explicit setting wins (see LOCAL_ENV_DEFAULTS).
        for name, value in LOCAL_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # address="local": a fresh local cluster even if a stale /tmp/ray/ray_current_cluster
        # (left by an earlier `ray start`) names a dead head.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
