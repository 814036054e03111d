"""Child process for the prepare fault tests: run `prepare` and die or fail at one chosen event.

Usage: ``python tests/fault_child.py '<json>'`` with keys

- ``cfg``: `DataConfig` fields (``sources`` as ``[[name, path, options]]``, ``crop``, ...);
- ``overwrite``: pass ``overwrite=True``;
- ``mode``: ``count`` (print the store events as JSON and finish), ``kill-before``,
  ``kill-mid``, ``kill-after`` (SIGKILL at event number ``at``), ``enospc`` (a write fails
  with ENOSPC at event ``at``) or ``efbig`` (a real ``ulimit -f``: RLIMIT_FSIZE of ``limit``
  bytes, so the kernel refuses the first larger write with EFBIG);
- ``at``: the event number (0-based) over every store write, commit and delete.

Events are counted by wrapping `ObjectStore` methods in this process only: the production
code runs unchanged, and the kill is a real SIGKILL, so nothing (no ``finally``, no atexit)
runs after it. A "mid" kill leaves what a real one mid-write leaves: locally a half-written
hidden temporary file, on S3 an upload that never completed.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sys
import uuid


def _build_cfg(spec):
    from robustseg.config import DataConfig, SourceSpec, StorageConfig

    cfg = DataConfig(sources=[SourceSpec(name=n, path=p, options=o) for n, p, o in spec["sources"]],
                     plan="cmr", shards_uri=spec["uri"], folds=spec.get("folds", 2),
                     slices_per_shard=spec.get("slices_per_shard", 24), store_volumes=spec.get("volumes", False))
    cfg.cmr.target_spacing = [1.5, 1.5]
    cfg.cmr.crop_size = list(spec["crop"])
    if spec.get("endpoint"):
        cfg.storage = StorageConfig(endpoint_url=spec["endpoint"], access_key="testing", secret_key="testing",
                                    region="us-east-1")
    return cfg


_OPEN_UPLOADS = []  # referenced so that no destructor completes them before the kill


def _partial_write(store, rel, data):
    """What a writer killed halfway through ``rel`` leaves behind."""
    half = data[: max(1, len(data) // 2)]
    if store.is_local:
        parent, name = store.path(rel).rsplit("/", 1)
        os.makedirs(parent, exist_ok=True)
        with open(f"{parent}/.tmp-{uuid.uuid4().hex}-{name}", "wb") as f:
            f.write(half)
            f.flush()
            os.fsync(f.fileno())
    else:
        stream = store.fs.open_output_stream(store.path(rel))
        stream.write(half)  # never closed: the upload does not complete
        _OPEN_UPLOADS.append(stream)


def main() -> None:
    spec = json.loads(sys.argv[1])
    mode, at = spec["mode"], int(spec.get("at", -1))
    from robustseg.data import storage
    from robustseg.data.prepare import prepare
    from robustseg.errors import StorageError

    events = []
    orig = {name: getattr(storage.ObjectStore, name) for name in ("write_bytes", "put_if", "delete")}

    def hook(name):
        def wrapped(self, rel, *a, **k):
            n = len(events)
            events.append([name, rel])
            if n == at and mode == "kill-before":
                os.kill(os.getpid(), signal.SIGKILL)
            if n == at and mode == "kill-mid" and name in ("write_bytes", "put_if"):
                _partial_write(self, rel, a[0])
                os.kill(os.getpid(), signal.SIGKILL)
            if n == at and mode == "enospc" and name in ("write_bytes", "put_if"):
                # The real local writer removes its temporary on any error, and an S3 upload
                # that fails midway is never completed: either way nothing is left to see.
                raise StorageError(self.uri_of(rel), "could not write",
                                   OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
            out = orig[name](self, rel, *a, **k)
            if n == at and mode == "kill-after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    for name in orig:
        setattr(storage.ObjectStore, name, hook(name))
    if mode == "efbig":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(spec["limit"]), int(spec["limit"])))
    try:
        summary = prepare(_build_cfg(spec["cfg"]), overwrite=bool(spec.get("overwrite")))
    except Exception as e:  # noqa: BLE001 - reported to the parent test
        print(json.dumps({"error": f"{type(e).__name__}: {e}", "events": events}))
        sys.exit(3)
    print(json.dumps({"events": events, "written": summary.shards_written, "committed": summary.committed}))


if __name__ == "__main__":
    main()
