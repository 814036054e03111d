"""Shipped cluster manifests parse and name what they must."""
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_launcher_yaml():
    c = yaml.safe_load((REPO / "deploy" / "cluster.yaml").read_text())
    assert c["head_node_type"] in c["available_node_types"]
    gpu = c["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["max_workers"] >= 1
    assert any("pip install" in cmd for cmd in c["setup_commands"])


def test_kuberay_rayjob():
    j = yaml.safe_load((REPO / "deploy" / "kuberay_rayjob.yaml").read_text())
    assert j["kind"] == "RayJob" and j["apiVersion"].startswith("ray.io/")
    assert "deploy.job_entry" in j["spec"]["entrypoint"]
    worker = j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_runtime_env_excludes_local_state():
    env = yaml.safe_load((REPO / "deploy" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"] and "robustseg_work/" in env["excludes"]


def test_job_entry_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "deploy.job_entry", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert "--space" in out and "ray job submit" in out
