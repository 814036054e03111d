"""What the cluster tests do to and ask of a namespaced cluster (`deploy.local_cluster`).

Everything here talks to the cluster over its network, as a client on the host would:
Ray's job and state APIs on the head's dashboard, MLflow's REST API, S3 through boto3.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import yaml

from deploy.local_cluster import Cluster, namespaces_available, s3_client

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


REPO = Path(__file__).resolve().parents[1]


def require_namespaces() -> None:
    """Skip (with the reason) where namespaces are unavailable; under CI=true that is a failure."""
    import pytest

    why = namespaces_available()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"namespaced cluster unavailable under CI=true: {why}")
        pytest.skip(f"namespaced cluster unavailable: {why}")


def job_config(name: str, *, epochs: int, iters: int) -> Dict[str, Any]:
    """``configs/cluster_tiny.yaml`` (the README's cluster sweep) renamed, with its own shards and experiment."""
    cfg = yaml.safe_load((REPO / "configs" / "cluster_tiny.yaml").read_text())
    cfg["name"] = name
    cfg["data"]["shards_uri"] = f"s3://robustseg/shards/{name}"
    cfg["optim"].update(epochs=epochs, iters_per_epoch=iters)
    cfg["tracking"]["experiment"] = name
    return cfg


def submit(c: Cluster, staging: Path, cfg: Dict[str, Any], *, trials: int = 2, sweep: str) -> str:
    """Submit ``python -m deploy.job_entry`` with ``cfg`` (shipped as the job's working dir); returns its id."""
    from ray.job_submission import JobSubmissionClient

    staging.mkdir(parents=True, exist_ok=True)
    (staging / "job.yaml").write_text(yaml.safe_dump(cfg))
    client = JobSubmissionClient(c.ray_address)
    return client.submit_job(
        entrypoint=f"python -m deploy.job_entry --config job.yaml --space tiny --trials {trials} --name {sweep}",
        runtime_env={"working_dir": str(staging), "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})


def wait_job(c: Cluster, job_id: str, timeout_s: float) -> str:
    """Poll until the job ends (bounded); returns its status and keeps its logs in the message on failure."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(c.ray_address)
    deadline = time.time() + timeout_s
    status = ""
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in TERMINAL:
            return status
        time.sleep(2)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s:.0f} s:\n{job_logs(c, job_id)[-4000:]}")


def job_logs(c: Cluster, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(c.ray_address).get_job_logs(job_id)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy (bounded); returns that."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def train_workers_on(c: Cluster, node_ip: str) -> List[Dict[str, Any]]:
    """Alive Ray Train worker actors on the node with address ``node_ip`` (Ray's state API)."""
    from ray.util.state import list_actors, list_nodes

    nodes = {n.node_id: n.node_ip for n in list_nodes(address=c.ray_address, limit=100)}
    actors = list_actors(address=c.ray_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         limit=1000, raise_on_missing_output=False)
    return [a.__dict__ if hasattr(a, "__dict__") else dict(a) for a in actors if nodes.get(a.node_id) == node_ip]


def mlflow_runs(c: Cluster, experiment: str) -> List[Any]:
    """Every run of ``experiment`` on the cluster's MLflow server (empty before it exists)."""
    from mlflow import MlflowClient

    client = MlflowClient(c.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def s3_keys(c: Cluster, prefix: str) -> List[str]:
    """Object keys under ``prefix`` in the cluster's bucket."""
    keys: List[str] = []
    for page in s3_client(c).get_paginator("list_objects_v2").paginate(Bucket=c.spec.bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def s3_json(c: Cluster, key: str) -> Dict[str, Any]:
    return json.loads(s3_client(c).get_object(Bucket=c.spec.bucket, Key=key)["Body"].read())


def record(name: str, row: Dict[str, Any]) -> None:
    """Append a fault's measurements to ``$ROBUSTSEG_FAULT_RECORD`` (benchmarks/cluster_faults.py sets it)."""
    path = os.environ.get("ROBUSTSEG_FAULT_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": name, **row}, default=str) + "\n")
