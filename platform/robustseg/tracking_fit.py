"""MLflow record of one training run (one fold): `FitTracker` and its fit-loop `callback`.

Per-epoch metrics at ``step=epoch`` go out asynchronously (`FitTracker.on_epoch` only queues
them): tracking trouble never stops or stalls training. The learning curve, history, per-case
metrics, overlays, preprocessing plan, best metrics and the best weights follow when the fit ends.

Delivery: one daemon thread per tracker sends everything queued in one ``log_batch`` (metrics
at ``step=epoch``, tags last value wins) and keeps what fails, resending it (same timestamps:
MLflow stores a point once) after 1 s, doubling to 10 s; nothing is dropped while the process
lives, except points the server refuses as invalid (400/404). `FitTracker.finish` and
`FitTracker.fail` first wait up to ``flush_timeout_s`` for the queue to drain; what is still
undelivered then is recorded as dropped (tag ``robustseg.tracking_dropped``, artifact
``tracking_dropped.json``, and the worker's log). Their own calls are retried on connection
trouble for up to ``final_timeout_s``, so a run ends FINISHED when the server comes back within
that time. Each background attempt is itself subject to MLflow's HTTP retries
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with backoff factor 2: minutes against a dead
server); a lower value on the workers makes recovery quicker and the dropped record exact.

Where the weights are, as tags any node can follow:

* ``best_checkpoint``: ``runs:/<run id>/checkpoints/best.pt``, the run's artifact (best.pt,
  else last.pt, of the fit), which ``regime.init: runs:/<run id>`` downloads;
* ``last_checkpoint``: the durable copy of the latest ``last.pt`` (a storage URI such as
  ``s3://.../checkpoint_<n>/last.pt``, or a local path outside the temp folder). A node-local
  scratch path (under ``tempfile.gettempdir()``, e.g. a Ray worker's folder) is never recorded. Opened and ended through
`robustseg.tracking_runs`; where it sits in a sweep: `robustseg.tracking`.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from robustseg import durable
from robustseg.config import ExperimentConfig
from robustseg.tracking_runs import _open_run, _set_tags, _status_for, end_run
from robustseg.tracking_store import _client, _experiment_id, _retry, artifact_location
from robustseg.tracking_tags import _BAD_KEY

log = logging.getLogger("robustseg.tracking")  # the logger it had before the split
#: Artifact path of the fit's best weights in its run.
BEST_ARTIFACT = "checkpoints/best.pt"
#: Tag (and artifact) naming the metric points that never reached the server.
DROPPED_TAG, DROPPED_ARTIFACT = "robustseg.tracking_dropped", "tracking_dropped.json"
#: Tags of a run's attempts (`FitTracker.note_attempt`).
ATTEMPT, NODE_IP, RESUMED_AFTER, RESTARTS = ("robustseg.attempt", "robustseg.node_ip", "robustseg.resumed_after_epoch",
                                             "robustseg.restarts")
_MAX_TAG = 5000  # the length tags are cut to (MLflow's limit is 8000)


def _transient(e: BaseException) -> bool:
    """Worth sending again: no answer (connection refused, timeout), a 5xx, 429, 401/403, a locked SQLite.

    A 400 or 404 (invalid request, run gone) is the same on every try.
    """
    from mlflow.exceptions import MlflowException

    return not isinstance(e, MlflowException) or e.get_http_status_code() not in (400, 404)


# --------------------------------------------------------------------------- asynchronous delivery
class _Sender:
    """A run's per-epoch metrics and tags, delivered in order by one daemon thread (started on first use).

    Points stay buffered until MLflow confirms them. A batch that fails for a transient reason
    is sent again after `BACKOFF_S` (doubling), never dropped; one the server rejects (400/404:
    resending cannot help) is kept in ``rejected`` for the dropped record.
    """

    BACKOFF_S = (1.0, 10.0)
    _MAX_METRICS, _MAX_TAGS = 900, 100  # log_batch takes at most 1000 entities, 100 of them tags

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._cond = threading.Condition()
        self._wake = threading.Event()  # cuts a backoff short (flush, close)
        self._metrics: List[Any] = []  # not yet confirmed, oldest first
        self._tags: Dict[str, str] = {}  # the latest value of every tag not yet confirmed
        self._sending = 0  # metrics at the head of _metrics in the request now out
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.rejected: List[Any] = []
        self.last_error = ""

    def put(self, metrics: Sequence[Any], tags: Dict[str, str]) -> None:
        """Queue metrics and tags; returns at once."""
        with self._cond:
            if self._closed:
                log.warning("MLflow run %s already ended: %d metric points and tags %s not sent", self.run_id,
                            len(metrics), sorted(tags))
                return
            self._metrics += list(metrics)
            self._tags.update(tags)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"mlflow-{self.run_id[:8]}", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        delay, failing = self.BACKOFF_S[0], False
        while True:
            with self._cond:
                while not (self._metrics or self._tags or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                metrics = self._metrics[:self._MAX_METRICS]
                tags = dict(list(self._tags.items())[:self._MAX_TAGS])
                self._sending = len(metrics)
            done = self._send(metrics, tags, failing)
            with self._cond:
                self._sending = 0
                if done:  # delivered or rejected: off the queue (keeping newer values of the same tags)
                    del self._metrics[:len(metrics)]
                    self._tags = {k: v for k, v in self._tags.items() if tags.get(k) != v}
                self._cond.notify_all()
            if done:
                delay, failing = self.BACKOFF_S[0], False
                continue
            failing = True
            self._wake.wait(delay)
            self._wake.clear()
            delay = min(2 * delay, self.BACKOFF_S[1])

    def _send(self, metrics: List[Any], tags: Dict[str, str], failing: bool) -> bool:
        """One ``log_batch``; True when the batch is done with (delivered or rejected)."""
        from mlflow.entities import RunTag

        try:
            _retry(_client(self.uri).log_batch, self.run_id, metrics=metrics,
                   tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as e:  # noqa: BLE001 - tracking trouble never stops training
            self.last_error = f"{type(e).__name__}: {e}"[:500]
            if _transient(e):
                if not failing:
                    log.warning("MLflow logging failed (%s); %d metric points kept, retrying in the background",
                                self.last_error, len(self._metrics))
                return False
            log.error("MLflow rejected %d metric points (%s); recorded as dropped", len(metrics), self.last_error)
            self.rejected += metrics
            return True
        if failing:
            log.info("MLflow logging recovered: %d metric points delivered", len(metrics))
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until everything queued is delivered; True if it was."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()  # try again now rather than after the backoff
        with self._cond:
            while self._metrics or self._tags:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def close(self) -> Tuple[List[Any], int, Dict[str, str]]:
        """Stop sending: what was not confirmed (metrics, how many of them in an unanswered request, tags)."""
        with self._cond:
            self._closed = True
            left = (list(self._metrics), self._sending, dict(self._tags))
            self._metrics, self._tags = [], {}
            self._cond.notify_all()
        self._wake.set()
        return left


def _dropped_report(metrics: Sequence[Any], in_flight: int, rejected: Sequence[Any], last_error: str,
                    waited_s: float) -> Dict[str, Any]:
    """What never reached the server, for ``tracking_dropped.json``."""
    points = list(rejected) + list(metrics)
    keys = sorted({m.key for m in points})
    return {"points": len(points), "undelivered": len(metrics), "rejected": len(rejected),
            "in_flight": in_flight, "steps": sorted({int(m.step) for m in points}),
            "keys": {k: sorted(int(m.step) for m in points if m.key == k) for k in keys},
            "flush_timeout_s": waited_s, "last_error": last_error,
            "note": "undelivered: the tracking server did not take them before the run ended; in_flight of those "
                    "were in a request still unanswered then (they may have arrived); rejected: refused by the server"}


def _dropped_text(report: Dict[str, Any]) -> str:
    steps, keys = report["steps"], list(report["keys"])
    where = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    names = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "")
    return (f"{report['points']} metric points not delivered ({where}; keys {names}); "
            f"last error: {report['last_error'][:300]}; see {DROPPED_ARTIFACT}")


# --------------------------------------------------------------------------- one training run
class FitTracker:
    """Logs one fit (one fold) to MLflow from wherever it runs (rank 0 of a Ray Train worker).

    Args:
        cfg: The run's resolved config.
        tracking_uri: MLflow tracking URI (resolved by the driver: workers run elsewhere).
        experiment: MLflow experiment name.
        run_name: Run name; an unfinished run of that name under the same parent is re-attached.
        parent_run_id: The trial run this fold belongs to.
        tags: Extra tags.
        flush_timeout_s: How long `finish` and `fail` wait for queued epochs to reach the server
            before recording them as dropped.
        final_timeout_s: How long the calls of `finish` and `fail` retry on connection trouble.
    """

    def __init__(self, cfg: ExperimentConfig, tracking_uri: str, experiment: str, run_name: str,
                 parent_run_id: Optional[str] = None, tags: Optional[dict] = None, flush_timeout_s: float = 120.0,
                 final_timeout_s: float = 120.0) -> None:
        self.cfg, self.tracking_uri = cfg, tracking_uri
        self.flush_timeout_s, self.final_timeout_s = float(flush_timeout_s), float(final_timeout_s)
        exp_id = _experiment_id(tracking_uri, experiment, artifact_location(cfg))
        self.run_id: str = _open_run(cfg, tracking_uri, exp_id, run_name, parent_run_id, dict(tags or {}),
                                     reuse=True, role="fold" if parent_run_id else "run")
        self._sender = _Sender(tracking_uri, self.run_id)
        self._weights_logged = False
        self._deadline, self._unreachable = 0.0, False

    def on_epoch(self, epoch: int, metrics: dict, checkpoint_path: Any) -> None:
        """Queue every finite numeric metric at ``step=epoch`` and return at once (sent in the background).

        Args:
            epoch: Completed epochs (the fit loop's 1-based counter).
            metrics: The epoch's metrics.
            checkpoint_path: Path or URI of the last checkpoint (tag ``last_checkpoint``, unless it
                is node-local scratch: see the module docstring).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(_BAD_KEY.sub("_", k), float(v), now, int(epoch)) for k, v in metrics.items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(float(v))]
        tags = {"epochs_done": str(epoch)}
        if checkpoint_path is not None and not durable.is_scratch(checkpoint_path):
            tags["last_checkpoint"] = str(checkpoint_path)[:_MAX_TAG]
        self._sender.put(points, tags)

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait until the queued epochs are delivered (at most ``timeout_s``, default ``flush_timeout_s``).

        Returns:
            True when nothing is left to send.
        """
        return self._sender.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def note_attempt(self, node_ip: str, resumed_after: Optional[int] = None) -> int:
        """Record this attempt of the run: tags ``robustseg.attempt`` and ``robustseg.node_ip``, and on a restart
        a line in ``robustseg.restarts``; on a resume ``robustseg.resumed_after_epoch`` and the metric
        ``resumed_from_epoch`` at the first epoch of this attempt. Sent in the background.

        Args:
            node_ip: This attempt's node address.
            resumed_after: The last epoch restored from the checkpoint (None for a fresh start).

        Returns:
            The attempt number (1 + the previous attempt's, read from the run; 1 when unreadable).
        """
        from mlflow.entities import Metric

        try:
            have = _retry(_client(self.tracking_uri).get_run, self.run_id).data.tags
        except Exception as e:  # noqa: BLE001 - tracking trouble never stops training
            log.warning("MLflow run %s unreadable (%s): attempt not counted", self.run_id, e)
            have = {}
        try:
            prev = int(have.get(ATTEMPT, "0"))
        except ValueError:
            prev = 0
        attempt = prev + 1 if prev else (2 if resumed_after is not None else 1)
        tags = {ATTEMPT: str(attempt), NODE_IP: str(node_ip)}
        points = []
        if resumed_after is not None:
            tags[RESUMED_AFTER] = str(int(resumed_after))
            points.append(Metric("resumed_from_epoch", float(resumed_after), int(time.time() * 1000),
                                 int(resumed_after) + 1))
        if attempt > 1:
            how = (f"resumed after epoch {int(resumed_after)}" if resumed_after is not None
                   else "started again from the beginning")
            line = (f"attempt {attempt} on {node_ip} {how} "
                    "(the previous attempt stopped without finishing: worker or node lost)")
            tags[RESTARTS] = "\n".join(x for x in (have.get(RESTARTS, ""), line) if x)[-_MAX_TAG:]
        self._sender.put(points, tags)
        return attempt

    def finish(self, result: Any, out_dir: Path, last_checkpoint: Optional[str] = None) -> None:
        """Log plots, history, per-case metrics, overlays, plan, best metrics and weights; mark FINISHED.

        Queued epochs are flushed first (`flush`); what cannot be delivered is recorded as dropped.

        Args:
            result: The `robustseg.engine.fit.FitResult`.
            out_dir: The fit's output folder (``val_cases.csv`` and ``*overlay*.png`` are picked up).
            last_checkpoint: Durable URI of the final ``last.pt`` (a Ray worker's copy in the run's
                storage); default ``result.last_checkpoint`` unless that is node-local scratch.
        """
        client, out_dir, errors = _client(self.tracking_uri), Path(out_dir), []
        history = [dict(h, epoch=h.get("epoch", i + 1)) for i, h in enumerate(result.history)]
        steps = self._drain()
        steps += [
            lambda tmp: client.log_text(self.run_id, json.dumps(history, indent=1, default=float), "history.json"),
            lambda tmp: self._log_curves(history, tmp), lambda tmp: self._log_outputs(out_dir),
            lambda tmp: self._log_plan(result), lambda tmp: self._log_weights(result, tmp),
            lambda tmp: self._log_best(result, history, last_checkpoint)]
        with tempfile.TemporaryDirectory() as tmp:
            for step in steps:
                try:
                    self._final(step, Path(tmp))
                except Exception as e:  # one missing artifact must not lose the run's status
                    errors.append(f"{type(e).__name__}: {e}")
                    log.warning("MLflow artifact logging failed: %s", e)
        if errors:
            try:
                self._final(_set_tags, self.tracking_uri, self.run_id, {"artifact_errors": "; ".join(errors)})
            except Exception as e:  # noqa: BLE001 - the status matters more
                log.warning("MLflow artifact_errors tag not set: %s", e)
        self._final(end_run, self.tracking_uri, self.run_id, "FINISHED", last_try=True)

    def fail(self, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED for Ctrl-C) with the error text as tag ``error``.

        Queued epochs are flushed first, as in `finish`.

        Args:
            exc: The exception that stopped training.
        """
        for step in self._drain():
            try:
                self._final(step, None)
            except Exception as e:  # noqa: BLE001 - the status matters more
                log.warning("MLflow logging failed: %s", e)
        self._final(end_run, self.tracking_uri, self.run_id, _status_for(exc), exc, last_try=True)

    def _drain(self) -> List[Callable[[Any], None]]:
        """Flush and stop the sender; start the final calls' deadline; the steps that record what is left.

        The latest undelivered tags are set in the final calls (they are state); undelivered metric
        points are recorded as dropped (`DROPPED_TAG`, `DROPPED_ARTIFACT`) and in this process's log.
        """
        self._sender.flush(self.flush_timeout_s)
        metrics, in_flight, tags = self._sender.close()
        self._deadline = time.monotonic() + self.final_timeout_s
        steps: List[Callable[[Any], None]] = []
        if metrics or self._sender.rejected:
            report = _dropped_report(metrics, in_flight, self._sender.rejected, self._sender.last_error,
                                     self.flush_timeout_s)
            log.error("MLflow run %s: %s %s", self.run_id, _dropped_text(report), json.dumps(report))
            steps.append(lambda tmp: self._log_dropped(report))
        if tags:
            steps.append(lambda tmp: _set_tags(self.tracking_uri, self.run_id, tags))
        return steps

    def _log_dropped(self, report: Dict[str, Any]) -> None:
        _set_tags(self.tracking_uri, self.run_id, {DROPPED_TAG: _dropped_text(report)})
        _client(self.tracking_uri).log_dict(self.run_id, report, DROPPED_ARTIFACT)

    def _final(self, fn: Callable[..., Any], *args: Any, last_try: bool = False) -> Any:
        """``fn(*args)`` for `finish`/`fail`, retried on transient trouble (1 s doubling to 10 s) until the deadline.

        Once a call has failed past the deadline the server counts as gone: the remaining calls
        are skipped, except the one that ends the run (``last_try``), which is always tried.
        """
        if self._unreachable and not last_try:
            raise ConnectionError(f"skipped: MLflow at {self.tracking_uri} unreachable past the final timeout")
        delay = 1.0
        while True:
            try:
                return _retry(fn, *args)
            except Exception as e:
                if not _transient(e):
                    raise
                if time.monotonic() + delay > self._deadline:
                    self._unreachable = True
                    raise
                log.warning("MLflow unreachable (%s); trying again in %.0f s", e, delay)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def _log_curves(self, history: Sequence[Dict[str, Any]], tmp: Path) -> None:
        from robustseg.engine.plots import plot_history

        if history:
            png = plot_history(history, tmp / "learning_curve.png")
            _client(self.tracking_uri).log_artifact(self.run_id, str(png), "plots")

    def _log_outputs(self, out_dir: Path) -> None:
        client = _client(self.tracking_uri)
        if (out_dir / "val_cases.csv").is_file():
            client.log_artifact(self.run_id, str(out_dir / "val_cases.csv"), "metrics")
        overlays = sorted(p for p in out_dir.rglob("*.png") if "overlay" in str(p.relative_to(out_dir)).lower())
        for p in overlays[:64]:  # bounded: a big validation fold must not flood the store
            client.log_artifact(self.run_id, str(p), "overlays")

    def _log_plan(self, result: Any) -> None:
        path = result.best_checkpoint or result.last_checkpoint
        if path is None or not Path(path).is_file():
            return
        from robustseg.engine.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        client = _client(self.tracking_uri)
        for key in ("plan", "layout"):
            if ckpt.get(key):
                client.log_dict(self.run_id, ckpt[key], f"preprocessing/{key}.json")

    def _log_weights(self, result: Any, tmp: Path) -> None:
        """The fit's best.pt (else last.pt) as the artifact ``checkpoints/best.pt``."""
        import shutil

        src = next((Path(p) for p in (result.best_checkpoint, result.last_checkpoint)
                    if p is not None and Path(p).is_file()), None)
        if src is None:
            return
        if src.name != "best.pt":
            (tmp / "weights").mkdir(exist_ok=True)
            src = Path(shutil.copy2(src, tmp / "weights" / "best.pt"))
        folder = BEST_ARTIFACT.rsplit("/", 1)[0]
        _client(self.tracking_uri).log_artifact(self.run_id, str(src), folder)
        self._weights_logged = True

    def _log_best(self, result: Any, history: Sequence[Dict[str, Any]], last: Optional[str] = None) -> None:
        from mlflow.entities import Metric

        # Summary values, not a series: step 0. The MLflow 3.17 UI charts a metric whose latest
        # point has step >= 1 as a line (one dot here, at the best or the last epoch alike) and
        # one at step 0 as a bar labelled with its value. A resumed run's newer point at step 0
        # also replaces the earlier attempt's as the latest value (same step, later timestamp).
        now, step = int(time.time() * 1000), 0
        best = {"epochs_run": float(result.epochs_run), "stopped_early": float(bool(result.stopped_early))}
        if math.isfinite(result.best_score):
            best.update(best_val_dice=float(result.best_score), best_epoch=float(result.best_epoch))
            row = next((h for h in history if h.get("epoch") == result.best_epoch), {})
            best.update({f"best_{k}": float(v) for k, v in row.items() if k.startswith("val_") and k != "val_dice"
                         and isinstance(v, (int, float)) and math.isfinite(float(v))})
        _client(self.tracking_uri).log_batch(self.run_id, metrics=[Metric(_BAD_KEY.sub("_", k), v, now, step)
                                                                   for k, v in best.items()])
        tags: Dict[str, str] = {}
        if self._weights_logged:
            tags["best_checkpoint"] = f"runs:/{self.run_id}/{BEST_ARTIFACT}"
        elif result.best_checkpoint is not None and not durable.is_scratch(result.best_checkpoint):
            tags["best_checkpoint"] = str(result.best_checkpoint)
        last = last if last is not None else result.last_checkpoint
        if last is not None and not durable.is_scratch(last):
            tags["last_checkpoint"] = str(last)
        if tags:
            _set_tags(self.tracking_uri, self.run_id, tags)


def callback(tracker: FitTracker) -> Callable[[int, Dict[str, float], Path], None]:
    """A `robustseg.engine.fit.fit` callback that forwards each epoch to ``tracker``.

    Args:
        tracker: The run's tracker.
    """
    def on_epoch(epoch: int, metrics: Dict[str, float], last_checkpoint: Path) -> None:
        tracker.on_epoch(epoch, metrics, last_checkpoint)

    return on_epoch



__all__ = ["ATTEMPT", "BEST_ARTIFACT", "DROPPED_ARTIFACT", "DROPPED_TAG", "FitTracker", "NODE_IP", "RESTARTS",
           "RESUMED_AFTER", "callback"]
