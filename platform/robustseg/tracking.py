"""MLflow tracking: one run per training, nested under a trial and a sweep.

Layout of a sweep in MLflow (nesting through the ``mlflow.parentRunId`` tag, so the UI folds it):

    sweep run        robustseg.role=sweep   params: base config, and once the sweep is complete the
                                            winner's config as ``winner.<key>``; winner_cv_dice;
                                            tags winner.trial, winner.run_id (link in the description)
      trial run      robustseg.role=trial   params: the trial's config; cv_val_dice, val_dice_fold<k>
        fold run     robustseg.role=fold    params: the fold's config; per-epoch metrics, artifacts,
                                            the best weights (checkpoints/best.pt); named
                                            ``fold<k> · trial_<n>_<id>``

Trial and fold runs carry the sweep's tag (``robustseg.sweep``, the sweep name, as the sweep
run), ``robustseg.trial`` (the trial name) and ``fold``, so filtering on any of them finds
every run of a sweep, a trial or a fold. Summary metrics (``best_*``, ``epochs_run``,
``stopped_early``, ``cv_val_dice``) are logged at step 0, which the MLflow UI draws as a bar
with its value rather than a one-point line.

Everything goes through `MlflowClient` with explicit run ids, never the fluent "active run":
Ray workers, threads and the Tune driver each hold their own run ids and cannot clobber one
another's global state. A run that ends by an exception is marked FAILED (KILLED on Ctrl-C),
never left RUNNING; a worker killed outright cannot write anything, so a restarted worker
re-attaches to its unfinished run (same name, same parent) and keeps logging at the next epoch.

Tags on every run: ``backbone``, ``regime``, ``fold``, ``data_manifest_uri``, ``git_commit``
(+ ``mlflow.source.git.commit``, ``git_dirty``) when the code is a git checkout, and
``version.<package>``. Per-epoch metric names are the fit loop's (``loss``, ``val_dice``,
``val_dice_LV``, ``lr``, ``slices_per_s``, ...) for every backbone and regime, so runs compare
side by side in the MLflow UI. Training runs tag where their weights are: ``best_checkpoint``
(``runs:/<run id>/checkpoints/best.pt``) and ``last_checkpoint`` (a durable storage URI, see
`robustseg.durable`), never a node-local temp folder.

Modules. This one keeps the import path of the whole tracking API; the code lives in
`robustseg.tracking_store` (where runs go: URI, store, client, experiment),
`robustseg.tracking_tags` (params and tags), `robustseg.tracking_runs` (run lifecycle,
analysis runs, sweep and trial runs) and `robustseg.tracking_fit` (one training run).
"""
from __future__ import annotations

from robustseg import tracking_store
from robustseg.tracking_fit import FitTracker, callback  # noqa: F401
from robustseg.tracking_runs import (add_run_arguments, analysis_run, child_run, cli_tracking_uri,  # noqa: F401
                                     end_run, finish_trial, log_metrics_batched, sweep_parent, tracked_run)
from robustseg.tracking_store import (TrackingStoreError, artifact_location, ensure_experiment,  # noqa: F401
                                      local_store_path, require_store, resolve_tracking_uri)
from robustseg.tracking_tags import (MAX_PARAM_KEY, MAX_PARAM_VALUE, PARENT, ROLE, SWEEP, TRIAL, TRIAL_NUMBER,  # noqa: F401
                                     find_run_id, flatten_config, git_commit, manifest_uri, redacted_config, run_tags)

#: The cached `MlflowClient` per tracking URI that every part shares (one object per URI).
_client = tracking_store._client

__all__ = ["MAX_PARAM_KEY", "MAX_PARAM_VALUE", "PARENT", "ROLE", "SWEEP", "TRIAL", "TRIAL_NUMBER", "FitTracker",
           "TrackingStoreError", "add_run_arguments", "analysis_run", "artifact_location", "callback", "child_run",
           "cli_tracking_uri", "end_run", "ensure_experiment", "find_run_id", "finish_trial", "flatten_config",
           "git_commit", "local_store_path", "log_metrics_batched", "manifest_uri", "redacted_config",
           "require_store", "resolve_tracking_uri", "run_tags", "sweep_parent", "tracked_run"]
