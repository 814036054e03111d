"""MLflow bookkeeping of a sweep: the sweep run (driver) and the trial runs (trial actors).

Layout (see `robustseg.tracking`): sweep run -> one trial run per Tune trial -> one fold run
per Ray Train fit (opened by the fold's rank 0 from the keyword arguments built here). A run
is always ended: the trial ends its own run (FINISHED with ``cv_val_dice``, or FAILED); runs
whose process was stopped from outside (an ASHA stop, an interruption) are ended KILLED by
the driver, together with any fold runs still RUNNING under them. `robustseg.tracking` is
imported lazily so that a sweep without MLflow never needs it.

What the MLflow UI shows of a sweep:

* the sweep run's params are the *base* config; when the sweep ends, the winner is logged
  beside them under one prefix (`WINNER`): ``winner.<config key>`` params (the keys sampled or
  different from the base; only once the sweep is complete: MLflow params cannot change),
  metric ``winner_cv_dice``, tags ``winner.trial``, ``winner.trial_id``, ``winner.run_id`` and
  ``winner.final``, and a run description linking to the winning trial's run;
* trial and fold runs carry the sweep name (tag ``robustseg.sweep``, as on the sweep run),
  the trial name (``robustseg.trial``) and ``fold``;
* fold runs are named ``fold<k> · trial_<n>_<id>`` (`fold_run_name`): the fold first, so
  the runs table, which cuts long names, tells them apart. Only the MLflow name: the Ray
  storage folder of a fold keeps ``trial_<n>_<id>_fold<k>`` (`fold_storage_name`), which a
  resumed sweep looks for.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from robustseg.config import ExperimentConfig

log = logging.getLogger(__name__)
#: Tag of the sweep run holding the sweep folder (storage path or URI).
SWEEP_PATH = "robustseg.sweep_path"
#: Prefix of what the sweep run records about its winner (params, tags; metric ``winner_cv_dice``).
WINNER = "winner."
WINNER_METRIC = "winner_cv_dice"
#: Config keys never worth a ``winner.`` param (the same for every trial, or per fold).
_NOT_WINNER_PARAMS = ("name", "data.val_fold")


class FoldFailedError(RuntimeError):
    """A fold of a trial failed; the trial fails with this message."""


def fold_run_name(trial: str, k: int) -> str:
    """MLflow run name of fold ``k`` of a trial: ``fold0 · trial_002_a6e19da6`` (fold first)."""
    return f"fold{int(k)} · {trial}"


def fold_storage_name(trial: str, k: int) -> str:
    """Ray Train run (storage folder) name of fold ``k`` of a trial: ``trial_002_a6e19da6_fold0``.

    Unchanged since the first sweeps: a resumed sweep finds its finished folds by it.
    """
    return f"{trial}_fold{int(k)}"


def fold_tags(sweep: Optional[str], trial: str, k: int) -> Dict[str, str]:
    """The grouping tags of a fold run: the sweep name, the trial name and the fold."""
    from robustseg.tracking_tags import SWEEP, TRIAL

    tags = {TRIAL: trial, "fold": str(int(k))}
    if sweep:
        tags[SWEEP] = sweep
    return tags


@dataclass
class Winner:
    """The best completed trial of a sweep, as the sweep run records it.

    Attributes:
        trial: Trial name (``trial_<n>_<id>``: its MLflow run name).
        trial_id: Tune trial id.
        cv_dice: Its cross-validated Dice.
        cfg: Its resolved config.
        sample: The sampled point (``"a/b"`` keys).
        run_id: Its MLflow trial run (looked up by name under the sweep run when None).
    """

    trial: str
    trial_id: str
    cv_dice: float
    cfg: ExperimentConfig
    sample: Mapping[str, Any] = field(default_factory=dict)
    run_id: Optional[str] = None


def winner_params(base: ExperimentConfig, winner: ExperimentConfig, sample: Mapping[str, Any]) -> Dict[str, str]:
    """``winner.<key>`` params: the winner's value of every sampled key and of every key that differs from the base.

    Args:
        base: The sweep's base config (the sweep run's own params).
        winner: The winning trial's config.
        sample: The winning trial's sampled point (``"a/b"`` keys, as in ``trials.json``).
    """
    from robustseg.tracking_tags import MAX_PARAM_KEY, flatten_config

    flat_base, flat = flatten_config(base), flatten_config(winner)
    sampled = {k.replace("/", ".") for k in sample}
    keys = [k for k in flat if k not in _NOT_WINNER_PARAMS
            and (flat_base.get(k) != flat[k] or k in sampled or any(k.startswith(s + ".") for s in sampled))]
    return {(WINNER + k)[:MAX_PARAM_KEY]: flat[k] for k in sorted(keys)}


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
        self.name, self.base = name, cfg
        self.run_id = tracking_runs.sweep_parent(cfg, name, resume=resume,
                                                 tags={"robustseg.space": space, SWEEP_PATH: path})
        #: What each trial needs to open its run under this sweep (goes into the trial config).
        self.info = {"tracking_uri": self.uri, "experiment": self.experiment, "parent_run_id": self.run_id,
                     "sweep": name}

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

    def end(self, status: str, error: Optional[BaseException] = None, winner: Optional[Winner] = None) -> None:
        """Record the winner on the sweep run (`log_winner`) and end it with ``status``.

        Args:
            status: FINISHED (every trial done), KILLED (interrupted) or FAILED.
            error: What stopped the sweep, if anything.
            winner: The best completed trial so far; its config becomes ``winner.*`` params
                only when ``status`` is FINISHED (an interrupted sweep may still change winner).
        """
        try:
            if winner is not None:
                self.log_winner(winner, final=status == "FINISHED")
        except Exception:  # tracking trouble never hides the sweep's result
            log.warning("could not log the winner on the MLflow sweep run %s", self.run_id, exc_info=True)
        try:
            self._tracking.end_run(self.uri, self.run_id, status, error=error)
        except Exception:
            log.warning("could not end the MLflow sweep run %s", self.run_id, exc_info=True)

    def log_winner(self, winner: Winner, final: bool = True) -> None:
        """The winner on the sweep run: ``winner_cv_dice``, ``winner.*`` tags, params (when ``final``) and a link.

        A ``winner.*`` param already logged with another value (MLflow refuses to change a
        param) is set as a tag of the same name instead, with a warning.
        """
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        from robustseg.tracking_runs import log_metrics_batched
        from robustseg.tracking_tags import find_run_id

        client = MlflowClient(self.uri)
        run = client.get_run(self.run_id)
        run_id = winner.run_id or find_run_id(self.uri, self.experiment, winner.trial, self.run_id)
        log_metrics_batched(client, self.run_id, {WINNER_METRIC: float(winner.cv_dice)})
        tags = {WINNER + "trial": winner.trial, WINNER + "trial_id": winner.trial_id,
                WINNER + "final": str(bool(final)).lower(), "mlflow.note.content": _winner_note(
                    winner, run_id, run.info.experiment_id, final)}
        if run_id:
            tags[WINNER + "run_id"] = run_id
        if final:
            have = run.data.params
            params = winner_params(self.base, winner.cfg, winner.sample)
            clash = {k: v for k, v in params.items() if k in have and have[k] != v}
            if clash:
                log.warning("sweep run %s already holds other winner params %s: set as tags", self.run_id, sorted(clash))
                tags.update(clash)
            new = [Param(k, v) for k, v in params.items() if k not in have]
            for i in range(0, len(new), 100):  # log_batch takes at most 100 params or tags
                client.log_batch(self.run_id, params=new[i:i + 100])
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            client.log_batch(self.run_id, tags=items[i:i + 100])


def _winner_note(winner: Winner, run_id: Optional[str], experiment_id: str, final: bool) -> str:
    """The sweep run's description (markdown): the winner in one line, with a link to its run."""
    what = "Winner" if final else "Best so far (sweep interrupted)"
    link = f"[{winner.trial}](#/experiments/{experiment_id}/runs/{run_id})" if run_id else f"`{winner.trial}`"
    return (f"**{what}**: {link}: `{winner.cfg.model.name}`, optimiser `{winner.cfg.optim.name}`, "
            f"lr {winner.cfg.optim.initial_lr:.3g}; cross-validated Dice **{winner.cv_dice:.4f}**. The params without "
            f"the `{WINNER}` prefix are the sweep's base config.")


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
        self.info, self.run_id, self.name, self.sweep = dict(info or {}), None, name, None
        if not self.info:
            return
        from mlflow.tracking import MlflowClient

        from robustseg.tracking_runs import child_run
        from robustseg.tracking_tags import SWEEP, TRIAL

        self.run_id = child_run(cfg, self.info["parent_run_id"], name, trial_number=trial_number(name), role="trial",
                                tags={TRIAL: name})
        # Sweeps started before the name travelled in `info`: the trial run got it from the sweep run.
        self.sweep = (self.info.get("sweep")
                      or MlflowClient(self.info["tracking_uri"]).get_run(self.run_id).data.tags.get(SWEEP))

    def fold_kwargs(self, k: int) -> Optional[Dict[str, Any]]:
        """`robustseg.tracking.FitTracker` keyword arguments of fold ``k`` (None: tracking off).

        The run is named `fold_run_name` and tagged with the sweep, the trial and the fold (`fold_tags`).
        """
        if not self.run_id:
            return None
        return {"tracking_uri": self.info["tracking_uri"], "experiment": self.info["experiment"],
                "run_name": fold_run_name(self.name, k), "parent_run_id": self.run_id,
                "tags": fold_tags(self.sweep, self.name, k)}

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


__all__ = ["FoldFailedError", "SWEEP_PATH", "SweepTracking", "TrialTracking", "WINNER", "WINNER_METRIC", "Winner",
           "fold_run_name", "fold_storage_name", "fold_tags", "open_sweep_tracking", "trial_number", "winner_params"]
