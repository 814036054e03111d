"""A 3-node Ray cluster in network namespaces: a sweep, an ensemble and Serve on it, and faults.

One cluster per module (`deploy.local_cluster`): head + 2 workers, each in its own network
and mount namespace, beside S3 (moto) and an MLflow server on a services node. The host
talks to it only over the bridge, as a user's laptop talks to a real cluster. Faults:

a. SIGKILL every process of a worker node while it trains a fold;
b. a worker's link down for 25 s mid-sweep, then up;
c. the node holding one Serve replica killed while a bounded client sends requests;
d. the MLflow server killed for 20 s mid-sweep.

Needs root and namespaces: skipped with the reason elsewhere, a failure under CI=true.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_ops import (job_config, job_logs, mlflow_runs, record, s3_json, s3_keys, submit, train_workers_on,
                         wait_for, wait_job)
from deploy import local_cluster as lc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = lc.namespaces_available()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"namespaced cluster unavailable under CI=true: {why}")
        pytest.skip(f"namespaced cluster unavailable: {why}")
    state = tmp_path_factory.mktemp("cluster")
    t0 = time.time()
    c = lc.up(lc.ClusterSpec(state_dir=str(state), prefix="rst", subnet="198.18.1"))
    record("cluster_up", {"seconds": round(time.time() - t0, 1), "nodes": len(c.nodes)})
    try:
        yield c
    finally:
        lc.down(str(state))


def _in_node(c, name, script):
    """Run a shell script inside a running node's namespaces (network and mounts)."""
    pid = c.nodes[name].pids["ray" if name != "svc" else "s3"]
    # The `ray start` process is the child of the wrapper shell we started; enter its namespaces.
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split() or [str(pid)]
    return subprocess.run(["nsenter", "-t", kids[-1], "-m", "-n", "sh", "-c", script], capture_output=True, text=True)


def test_nodes_share_nothing_but_the_network(cluster):
    c = cluster
    w1 = _in_node(c, "worker1", "echo secret > /tmp/work/w1-only && ip -4 -o addr show eth0 && touch "
                  f"{lc.REPO}/should-not-exist; echo rc=$?")
    assert c.nodes["worker1"].ip in w1.stdout
    assert "Read-only file system" in w1.stderr and not (lc.REPO / "should-not-exist").exists()
    w2 = _in_node(c, "worker2", "ls /tmp/work; ls " + c.nodes["worker1"].private + " 2>&1; echo done")
    assert "w1-only" not in w2.stdout and "No such file" in w2.stdout
    # The host reaches every node over the bridge, and the nodes reach the services node.
    assert lc._http_ok(f"{c.ray_address}/api/version")
    ping = _in_node(c, "worker2", f"python -c \"import urllib.request as u; print(u.urlopen('{c.tracking_uri}/health').status)\"")
    assert ping.stdout.strip() == "200", ping.stderr


def _fold_runs(c, experiment):
    return [r for r in mlflow_runs(c, experiment) if r.data.tags.get("robustseg.role") == "fold"]


def test_sweep_survives_a_killed_worker_and_a_dead_tracking_server(cluster, tmp_path):
    """Item 3 (a sweep submitted from outside, folds on workers, shards and storage in S3) with faults a and d."""
    c, name = cluster, "faultsweep"
    job = submit(c, tmp_path / "job", job_config(name, epochs=8, iters=6), sweep=name)
    w1 = c.nodes["worker1"]

    # a. Once a fold on worker1 has checkpointed two epochs, kill every process of that node.
    def fold_on_w1_after_two_epochs():
        running = [r for r in _fold_runs(c, name) if r.info.status == "RUNNING"
                   and int(r.data.tags.get("epochs_done", "0")) >= 2]
        return running if running and train_workers_on(c, w1.ip) else None

    wait_for(fold_on_w1_after_two_epochs, 400, "a fold on worker1 past epoch 2")
    t_kill = time.time()
    killed = lc.kill_node(c, "worker1")
    assert killed

    # d. Then the MLflow server goes away for 20 s while the other folds train on.
    time.sleep(5)
    lc.kill_service(c, "mlflow")
    t_ml = time.time()
    time.sleep(20)
    lc.start_service(c, "mlflow")
    ml_down_s = time.time() - t_ml

    status = wait_job(c, job, 900)
    logs = job_logs(c, job)
    assert status == "SUCCEEDED", logs[-4000:]
    total_s = time.time() - t_kill

    # Every trial finished all folds; the bookkeeping is in S3, not on a node.
    trials = s3_json(c, f"runs/{name}/trials.json")
    assert [t["status"] for t in trials["trials"]] == ["COMPLETE", "COMPLETE"]
    assert any(k.endswith("best.pt") for k in s3_keys(c, f"runs/{name}/folds/"))

    runs = mlflow_runs(c, name)
    assert runs and all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    folds = _fold_runs(c, name)
    assert len(folds) == 4, sorted(r.info.run_name for r in folds)  # one run per fold: none counted twice
    resumed = [r for r in folds if r.data.tags.get("robustseg.reattached") == "true"]
    assert resumed, "no fold run was re-attached after the node died"
    for r in folds:
        assert not any("/tmp/" in v or "robustseg-" in v and "-rank" in v for v in r.data.tags.values()
                       if isinstance(v, str) and not v.startswith(("runs:/", "s3://"))), r.data.tags
    record("a_worker_killed", {"killed_pids": len(killed), "job_total_after_kill_s": round(total_s, 1),
                               "resumed_runs": len(resumed), "trials_complete": len(trials["trials"])})
    record("d_mlflow_down", {"down_s": round(ml_down_s, 1), "runs_finished": len(runs)})
    # Bring worker1 back for the tests that follow (as a pod restart would).
    lc.start_node(c, "worker1")
