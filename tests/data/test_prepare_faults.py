"""Nothing lost, ever: `prepare` killed, interrupted or failing at every step of a re-prepare.

A store holds an "old" dataset (48x48 crops); a re-prepare with changed settings (64x64,
``--force``) is stopped at each store event (every shard write, the manifest commit, the
plan copy, every garbage deletion) by SIGKILL before, halfway through, or right after it,
by SIGINT, by ENOSPC, and by a real EFBIG from ``ulimit -f``. After each stop the store must
decode bit-exact to the old dataset or the new one, pass a full checksum verification, and a
re-run must complete to the new dataset with no stray files. The same on the S3 server the
tests start, and with two writers racing.

Set ``ROBUSTSEG_KILL_MATRIX=path.json`` to keep the matrix (point -> outcome) for a report.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from robustseg.config import StorageConfig
from robustseg.data.manifest import load_slices, read_manifest, verify_store
from robustseg.data.prepare import prepare
from robustseg.data.shards import decode_images, decode_labels
from robustseg.data.snapshot import SnapshotWriter
from robustseg.data.storage import CommitConflict, open_store
from robustseg.errors import StorageError

pytestmark = pytest.mark.slow

CHILD = Path(__file__).resolve().parents[1] / "fault_child.py"
SOURCES = [["synthetic_cmr", "", {"n_subjects": 4, "motion_levels": [0]}]]
OLD_CROP, NEW_CROP = [48, 48], [64, 64]


def _spec(uri: str, crop: List[int], endpoint: str = "") -> Dict[str, Any]:
    return {"sources": SOURCES, "uri": uri, "crop": crop, "endpoint": endpoint}


def _cfg(spec: Dict[str, Any]):
    sys.path.insert(0, str(CHILD.parent))
    try:
        from fault_child import _build_cfg
    finally:
        sys.path.pop(0)
    return _build_cfg(spec)


def _storage(endpoint: str) -> Optional[StorageConfig]:
    return StorageConfig(endpoint_url=endpoint, access_key="testing", secret_key="testing",
                         region="us-east-1") if endpoint else None


def _state(uri: str, endpoint: str = "") -> Dict[str, Any]:
    """What a reader sees: every shard verified, then each fold decoded."""
    store = open_store(uri, _storage(endpoint))
    m = read_manifest(store)
    assert verify_store(store, m, checksums=True) == []
    out: Dict[str, Any] = {"layout": m.layout.to_dict(), "cases": [c["case_id"] for c in m.cases]}
    for fold in range(int(m.folds["k"])):
        t = load_slices(store, m, folds=[fold])
        out[fold] = (decode_images(t, m.layout), decode_labels(t, m.layout), t.column("case_id").to_pylist())
    return out


def _same(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    if a.keys() != b.keys() or a["layout"] != b["layout"] or a["cases"] != b["cases"]:
        return False
    return all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) and a[k][2] == b[k][2]
               for k in a if isinstance(k, int))


def _child(cfg: Dict[str, Any], mode: str, at: int = -1, **extra: Any) -> subprocess.CompletedProcess:
    spec = {"cfg": cfg, "mode": mode, "at": at, "overwrite": True, **extra}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CHILD.parents[1] / "platform"),
                                                                      os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], capture_output=True, text=True,
                          timeout=180, env=env)


def _outcome(old: Dict[str, Any], new: Dict[str, Any], uri: str, endpoint: str = "") -> str:
    seen = _state(uri, endpoint)
    if _same(seen, old):
        return "old"
    if _same(seen, new):
        return "new"
    pytest.fail(f"{uri}: the store decodes to neither the old nor the new dataset")


def _rerun_completes(new: Dict[str, Any], uri: str, endpoint: str = "") -> None:
    cfg = _cfg(_spec(uri, NEW_CROP, endpoint))
    prepare(cfg, overwrite=True)
    assert _same(_state(uri, endpoint), new)
    store = open_store(uri, _storage(endpoint))
    m = read_manifest(store)
    if store.is_local:  # nothing left over: no stray shard, no half-written temporary
        files = sorted(str(p.relative_to(Path(store.root))) for p in Path(store.root).rglob("*") if p.is_file())
        assert files == sorted([".robustseg.lock", "manifest.json", "plan.json"] + [s["path"] for s in m.shards])
        assert json.loads((Path(store.root) / "plan.json").read_text()) == m.plan
    else:
        # On S3 unreferenced files younger than the grace period may be a concurrent writer's:
        # they stay until then; an explicit collection with no grace leaves just the snapshot.
        assert set(store.list("slices")) >= {s["path"] for s in m.shards}
        SnapshotWriter.begin(store).collect_garbage(m, grace_s=0)
        assert sorted(store.list("slices")) == sorted(s["path"] for s in m.shards)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """The old and new datasets as a reader sees them, and a pristine old store to copy."""
    root = tmp_path_factory.mktemp("refs")
    prepare(_cfg(_spec(str(root / "old"), OLD_CROP)))
    prepare(_cfg(_spec(str(root / "new"), NEW_CROP)))
    return {"old": _state(str(root / "old")), "new": _state(str(root / "new")), "pristine": root / "old"}


def _points(events: List[List[str]]) -> List[tuple]:
    """Kill points: before every event, halfway through every write/commit, after every event."""
    pts = []
    for i, (name, _) in enumerate(events):
        pts.append(("kill-before", i))
        if name in ("write_bytes", "put_if"):
            pts.append(("kill-mid", i))
        pts.append(("kill-after", i))
    return pts


def _record(matrix: List[Dict[str, Any]]) -> None:
    path = os.environ.get("ROBUSTSEG_KILL_MATRIX")
    if path:
        prior = json.loads(Path(path).read_text()) if Path(path).exists() else []
        Path(path).write_text(json.dumps(prior + matrix, indent=1))


def test_sigkill_at_every_step_of_a_local_reprepare(refs, tmp_path):
    work = tmp_path / "store"
    shutil.copytree(refs["pristine"], work)
    counted = _child(_spec(str(work), NEW_CROP), "count")
    assert counted.returncode == 0, counted.stderr
    events = json.loads(counted.stdout.strip().splitlines()[-1])["events"]
    names = [e[0] for e in events]
    # shards first, then one commit, then the plan copy, then the old snapshot's garbage
    assert names.count("put_if") == 1 and names.index("put_if") > 0 and names[-1] == "delete"
    assert all(n == "write_bytes" for n in names[: names.index("put_if")])
    matrix = []
    for mode, at in _points(events):
        shutil.rmtree(work)
        shutil.copytree(refs["pristine"], work)
        r = _child(_spec(str(work), NEW_CROP), mode, at)
        assert r.returncode == -signal.SIGKILL, (mode, at, r.stdout, r.stderr)
        seen = _outcome(refs["old"], refs["new"], str(work))
        # The commit is the last event on manifest.json (locally put_if's own atomic write).
        commit = max(i for i, e in enumerate(events) if e[1] == "manifest.json")
        committed = commit < at or (events[at][1] == "manifest.json" and mode == "kill-after")
        assert seen == ("new" if committed else "old"), (mode, at, events[at])
        _rerun_completes(refs["new"], str(work))
        matrix.append({"store": "local", "kill": mode, "event": at, "what": events[at][0],
                       "object": events[at][1], "reader_sees": seen, "rerun": "completes"})
    assert len(matrix) >= 2 * len(events) + 4  # before, after every event; halfway through every write
    _record(matrix)


def test_sigint_keeps_complete_shards_and_the_rerun_adopts_them(refs, tmp_path):
    work = tmp_path / "store"
    shutil.copytree(refs["pristine"], work)
    spec = {"cfg": _spec(str(work), NEW_CROP), "mode": "count", "overwrite": True}
    env = {**os.environ, "PYTHONPATH": str(CHILD.parents[1] / "platform")}
    # SIGINT right after the first shard was written: the scenario that used to corrupt a store.
    code = ("import os, signal, sys, runpy; from robustseg.data import storage; w = storage.ObjectStore.write_bytes\n"
            "def hook(self, rel, data):\n    w(self, rel, data)\n    os.kill(os.getpid(), signal.SIGINT)\n"
            "storage.ObjectStore.write_bytes = hook\nsys.argv = ['x', sys.argv[1]]\n"
            f"runpy.run_path({str(CHILD)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    assert _outcome(refs["old"], refs["new"], str(work)) == "old"
    strays = [p for p in (work / "slices").rglob("*.parquet")]
    assert len(strays) == len(read_manifest(open_store(str(work))).shards) + 1
    summary = prepare(_cfg(_spec(str(work), NEW_CROP)), overwrite=True)
    assert summary.shards_skipped == 1  # the complete shard of the interrupted run was adopted
    _rerun_completes(refs["new"], str(work))


@pytest.mark.parametrize("at", [0, 1, 2])
def test_enospc_on_local_disk_keeps_the_old_snapshot(refs, tmp_path, at):
    work = tmp_path / "store"
    shutil.copytree(refs["pristine"], work)
    before = sorted(p.name for p in work.rglob("*.parquet"))
    r = _child(_spec(str(work), NEW_CROP), "enospc", at)
    assert r.returncode == 3
    err = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert "could not write" in err and "No space left on device" in err and str(work) in err
    assert _outcome(refs["old"], refs["new"], str(work)) == "old"
    # the failed run removed exactly what it wrote: the old snapshot's files are all there
    assert sorted(p.name for p in work.rglob("*.parquet")) == before
    _rerun_completes(refs["new"], str(work))


def test_real_efbig_from_ulimit_keeps_the_old_snapshot(refs, tmp_path):
    work = tmp_path / "store"
    shutil.copytree(refs["pristine"], work)
    before = sorted(p.name for p in work.rglob("*.parquet"))
    smallest = min(p.stat().st_size for p in (refs["pristine"] / "slices").rglob("*.parquet"))
    r = _child(_spec(str(work), NEW_CROP), "efbig", limit=smallest // 2)
    assert r.returncode == 3, r.stderr
    err = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert "could not write" in err and "File too large" in err
    assert _outcome(refs["old"], refs["new"], str(work)) == "old"
    assert sorted(p.name for p in work.rglob("*.parquet")) == before
    assert not list(work.rglob(".tmp-*"))
    _rerun_completes(refs["new"], str(work))


def test_a_held_lock_refuses_a_second_prepare_naming_the_holder(refs, tmp_path):
    work = tmp_path / "store"
    shutil.copytree(refs["pristine"], work)
    store = open_store(str(work))
    with store.writer_lock("prepare"):
        r = _child(_spec(str(work), NEW_CROP), "count")
    assert r.returncode == 3
    err = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert "another prepare is writing to this store" in err and f"pid {os.getpid()}" in err
    assert _outcome(refs["old"], refs["new"], str(work)) == "old"


def test_two_racing_local_prepares_one_wins_nothing_mixes(refs, tmp_path):
    work = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(CHILD.parents[1] / "platform")}
    procs = [subprocess.Popen([sys.executable, str(CHILD), json.dumps(
        {"cfg": _spec(str(work), crop), "mode": "count", "overwrite": True})], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env) for crop in (OLD_CROP, NEW_CROP)]
    results = [p.communicate(timeout=180) + (p.returncode,) for p in procs]
    assert any(rc == 0 for _, _, rc in results), results
    for out, _, rc in results:
        if rc != 0:
            assert "another prepare is writing to this store" in json.loads(out.strip().splitlines()[-1])["error"]
    assert _outcome(refs["old"], refs["new"], str(work)) in ("old", "new")


# ------------------------------------------------------------------------------ S3
@pytest.fixture(scope="module")
def s3_refs(refs, s3_endpoint):
    return refs, s3_endpoint


def _fresh_s3_old(endpoint: str, name: str) -> str:
    uri = f"s3://robustseg-faults/{name}"
    prepare(_cfg(_spec(uri, OLD_CROP, endpoint)))
    return uri


def test_sigkill_at_every_step_of_an_s3_reprepare(s3_refs):
    refs, endpoint = s3_refs
    uri = _fresh_s3_old(endpoint, "count")
    counted = _child(_spec(uri, NEW_CROP, endpoint), "count")
    assert counted.returncode == 0, counted.stderr
    events = json.loads(counted.stdout.strip().splitlines()[-1])["events"]
    matrix = []
    for k, (mode, at) in enumerate(_points(events)):
        uri = _fresh_s3_old(endpoint, f"kill-{k}")
        r = _child(_spec(uri, NEW_CROP, endpoint), mode, at)
        assert r.returncode == -signal.SIGKILL, (mode, at, r.stderr)
        seen = _outcome(refs["old"], refs["new"], uri, endpoint)
        _rerun_completes(refs["new"], uri, endpoint)
        matrix.append({"store": "s3", "kill": mode, "event": at, "what": events[at][0],
                       "object": events[at][1], "reader_sees": seen, "rerun": "completes"})
    _record(matrix)


@pytest.mark.parametrize("at", [0, 2])
def test_enospc_on_s3_keeps_the_old_snapshot(s3_refs, at):
    refs, endpoint = s3_refs
    uri = _fresh_s3_old(endpoint, f"enospc-{at}")
    before = open_store(uri, _storage(endpoint)).list("slices")
    r = _child(_spec(uri, NEW_CROP, endpoint), "enospc", at)
    assert r.returncode == 3
    assert "No space left on device" in json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert _outcome(refs["old"], refs["new"], uri, endpoint) == "old"
    assert open_store(uri, _storage(endpoint)).list("slices") == before
    _rerun_completes(refs["new"], uri, endpoint)


def test_s3_conditional_commit_one_of_two_writers_wins(s3_refs, monkeypatch):
    """Writer A reads snapshot 1; writer B commits snapshot 2 before A commits: A loses whole."""
    refs, endpoint = s3_refs
    uri = _fresh_s3_old(endpoint, "race")
    real_commit = SnapshotWriter.commit
    raced = {"done": False}

    def commit_after_a_competitor(self, manifest):
        if not raced["done"]:
            raced["done"] = True
            monkeypatch.setattr(SnapshotWriter, "commit", real_commit)
            prepare(_cfg(_spec(uri, NEW_CROP, endpoint)), overwrite=True)  # B, start to finish
        return real_commit(self, manifest)

    monkeypatch.setattr(SnapshotWriter, "commit", commit_after_a_competitor)
    a_cfg = _cfg(_spec(uri, OLD_CROP, endpoint))
    a_cfg.cmr.normalization = "minmax"  # A writes different shards
    with pytest.raises(CommitConflict, match="another writer committed to this store first"):
        prepare(a_cfg, overwrite=True)
    assert _outcome(refs["old"], refs["new"], uri, endpoint) == "new"  # B's snapshot, whole
    store = open_store(uri, _storage(endpoint))
    assert sorted(store.list("slices")) == sorted(s["path"] for s in read_manifest(store).shards)  # A cleaned up


def test_lost_race_error_is_a_storage_error():
    assert issubclass(CommitConflict, StorageError)
