"""`cv_objective`: one Tune trial = one sampled config trained on every fold.

The trial is a thin function trainable: rebuild the config from the trial's Tune config,
run one Ray Train fit per fold (``fold_runner``, `trainables.train_fold.run_fold` unless
injected), and report the running cross-validated mean after each fold in fold order, with
a checkpoint of the finished folds so a resumed trial does not train them again.
`trainables.tune_driver.run_sweep` builds the sweep around it.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from robustseg.config import ExperimentConfig
from search_spaces import apply_sample
from trainables.tune_tracking import FoldFailedError, TrialTracking, fold_storage_name

log = logging.getLogger(__name__)

METRIC, MODE = "cv_dice", "max"
#: Trial-config key holding the sampled point (config paths), kept apart from Optuna's raw values.
SAMPLE_KEY = "sample"
#: Trial-config key of the storage path under which the fold runs live.
FOLD_STORAGE = "fold_storage"
STATE_FILE = "folds.json"
FoldRunner = Callable[..., Dict[str, Any]]


def default_fold_runner() -> FoldRunner:
    """`trainables.train_fold.run_fold`, imported when first needed (it pulls in Ray Train)."""
    from trainables.train_fold import run_fold

    return run_fold


def trial_config(config: Mapping[str, Any]) -> ExperimentConfig:
    """The trial's experiment: ``config["base"]`` with the sampled point applied.

    The point is ``config["sample"]`` (nested or ``"a/b"`` keys). Without one, top-level keys
    that name config sections (a plain Tune ``param_space`` such as ``{"optim": {"lr": ...}}``
    or ``{"optim/lr": ...}``) are the point.

    Raises:
        ConfigError: the merged config is invalid.
    """
    base = ExperimentConfig.from_dict(config["base"])
    sample = config.get(SAMPLE_KEY)
    if sample is None:
        sections = set(base.to_dict())
        sample = {k: v for k, v in config.items() if str(k).split("/")[0] in sections}
    return ExperimentConfig.from_dict(apply_sample(base.to_dict(), sample or {}))


def fold_config(cfg: ExperimentConfig, k: int) -> ExperimentConfig:
    """``cfg`` with fold ``k`` held out for validation."""
    d = cfg.to_dict()
    d["data"]["val_fold"] = int(k)
    return ExperimentConfig.from_dict(d)


def fold_columns(metrics: Mapping[str, Any], k: int) -> Dict[str, Optional[float]]:
    """``fold<j>_dice`` for every fold (None where not reported)."""
    return {f"fold{j}_dice": metrics.get(f"fold{j}_dice") for j in range(k)}


def cv_objective(config: Dict[str, Any], fold_runner: Optional[FoldRunner] = None) -> None:
    """Tune function trainable: cross-validated Dice of one sampled config.

    Trial config keys: ``base`` (the base config dict), ``sample`` (the sampled point),
    ``fold_concurrency`` (folds at once, default 1), ``fold_storage`` (where fold runs are
    stored), ``mlflow`` (``{"tracking_uri", "experiment", "parent_run_id"}`` or None).

    Reports ``cv_dice`` (mean of the folds so far, in fold order), ``fold_dice`` (list),
    ``fold<k>_dice``, ``done_folds`` (== ``training_iteration``) and ``folds`` once per fold.

    Args:
        config: The trial config (see above).
        fold_runner: ``fn(cfg, *, storage_path, run_name, mlflow) -> dict`` with ``val_dice``
            and ``error``; default `trainables.train_fold.run_fold`.

    Raises:
        FoldFailedError: a fold returned an error or a non-finite Dice, or raised.
    """
    from ray import tune

    runner = fold_runner or default_fold_runner()
    cfg = trial_config(config)
    k_folds = cfg.data.folds
    ctx = tune.get_context()
    name = ctx.get_trial_name() or "trial"
    storage = config.get(FOLD_STORAGE) or str(Path(ctx.get_trial_dir() or ".") / "folds")
    results, reported = _restore_state()
    tracking = TrialTracking(config.get("mlflow"), cfg, name)

    def run(k: int) -> Tuple[Dict[str, Any], Optional[BaseException]]:
        ml = tracking.fold_kwargs(k)  # MLflow run "fold<k> · <trial>", tagged with sweep, trial and fold
        try:
            out = dict(runner(fold_config(cfg, k), storage_path=storage, run_name=fold_storage_name(name, k),
                              mlflow=ml))
        except Exception as e:  # reported below with the fold's name; the traceback goes to the log
            log.exception("fold %d of %s raised", k, name)
            return {"val_dice": math.nan, "error": f"{type(e).__name__}: {e}"}, e
        dice = out.get("val_dice")
        if out.get("error") is None and not (isinstance(dice, (int, float)) and math.isfinite(dice)):
            out["error"] = f"non-finite validation Dice {dice!r}"
        return out, None

    # A resumed trial may hold folds that finished out of order: report what is now in order.
    reported = _report_in_order(results, reported, k_folds, tracking)
    pending = [k for k in range(k_folds) if k not in results]
    workers = max(1, min(int(config.get("fold_concurrency") or 1), len(pending) or 1))
    failures: Dict[int, Tuple[str, Optional[BaseException]]] = {}

    def collect(k: int, out: Dict[str, Any], exc: Optional[BaseException]) -> None:
        nonlocal reported
        if out.get("error") is not None:
            failures[k] = (str(out["error"]), exc)
            return
        results[k] = {"val_dice": float(out["val_dice"]), "best_epoch": int(out.get("best_epoch", -1)),
                      "checkpoint": out.get("checkpoint")}
        if not failures:
            reported = _report_in_order(results, reported, k_folds, tracking)

    if workers > 1:
        with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-fold") as pool:
            futures = {pool.submit(run, k): k for k in pending}
            for fut in cf.as_completed(futures):
                out, exc = fut.result()
                collect(futures[fut], out, exc)
                if failures:  # folds not started yet are skipped; running ones finish
                    for f in futures:
                        f.cancel()
    else:
        for k in pending:
            collect(k, *run(k))
            if failures:
                break
    if failures:
        msg = "; ".join(f"fold {k} ({fold_storage_name(name, k)}): {err}" for k, (err, _) in sorted(failures.items()))
        tracking.fail(msg)
        first = next(iter(sorted(failures.items())))[1][1]
        raise FoldFailedError(f"trial {name} failed: {msg}") from first


def _report_in_order(results: Dict[int, Dict[str, Any]], reported: int, k_folds: int, tracking: TrialTracking) -> int:
    """Report every fold whose predecessors are all done; returns the new number reported."""
    from ray import tune

    while reported < k_folds and reported in results:
        reported += 1
        dices = [results[j]["val_dice"] for j in range(reported)]
        metrics: Dict[str, Any] = {METRIC: sum(dices) / len(dices), "fold_dice": dices, "done_folds": reported,
                                   "folds": k_folds}
        metrics.update({f"fold{j}_dice": d for j, d in enumerate(dices)})
        if tracking.run_id:
            metrics["mlflow_run_id"] = tracking.run_id
        if reported == k_folds:
            # Before the last report: a scheduler may stop the trial as soon as it lands.
            tracking.finish({j: results[j]["val_dice"] for j in range(k_folds)})
        with tempfile.TemporaryDirectory() as d:
            state = {"reported": reported, "folds": {str(j): r for j, r in results.items()}}
            (Path(d) / STATE_FILE).write_text(json.dumps(state))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    return reported


def _restore_state() -> Tuple[Dict[int, Dict[str, Any]], int]:
    """Finished folds and the number reported, from the trial's last checkpoint (resume)."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return {}, 0
    with ckpt.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
    return {int(k): v for k, v in state["folds"].items()}, int(state["reported"])


__all__ = ["FOLD_STORAGE", "FoldFailedError", "METRIC", "MODE", "SAMPLE_KEY", "cv_objective",
           "default_fold_runner", "fold_columns", "fold_config", "trial_config"]
