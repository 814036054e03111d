"""`ray job submit` against a head this test starts (from the venv, on free ports).

The job runs a 1-trial x 2-fold sweep through `deploy.job_entry`; the test waits for
SUCCEEDED, checks that MLflow holds the sweep's finished runs, and stops only the head it
started (never `ray stop`, which would kill every Ray process of the user).
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rayhead")
    gcs, dash, client, agent, grpc, rtenv, metrics = _free_ports(7)
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled",
               RAY_DATA_DISABLE_PROGRESS_BARS="1")
    # --block keeps `ray start` in the foreground: ending this one process group stops exactly
    # this head and the workers it spawned.
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={rtenv}", f"--metrics-export-port={metrics}",
         "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats"],
        env=env, stdout=open(tmp / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None:
            pytest.fail(f"ray head exited: {(tmp / 'head.log').read_text()[-2000:]}")
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"ray head did not come up: {(tmp / 'head.log').read_text()[-2000:]}")
    try:
        yield address, env, tmp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # only the process group this test started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # `ray start` records its address for later `ray.init()` calls; remove it if it is ours,
        # so nothing tries to join the head that is gone.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()


def test_submitted_sweep_succeeds_and_is_tracked(head):
    address, env, tmp = head
    work = tmp / "work"
    cfg = {
        "name": "jobtest",
        "data": {"sources": [{"name": "synthetic_cmr", "path": "", "options": {"n_subjects": 4, "motion_levels": [0]}}],
                 "shards_uri": str(work / "shards"), "cmr": {"target_spacing": [1.5, 1.5], "crop_size": [64, 64]},
                 "folds": 2},
        "optim": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 4},
        "inference": {"val_max_cases": 2, "tta": False},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "tracking": {"workdir": str(work), "experiment": "jobtest"},
    }
    cfg_path = tmp / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env", str(REPO / "deploy" / "runtime_env.yaml"), "--",
           "python", "-m", "deploy.job_entry", "--config", str(cfg_path), "--space", "tiny", "--trials", "1",
           "--name", "jobsweep", "--storage", str(work / "ray_results")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout + res.stderr)
    assert re.search(r"Job '\S+' succeeded", out), out[-3000:]
    assert "best cross-validated Dice" in out

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("jobtest")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 4  # sweep + trial + 2 folds
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert (work / "ray_results" / "jobsweep" / "best_config.yaml").exists()
