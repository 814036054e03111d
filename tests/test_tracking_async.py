"""Per-epoch tracking is asynchronous: a tracking server outage never stalls training.

Against a real ``mlflow server`` (SQLite backend, artifacts proxied, everything under tmp_path)
that is killed (SIGKILL of its process group) and started again on the same port and database;
and the attempt tags of a restarted fold against a SQLite store.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest

from robustseg import tracking
from robustseg.config import ExperimentConfig
from robustseg.tracking_fit import ATTEMPT, DROPPED_ARTIFACT, DROPPED_TAG, NODE_IP, RESTARTS, RESUMED_AFTER

EXPERIMENT = "robustseg-async"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` on 127.0.0.1 in its own process group; killed and restarted on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    def launch(self) -> None:
        self.starts += 1
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner: faster start
        with open(self.root / f"server{self.starts}.log", "wb") as out:
            self.proc = subprocess.Popen(
                [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "art")],
                cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_up(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"mlflow server did not come up in {timeout_s} s:\n{self.log()}")

    def start(self) -> None:
        self.launch()
        self.wait_up()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        with pytest.raises(OSError):  # really gone
            urllib.request.urlopen(f"{self.uri}/health", timeout=2)

    def log(self) -> str:
        return (self.root / f"server{self.starts}.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    # MLflow's own HTTP retries (7, backoff factor 2: ~4 min per call against a dead server) would
    # make each background attempt minutes long; one quick retry keeps the test about the tracker's.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    srv = Server(tmp_path)
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)


def _cfg(tmp_path: Path, uri: str) -> ExperimentConfig:
    c = ExperimentConfig(name="async")
    c.tracking.workdir = str(tmp_path / "work")
    c.tracking.tracking_uri = uri
    c.tracking.experiment = EXPERIMENT
    c.model.params = {"filters_base": 8, "max_stages": 3}
    c.data.shards_uri = str(tmp_path / "shards")
    return c


def _metrics(epoch: int) -> Dict[str, float]:
    return {"epoch": epoch, "loss": 1.0 / epoch, "val_dice": 0.1 * epoch}


def _result(epochs: int) -> SimpleNamespace:
    history = [dict(_metrics(e)) for e in range(1, epochs + 1)]
    return SimpleNamespace(best_score=0.1 * epochs, best_epoch=epochs, epochs_run=epochs, stopped_early=False,
                           history=history, last_checkpoint=None, best_checkpoint=None)


def _steps(client: Any, run_id: str, key: str) -> List[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _log_epochs(tracker: Any, epochs: range) -> List[float]:
    took = []
    for e in epochs:
        t0 = time.monotonic()
        tracker.on_epoch(e, _metrics(e), f"s3://bucket/fold0/checkpoint_{e:06d}/last.pt")
        took.append(time.monotonic() - t0)
    return took


def test_outage_mid_fit_neither_stalls_nor_loses_metrics(server: Server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    tracker = tracking.FitTracker(_cfg(tmp_path, server.uri), server.uri, EXPERIMENT, "outage", flush_timeout_s=60)
    _log_epochs(tracker, range(1, 4))  # the server is up here
    assert tracker.flush(30)
    server.kill()
    took = _log_epochs(tracker, range(4, 7))
    assert max(took) < 0.5, took  # training goes on: on_epoch only queues
    assert not tracker.flush(1.5)  # nothing gets through while the server is down
    server.start()
    (tmp_path / "out").mkdir()
    tracker.finish(_result(6), tmp_path / "out")

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(tracker.run_id)
    for key in ("loss", "val_dice"):
        assert _steps(client, tracker.run_id, key) == [1, 2, 3, 4, 5, 6]  # every epoch, exactly once
    assert run.info.status == "FINISHED"
    assert DROPPED_TAG not in run.data.tags and "artifact_errors" not in run.data.tags
    assert run.data.tags["epochs_done"] == "6"
    assert run.data.tags["last_checkpoint"] == "s3://bucket/fold0/checkpoint_000006/last.pt"  # last value wins
    assert run.data.metrics["best_val_dice"] == pytest.approx(0.6)


def test_undeliverable_epochs_are_recorded_as_dropped(server: Server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    flush_s = 2.0
    tracker = tracking.FitTracker(_cfg(tmp_path, server.uri), server.uri, EXPERIMENT, "dropped",
                                  flush_timeout_s=flush_s, final_timeout_s=90)
    _log_epochs(tracker, range(1, 4))
    assert tracker.flush(30)
    server.kill()
    assert max(_log_epochs(tracker, range(4, 7))) < 0.5
    # The server comes back only after finish's flush gave up; finish's own calls wait for it.
    later = threading.Timer(flush_s + 2.0, server.launch)
    later.start()
    (tmp_path / "out").mkdir()
    t0 = time.monotonic()
    tracker.finish(_result(6), tmp_path / "out")
    assert time.monotonic() - t0 > flush_s
    later.join()

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    text = run.data.tags[DROPPED_TAG]
    assert text.startswith("6 metric points not delivered (steps 4-6; keys loss, val_dice)"), text
    report = json.loads(Path(client.download_artifacts(tracker.run_id, DROPPED_ARTIFACT, str(tmp_path))).read_text())
    assert report["points"] == 6 and report["steps"] == [4, 5, 6] and report["rejected"] == 0
    assert report["keys"] == {"loss": [4, 5, 6], "val_dice": [4, 5, 6]}
    assert _steps(client, tracker.run_id, "loss") == [1, 2, 3]  # the record matches the store
    assert run.data.tags["epochs_done"] == "6"  # tags are state: the latest value is set at the end


def test_note_attempt_counts_attempts_and_records_restarts(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(tmp_path, uri)
    client = MlflowClient(tracking_uri=uri)
    first = tracking.FitTracker(cfg, uri, EXPERIMENT, "fold0")
    assert first.note_attempt("198.18.1.3", None) == 1
    _log_epochs(first, range(1, 4))
    assert first.flush(30)
    tags = client.get_run(first.run_id).data.tags
    assert tags[ATTEMPT] == "1" and tags[NODE_IP] == "198.18.1.3"
    assert RESTARTS not in tags and RESUMED_AFTER not in tags

    # The worker dies (the run stays RUNNING); Ray restarts the fold on another node from epoch 3.
    second = tracking.FitTracker(cfg, uri, EXPERIMENT, "fold0")
    assert second.run_id == first.run_id
    assert second.note_attempt("198.18.1.4", 3) == 2
    assert second.flush(30)
    tags = client.get_run(first.run_id).data.tags
    assert tags[ATTEMPT] == "2" and tags[NODE_IP] == "198.18.1.4" and tags[RESUMED_AFTER] == "3"
    assert tags["robustseg.reattached"] == "true"
    line2 = ("attempt 2 on 198.18.1.4 resumed after epoch 3 "
             "(the previous attempt stopped without finishing: worker or node lost)")
    assert tags[RESTARTS] == line2
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "resumed_from_epoch")] == [(4, 3.0)]

    third = tracking.FitTracker(cfg, uri, EXPERIMENT, "fold0")
    assert third.note_attempt("198.18.1.5", 5) == 3
    (tmp_path / "out").mkdir()
    third.finish(_result(6), tmp_path / "out")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[ATTEMPT] == "3" and run.data.tags[RESUMED_AFTER] == "5"
    assert run.data.tags[RESTARTS].split("\n") == [line2, line2.replace("2 on 198.18.1.4", "3 on 198.18.1.5")
                                                   .replace("epoch 3", "epoch 5")]
    assert sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "resumed_from_epoch")) == \
        [(4, 3.0), (6, 5.0)]
