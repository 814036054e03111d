"""A local Ray session for one test module, with environment variables set or removed for it."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Sequence


@contextlib.contextmanager
def local_ray(set_env: Mapping[str, str] = {}, unset: Sequence[str] = ()) -> Iterator[object]:
    """Start a fresh local Ray (4 logical CPUs) with ``set_env`` applied and ``unset`` removed.

    Everything is restored when the block ends, and only the Ray this started is shut down.
    """
    import ray

    saved = {k: os.environ.get(k) for k in (*set_env, *unset)}
    for k in unset:
        os.environ.pop(k, None)
    os.environ.update(set_env)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
