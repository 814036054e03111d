"""MLflow bookkeeping of a sweep: the sweep run (driver) and the trial runs (trial actors).

Layout (see `robustseg.tracking`): sweep run -> one trial run per Tune trial -> one fold run
per Ray Train fit (opened by the fold's rank 0 from the keyword arguments built here). A run
is always ended: the trial ends its own run (FINISHED with ``cv_val_dice``, or FAILED); runs
whose process was stopped from outside (an ASHA stop, an interruption) are ended KILLED by
the driver, together with any fold runs still RUNNING under them. `robustseg.tracking` is
imported lazily so that a sweep without MLflow never needs it.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any, Dict, Mapping, Optional

from robustseg.config import ExperimentConfig

log = logging.getLogger(__name__)
#: Tag of the sweep run holding the sweep folder (storage path or URI).
SWEEP_PATH = "robustseg.sweep_path"


class FoldFailedError(RuntimeError):
    """A fold of a trial failed; the trial fails with this message."""


class SweepTracking:
    """The sweep's parent run and the end states the driver is responsible for.

    Args:
        cfg: Base config (its tracking section picks the server and experiment).
        name: Sweep name (the run name, and the tag `robustseg report` finds it by).
        space: Search space name (tag).
        resume: Re-attach to the sweep run of that name instead of opening a new one.
        path: The sweep folder (tag ``robustseg.sweep_path``: `robustseg ensemble --sweep RUN_ID` finds it).
    """

    def __init__(self, cfg: ExperimentConfig, name: str, space: str, resume: bool, path: str = "") -> None:
        from robustseg import tracking_runs
        from robustseg.tracking_store import resolve_tracking_uri

        self._tracking = tracking_runs
        self.uri = resolve_tracking_uri(cfg)
        self.experiment = cfg.tracking.experiment
        self.run_id = tracking_runs.sweep_parent(cfg, name, resume=resume,
                                                 tags={"robustseg.space": space, SWEEP_PATH: path})
        #: What each trial needs to open its run under this sweep (goes into the trial config).
        self.info = {"tracking_uri": self.uri, "experiment": self.experiment, "parent_run_id": self.run_id}

    def end_trial(self, run_id: str, status: str) -> None:
        """End a trial run its own process could not end, and fold runs left RUNNING under it."""
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            if exp is not None:
                running = client.search_runs(
                    [exp.experiment_id],
                    filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'")
                for r in running:
                    self._tracking.end_run(self.uri, r.info.run_id, status)
            self._tracking.end_run(self.uri, run_id, status)
        except Exception:  # tracking trouble never hides the sweep's result
            log.warning("could not end MLflow run %s", run_id, exc_info=True)

    def end(self, status: str, error: Optional[BaseException] = None, best: Optional[float] = None,
            best_trial: Optional[str] = None) -> None:
        """Log the best result on the sweep run and end it with ``status``."""
        try:
            if best is not None:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(self.uri)
                client.log_metric(self.run_id, "best_cv_dice", best)
                client.set_tag(self.run_id, "robustseg.best_trial", str(best_trial))
            self._tracking.end_run(self.uri, self.run_id, status, error=error)
        except Exception:
            log.warning("could not end the MLflow sweep run %s", self.run_id, exc_info=True)


def open_sweep_tracking(cfg: ExperimentConfig, name: str, space: str, *, resume: bool,
                        path: str = "") -> Optional[SweepTracking]:
    """The sweep's MLflow run, or None (with a warning) when `robustseg.tracking` is unavailable."""
    try:
        return SweepTracking(cfg, name, space, resume, path)
    except ImportError as e:
        warnings.warn(f"MLflow tracking requested but unavailable ({e}); the sweep runs untracked")
        return None


class TrialTracking:
    """A trial's run (child of the sweep run, parent of its fold runs); inert when tracking is off.

    Args:
        info: ``SweepTracking.info`` from the trial config, or None.
        cfg: The trial's resolved config (logged as the run's params).
        name: Tune trial name (the run name; a resumed trial re-attaches to it).
    """

    def __init__(self, info: Optional[Mapping[str, Any]], cfg: ExperimentConfig, name: str) -> None:
        self.info, self.run_id = dict(info or {}), None
        if not self.info:
            return
        from robustseg.tracking_runs import child_run

        self.run_id = child_run(cfg, self.info["parent_run_id"], name, trial_number=trial_number(name), role="trial")

    def fold_kwargs(self, run_name: str) -> Optional[Dict[str, Any]]:
        """`robustseg.tracking.FitTracker` keyword arguments of one fold (None: tracking off)."""
        if not self.run_id:
            return None
        return {"tracking_uri": self.info["tracking_uri"], "experiment": self.info["experiment"],
                "run_name": run_name, "parent_run_id": self.run_id}

    def finish(self, fold_scores: Dict[int, float]) -> None:
        """Log ``cv_val_dice`` and the per-fold Dice, and end the run FINISHED."""
        if self.run_id:
            from robustseg.tracking_runs import finish_trial

            finish_trial(self.info["tracking_uri"], self.run_id, fold_scores)

    def fail(self, message: str) -> None:
        """End the run FAILED with the folds' errors."""
        if self.run_id:
            from robustseg.tracking_runs import end_run

            end_run(self.info["tracking_uri"], self.run_id, "FAILED", error=FoldFailedError(message))


def trial_number(name: str) -> Optional[int]:
    """The trial number in a ``trial_<n>_<id>`` name (`trainables.tune_driver.trial_name`), else None."""
    m = re.match(r"trial_(\d+)_", name)
    return int(m.group(1)) if m else None


__all__ = ["FoldFailedError", "SweepTracking", "TrialTracking", "open_sweep_tracking", "trial_number"]
