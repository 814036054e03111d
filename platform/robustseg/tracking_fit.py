"""MLflow record of one training run (one fold): `FitTracker` and its fit-loop `callback`.

Per-epoch metrics at ``step=epoch`` (kept and resent when logging fails, so tracking
trouble never stops training), then the learning curve, history, per-case metrics,
overlays, preprocessing plan, best metrics and the best weights when the fit ends.

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
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from robustseg import durable
from robustseg.config import ExperimentConfig
from robustseg.tracking_runs import _open_run, _set_tags, _status_for, end_run
from robustseg.tracking_store import _client, _experiment_id, _retry, artifact_location
from robustseg.tracking_tags import _BAD_KEY

log = logging.getLogger("robustseg.tracking")  # the logger it had before the split
#: Artifact path of the fit's best weights in its run.
BEST_ARTIFACT = "checkpoints/best.pt"


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
    """

    def __init__(self, cfg: ExperimentConfig, tracking_uri: str, experiment: str, run_name: str,
                 parent_run_id: Optional[str] = None, tags: Optional[dict] = None) -> None:
        self.cfg, self.tracking_uri = cfg, tracking_uri
        exp_id = _experiment_id(tracking_uri, experiment, artifact_location(cfg))
        self.run_id: str = _open_run(cfg, tracking_uri, exp_id, run_name, parent_run_id, dict(tags or {}),
                                     reuse=True, role="fold" if parent_run_id else "run")
        self._pending: List[Any] = []
        self._weights_logged = False

    def on_epoch(self, epoch: int, metrics: dict, checkpoint_path: Any) -> None:
        """Log every finite numeric metric at ``step=epoch``; tracking trouble never stops training.

        Args:
            epoch: Completed epochs (the fit loop's 1-based counter).
            metrics: The epoch's metrics.
            checkpoint_path: Path or URI of the last checkpoint (tag ``last_checkpoint``, unless it
                is node-local scratch: see the module docstring).
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(_BAD_KEY.sub("_", k), float(v), now, int(epoch)) for k, v in metrics.items()
                          if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
                          and math.isfinite(float(v))]
        try:
            for i in range(0, len(self._pending), 1000):
                _retry(_client(self.tracking_uri).log_batch, self.run_id, metrics=self._pending[i:i + 1000])
            self._pending = []
            tags = {"epochs_done": str(epoch)}
            if checkpoint_path is not None and not durable.is_scratch(checkpoint_path):
                tags["last_checkpoint"] = str(checkpoint_path)
            _set_tags(self.tracking_uri, self.run_id, tags)
        except Exception as e:  # kept in _pending and sent with the next epoch
            log.warning("MLflow logging failed at epoch %s (%s); will retry next epoch", epoch, e)

    def finish(self, result: Any, out_dir: Path, last_checkpoint: Optional[str] = None) -> None:
        """Log plots, history, per-case metrics, overlays, plan, best metrics and weights; mark FINISHED.

        Args:
            result: The `robustseg.engine.fit.FitResult`.
            out_dir: The fit's output folder (``val_cases.csv`` and ``*overlay*.png`` are picked up).
            last_checkpoint: Durable URI of the final ``last.pt`` (a Ray worker's copy in the run's
                storage); default ``result.last_checkpoint`` unless that is node-local scratch.
        """
        client, out_dir, errors = _client(self.tracking_uri), Path(out_dir), []
        history = [dict(h, epoch=h.get("epoch", i + 1)) for i, h in enumerate(result.history)]
        steps: List[Callable[[Path], None]] = [
            lambda tmp: client.log_text(self.run_id, json.dumps(history, indent=1, default=float), "history.json"),
            lambda tmp: self._log_curves(history, tmp), lambda tmp: self._log_outputs(out_dir),
            lambda tmp: self._log_plan(result), lambda tmp: self._log_weights(result, tmp),
            lambda tmp: self._log_best(result, history, last_checkpoint)]
        with tempfile.TemporaryDirectory() as tmp:
            for step in steps:
                try:
                    _retry(step, Path(tmp))
                except Exception as e:  # one missing artifact must not lose the run's status
                    errors.append(f"{type(e).__name__}: {e}")
                    log.warning("MLflow artifact logging failed: %s", e)
        if errors:
            _set_tags(self.tracking_uri, self.run_id, {"artifact_errors": "; ".join(errors)})
        end_run(self.tracking_uri, self.run_id, "FINISHED")

    def fail(self, exc: BaseException) -> None:
        """Mark the run FAILED (KILLED for Ctrl-C) with the error text as tag ``error``.

        Args:
            exc: The exception that stopped training.
        """
        end_run(self.tracking_uri, self.run_id, _status_for(exc), exc)

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

        now, step = int(time.time() * 1000), max(int(result.best_epoch), 0)
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



__all__ = ["BEST_ARTIFACT", "FitTracker", "callback"]
