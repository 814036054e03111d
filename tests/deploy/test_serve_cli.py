"""`robustseg serve` start-up failures as a user meets them (issue 12): a subprocess, its exit code, its stderr.

A busy port and a missing model folder are found before Ray starts; a model that cannot load
shows its loading error (not Serve's "Failed to update the deployments"); Ctrl-C during
start-up exits 130 with a message and stops every process the command started. No
traceback in any of them.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.slow
ROBUSTSEG = Path(sys.executable).with_name("robustseg")


def cli_env():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
    env["PYTHONUNBUFFERED"] = "1"
    return env


def serve_cmd(model, port):
    return [str(ROBUSTSEG), "serve", "--model", str(model), "--port", str(port), "--num-cpus", "2"]


def run_serve(model, port, timeout=240):
    return subprocess.run(serve_cmd(model, port), capture_output=True, text=True, timeout=timeout, env=cli_env())


def broken_model(tmp_path):
    model = tmp_path / "broken_model"
    model.mkdir()
    (model / "spec.json").write_text("{not json")
    return model


def descendants(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    kids.setdefault(int(fh.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_busy_port_is_named_and_fails_before_ray(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_serve(tmp_path, port, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"robustseg serve: error: port {port} on 127.0.0.1 is already in use" in r.stderr
    assert "Traceback" not in r.stderr and "Started a local Ray" not in r.stderr  # Ray never started


def test_missing_model_folder_fails_before_ray(tmp_path):
    r = run_serve(tmp_path / "no_such_model", free_port(), timeout=120)
    assert r.returncode == 2
    assert f"cannot load the model {tmp_path / 'no_such_model'}: no such folder" in r.stderr
    assert "Traceback" not in r.stderr and "Started a local Ray" not in r.stderr


def test_model_that_cannot_load_shows_the_loading_error(tmp_path):
    model = broken_model(tmp_path)
    r = run_serve(model, free_port())
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("robustseg serve: error: cannot load the model"), out
    assert str(model / "spec.json") in last and "invalid ensemble spec" in last
    assert "Failed to update the deployments" not in out and "Traceback" not in out


def test_ctrl_c_during_startup_exits_cleanly_and_stops_what_it_started(tmp_path):
    proc = subprocess.Popen(serve_cmd(broken_model(tmp_path), free_port()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), start_new_session=True)
    started = set()
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.time() + 180
        while not any(ln.startswith("starting the segmentation service") for ln in lines):
            assert proc.poll() is None and time.time() < deadline, (lines, proc.stderr.read())
            started.update(descendants(proc.pid))
            time.sleep(0.05)
        started.update(descendants(proc.pid))  # Ray is up; Serve is starting
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            started.update(descendants(proc.pid))
            time.sleep(0.1)
        stderr = proc.stderr.read() if proc.poll() is not None else ""
        assert proc.returncode == 130, stderr
        assert "robustseg serve: interrupted during start-up; stopping what was started" in stderr
        assert "Traceback" not in stderr and "Traceback" not in "".join(lines)
        assert started, "the command started no process: was it interrupted before Ray?"
        deadline = time.time() + 30
        while any(alive(p) for p in started) and time.time() < deadline:
            time.sleep(0.2)
        assert [p for p in started if alive(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in started:  # only what this test's command started
            if alive(p):
                os.kill(p, signal.SIGKILL)
