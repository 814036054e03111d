"""The `robustseg` command.

Subcommands: ``prepare`` (sources -> shards + manifest), ``inspect`` (what a store holds),
``sources`` (registered formats), ``config`` (show / explain / validate), ``train``,
``predict`` (checkpoint, ensemble or endpoint), ``evaluate``, ``tune`` (Optuna on Ray Tune),
``report``, ``ensemble`` and ``registry`` (`robustseg.ensemble_cli`), ``serve``
(`robustseg.serve_cli`), ``robustness`` (`robustseg.robustness_cli`), ``demo`` (the end-to-end run on synthetic data). Errors the user can fix print one line naming the file
or URI and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import parse_qsl

import yaml

from robustseg.config import ExperimentConfig, SourceSpec, explain
from robustseg.errors import ConfigError, RobustsegError


# ------------------------------------------------------------------------------ helpers
def _progress(iterable: Any = None, **kw: Any) -> Any:
    """tqdm progress bars on stderr; silent when stderr is not a terminal (CI logs)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None, dynamic_ncols=True, leave=False, file=sys.stderr, **kw)


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_source(arg: str) -> SourceSpec:
    """``NAME:PATH[?key=value&...]`` -> `SourceSpec` (option values parsed as YAML scalars)."""
    from robustseg.data.sources import parse_source_arg

    try:
        name, rest = parse_source_arg(arg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    path, _, query = rest.partition("?")
    options = {k: yaml.safe_load(v) for k, v in parse_qsl(query, keep_blank_values=True)}
    return SourceSpec(name=name, path=path, options=options)


def load_config(path: Optional[str], overrides: Sequence[str]) -> ExperimentConfig:
    """Config from YAML (or defaults) with dotted overrides."""
    if path:
        return ExperimentConfig.from_yaml(path, overrides)
    return ExperimentConfig().with_overrides(overrides)


def print_table(rows: List[Dict[str, Any]], out: Any = None) -> None:
    """Plain aligned table of dict rows."""
    out = out or sys.stdout
    if not rows:
        return
    keys = list(rows[0])
    widths = {k: max(len(str(k)), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(str(k).rjust(widths[k]) for k in keys), file=out)
    for r in rows:
        print("  ".join(str(r[k]).rjust(widths[k]) for k in keys), file=out)


def print_summary(summary: Any) -> None:
    """Human summary of a prepare run."""
    print(f"prepared {summary.cases} cases ({summary.subjects} subjects, {summary.slices} slices) -> {summary.uri}")
    print(f"  shards: {summary.shards_written} written, {summary.shards_skipped} unchanged (reused); "
          f"{human_bytes(summary.bytes)} in {summary.seconds:.1f} s")
    if summary.committed:
        print(f"  committed snapshot {summary.generation}; {summary.removed} unreferenced files removed")
    else:
        print(f"  nothing changed: the store already holds this dataset (snapshot {summary.generation})")
    print_table(summary.folds)
    for w in summary.warnings[:10]:
        print(f"  warning: {w}")
    if len(summary.warnings) > 10:
        print(f"  ... and {len(summary.warnings) - 10} more warnings")


# ------------------------------------------------------------------------------ commands
def cmd_prepare(args: argparse.Namespace) -> int:
    """Run `robustseg prepare`."""
    from robustseg.data.prepare import prepare

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"data.shards_uri={args.out}")
    if args.plan:
        overrides.append(f"data.plan={args.plan}")
    if args.folds is not None:
        overrides.append(f"data.folds={args.folds}")
    if args.seed is not None:
        overrides.append(f"data.split_seed={args.seed}")
    if args.label_budget is not None:
        overrides.append(f"data.label_budget={args.label_budget}")
    cfg = load_config(args.config, overrides)
    if args.source:
        cfg.data.sources = [parse_source(s) for s in args.source]
    try:
        summary = prepare(cfg.data, progress=_progress, overwrite=args.force)
    except KeyboardInterrupt:
        # True by construction (robustseg.data.snapshot): nothing is committed before the end.
        print(f"robustseg prepare: interrupted; nothing was committed, {cfg.data.shards_uri} still holds its "
              "previous snapshot (if any). Complete shards are kept and a re-run reuses them.", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Run `robustseg inspect URI`."""
    from robustseg.data.manifest import read_manifest, verify_store
    from robustseg.data.storage import open_store

    store = open_store(args.uri)
    m = read_manifest(store)
    lay = m.layout
    print(f"{m.uri}: {len(m.cases)} cases, {m.n_slices} slices of {lay.height}x{lay.width} ({lay.image_dtype}), "
          f"{len(m.shards)} shards, {human_bytes(m.total_bytes)}; plan {m.plan.get('name')}; task {m.task}; "
          f"snapshot {m.generation} created {m.created}")
    print_table(m.fold_summary())
    if args.cases:
        print_table([{k: c[k] for k in ("case_id", "subject_id", "dataset", "phase", "motion_level", "fold",
                                        "n_slices", "has_label", "train_labelled")} for c in m.cases])
    problems = verify_store(store, m, checksums=args.verify)
    what = "size, SHA-256 and layout of every shard" if args.verify else "presence and size of every shard"
    if problems:
        print(f"UNHEALTHY: {len(problems)} problem(s) ({what} checked against the manifest):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"healthy: {what} match the manifest" + ("" if args.verify else " (--verify also checks contents)"))
    return 0


def cmd_sources(_: argparse.Namespace) -> int:
    """List registered sources with the first line of their docs."""
    from robustseg.data.sources import SOURCES

    for name in SOURCES.names():
        doc = (SOURCES.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:16s} {doc[0] if doc else ''}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Show, explain or validate a config."""
    if args.action == "explain":
        import robustseg.models  # noqa: F401  (registers the backbones)
        import robustseg.regimes  # noqa: F401  (registers the regimes)
        from robustseg.registry import BACKBONES, REGIMES

        cfg = load_config(args.config, args.overrides)
        rows = list(explain())
        # The params of the backbone and regime this config names (their own dataclasses).
        for registry, section in ((BACKBONES, cfg.model), (REGIMES, cfg.regime)):
            params = registry.meta(section.name).get("params")
            if params is not None:
                prefix = f"{'model' if section is cfg.model else 'regime'}.params ({section.name})"
                rows += explain(params, prefix)
        for key, default, text in rows:
            print(f"{key:32s} {default:24s} {text}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.action == "validate":
        check_config(cfg, args.config or "(defaults)")
        print(f"{args.config or '(defaults)'}: valid")
        return 0
    print(cfg.to_yaml(), end="")
    return 0


def check_config(cfg: ExperimentConfig, where: str = "") -> None:
    """What `train` checks before it touches data: the components a config names, and their params.

    Loading (`ExperimentConfig.from_dict`) checks every section's keys and types; the backbone,
    the regime and the augmentation preset are looked up by name and their free-form
    ``params`` are checked here, with the same registries and builders the fit loop uses, so
    ``config validate`` accepts exactly what ``train`` accepts. Every problem is reported,
    not only the first.

    Args:
        cfg: A loaded config.
        where: The config file, named in the error.

    Raises:
        ConfigError: one line per problem, each naming the key and listing the valid choices.
    """
    import robustseg.models  # noqa: F401  (registers the backbones)
    import robustseg.regimes  # noqa: F401  (registers the regimes)
    from robustseg.augment import build_augmenter
    from robustseg.config import from_dict
    from robustseg.errors import UnknownNameError
    from robustseg.registry import BACKBONES, REGIMES

    problems: List[str] = []
    dims = 2  # the augmentation's mirror axes are checked for 2D when the backbone is unknown
    for key, registry, section in (("model", BACKBONES, cfg.model), ("regime", REGIMES, cfg.regime)):
        try:
            registry.get(section.name)
        except UnknownNameError as e:
            problems.append(f"{key}.name: {e}")
            continue
        meta = registry.meta(section.name)
        dims = int(meta.get("spatial_dims", dims)) if key == "model" else dims
        try:
            if meta.get("params") is not None:
                from_dict(meta["params"], section.params, f"{key}.params ({section.name})")
        except ConfigError as e:
            problems.append(str(e))
    try:
        build_augmenter(cfg.augment, dims, cfg.data.plan)
    except ConfigError as e:
        problems.append(str(e))
    if len(problems) > 1:
        problems = [f"{len(problems)} problems:", *problems]
    if problems:
        raise ConfigError((f"{where}: " if where else "") + "\n  ".join(problems))


def _device(name: Optional[str]):
    import torch

    if name is None:
        return None
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def cmd_train(args: argparse.Namespace) -> int:
    """Run `robustseg train` (one model, one fold, plain process)."""
    from robustseg.engine.report import plot_history
    from robustseg.engine.train import train_from_config

    overrides = list(args.overrides)
    if args.fold is not None:
        overrides.append(f"data.val_fold={args.fold}")
    cfg = load_config(args.config, overrides)
    check_config(cfg, args.config)  # the checks of `config validate`, before any data is prepared or read
    t0 = time.perf_counter()
    print(f"training {cfg.model.name} ({cfg.regime.name}) on {cfg.data.shards_uri}, validation fold {cfg.data.val_fold}, "
          f"{cfg.optim.epochs} epochs x {cfg.optim.iters_per_epoch} iterations x batch {cfg.optim.batch_size}")

    def report(epoch: int, m: Dict[str, float], _: Path) -> None:
        val = "  ".join(f"{k[len('val_dice_'):]} {v:.3f}" for k, v in m.items() if k.startswith("val_dice_"))
        best = " *" if m.get("is_best") else ""
        print(f"epoch {epoch:4d}  loss {m.get('loss', float('nan')):.4f}  lr {m['lr']:.2e}  "
              f"{m['slices_per_s']:.0f} slices/s" + (f"  val Dice {m['val_dice']:.4f} ({val}){best}" if "val_dice" in m else
                                                       f"  val score {m['val_score']:.4f}{best}" if "val_score" in m else ""),
              flush=True)

    out = Path(args.out) if args.out else None
    result = train_from_config(cfg, out_dir=out, device=_device(args.device), resume=not args.no_resume,
                               callbacks=[report], progress=_progress)
    if result.last_checkpoint is not None:
        curve = plot_history(result.history, result.last_checkpoint.parent / "learning_curve.png")
        print(f"learning curve: {curve}")
    score = "Dice" if any("val_dice" in h for h in result.history) else "score"
    print(f"done in {time.perf_counter() - t0:.1f} s: best validation {score} {result.best_score:.4f} at epoch "
          f"{result.best_epoch}{' (early stop)' if result.stopped_early else ''}; best checkpoint {result.best_checkpoint}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Run `robustseg predict` (masks in the input geometry).

    A bad input does not stop the batch (unless ``--fail-fast``): every good mask is written,
    the failures are listed at the end and the exit status is 2. Inputs that look like label
    maps are skipped with a notice unless ``--force``.
    """
    from robustseg.engine.predict import check_output_dir, list_inputs, predict_files
    from robustseg.ensemble_cli import is_ensemble_uri, predict_with_ensemble, tracking_uri_from_args

    # Before any model is loaded or request sent: a bad --output or --input costs nothing.
    check_output_dir(args.output)
    if args.endpoint:
        from robustseg.serve_cli import predict_endpoint

        return predict_endpoint(args.endpoint, args.input, args.output, force=args.force, fail_fast=args.fail_fast)
    if not args.model:
        raise ConfigError("predict needs --model (checkpoint, ensemble folder or models:/ URI) or --endpoint URL")
    list_inputs(args.input)
    tta = False if args.no_tta else None
    options = {"device": _device(args.device), "tta": tta, "progress": _progress, "force": args.force,
               "fail_fast": args.fail_fast}
    if is_ensemble_uri(args.model):
        # The same default store as `ensemble`/`registry` ($MLFLOW_TRACKING_URI, else the workdir's
        # SQLite), so a model registered with the defaults is found with the defaults.
        rows = predict_with_ensemble(args.model, args.input, args.output, tracking_uri=tracking_uri_from_args(args),
                                     **options)
    else:
        rows = predict_files(args.model, args.input, args.output, full_fov=args.full_fov, **options)
    return report_masks(rows, f"{len(rows)} masks written to {args.output}")


def report_masks(rows: List[Dict[str, Any]], summary: str) -> int:
    """Print `robustseg predict`'s table, summary, skipped and failed inputs.

    Args:
        rows: One dict per written mask; a `PredictionRows` also carries ``skipped`` and
            ``failed`` inputs (``{"input", "reason"}``).
        summary: The line printed after the table.

    Returns:
        2 when an input failed or nothing was segmented because every input was skipped,
        3 when a mask is empty, else 0.
    """
    skipped, failed = getattr(rows, "skipped", []), getattr(rows, "failed", [])
    print_table([{k: (Path(v).name if k in ("input", "output") else v) for k, v in r.items()} for r in rows])
    total = len(rows) + len(skipped) + len(failed)
    if skipped or failed:
        summary += f" ({len(skipped)} skipped, {len(failed)} failed, of {total} inputs)"
    print(summary)
    if skipped:
        print(f"skipped {len(skipped)} input(s) that look like label maps, not scans:")
        for s in skipped:
            print(f"  {s['input']}: {s['reason']}")
    empty = [r["input"] for r in rows if r["empty"]]
    for f in empty:
        print(f"robustseg predict: error: {f}: empty prediction (no structure found): is it the modality, view "
              f"and orientation the model was trained on?", file=sys.stderr)
    for fail in failed:
        print(f"robustseg predict: error: {fail['input']}: {fail['reason']}", file=sys.stderr)
    if failed:
        print(f"robustseg predict: {len(failed)} of {total} inputs failed; the masks of the other "
              f"{len(rows)} were written", file=sys.stderr)
        return 2
    if skipped and not rows:
        print("robustseg predict: error: nothing segmented: every input looks like a label map "
              "(pass --force to segment them anyway)", file=sys.stderr)
        return 2
    return 3 if empty else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run `robustseg evaluate`."""
    from robustseg.engine.evaluate import evaluate_folder

    res = evaluate_folder(args.pred, args.gt, convention=args.convention, task=args.task, out_dir=args.out,
                          allow_missing=args.allow_missing)
    cols = [k for k in res["rows"][0] if k.startswith(("case_id", "prediction", "dice_", "hd95_"))]
    print_table([{k: (f"{r[k]:.3f}" if isinstance(r[k], float) else r[k]) for k in cols} for r in res["rows"]])
    summary = res["summary"]
    print(f"scored {summary['n_ground_truth']} cases: {summary['n_predicted']} predicted / "
          f"{summary['n_ground_truth']} ground truth")
    if res["missing"]:
        print(f"robustseg evaluate: warning: {len(res['missing'])} case(s) have no prediction and were scored as "
              f"empty masks (Dice 0, --allow-missing): {', '.join(res['missing'])}", file=sys.stderr)
    overall = summary["overall"]
    print("mean: " + "  ".join(f"{k} {v:.3f}" for k, v in overall.items() if k.startswith(("dice_", "hd95_"))
                               and isinstance(v, float)) + f"  (HD95 in {overall.get('hd95_unit')})")
    for key in ("motion_level", "phase"):
        for value, stats in res["summary"].get(key, {}).items():
            print(f"  {key}={value}: n={stats['n']} dice_mean {stats.get('dice_mean', float('nan')):.3f}")
    if res["function"]:
        err = res["summary"]["cardiac_function"]
        print(f"cardiac function ({len(res['function'])} ED/ES pairs): mean |EF error| LV {err['lv_ef_abs_error']:.1f} "
              f"RV {err['rv_ef_abs_error']:.1f} percentage points -> {res['function_csv']}")
    print(f"per-case CSV {res['csv']}, summary {res['json']}, plot {res['plot']}")
    return 0


def init_ray(num_cpus: Optional[int] = None) -> None:
    """Attach to ``RAY_ADDRESS`` when set, else start a local Ray with room for Ray Data.

    On small machines Train workers plus a Tune trial can starve Ray Data of CPUs (see
    STACK_NOTES); declaring at least 4 logical CPUs avoids that deadlock.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # address="local": a fresh local cluster even if a stale /tmp/ray/ray_current_cluster
        # (left by an earlier `ray start`) names a dead head.
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)


def cmd_tune(args: argparse.Namespace) -> int:
    """Run `robustseg tune`: an Optuna sweep whose objective is the K-fold mean Dice."""
    from robustseg.tracking import resolve_tracking_uri
    from trainables.tune_driver import run_sweep

    cfg = load_config(args.config, args.overrides)
    check_config(cfg, args.config)  # as `train` does: a misspelt name fails here, not in every trial's worker
    init_ray(args.num_cpus)
    print(f"sweep {args.name or '(auto name)'}: space {args.space}, {args.trials} trials x {cfg.data.folds} folds, "
          f"concurrency {args.concurrency}{', ASHA' if args.scheduler else ''}{', resuming' if args.resume else ''}")
    res = run_sweep(cfg, space=args.space, trials=args.trials, concurrency=args.concurrency, scheduler=args.scheduler,
                    resume=args.resume, storage_path=args.storage, sweep_name=args.name, mlflow=True, seed=args.seed)
    print_table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in res.table])
    print(f"best cross-validated Dice {res.best_cv_dice:.4f} (per fold {', '.join(f'{d:.3f}' for d in res.per_fold)})")
    print(f"best config: {res.path}/best_config.yaml")
    if not res.complete:
        print(f"the sweep was interrupted: continue it with --resume --name {res.name}")
    print(f"look at the runs: mlflow ui --backend-store-uri {resolve_tracking_uri(cfg)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Run `robustseg report`: a self-contained HTML report of a sweep."""
    from robustseg.report import write_report
    from robustseg.tracking import require_store, resolve_tracking_uri

    cfg = load_config(args.config, [])
    # A report only reads: a missing store is an error naming it, never an empty new one.
    uri = require_store(args.tracking_uri or resolve_tracking_uri(cfg))
    out = write_report(uri, args.sweep, args.out)
    print(f"report written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end demo on synthetic data (extended by later layers)."""
    from robustseg.demo import run_demo

    return run_demo(workdir=args.workdir, subjects=args.subjects, progress=_progress, trials=args.trials,
                    sweep=not args.no_sweep)


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `robustseg` command."""
    p = argparse.ArgumentParser(
        prog="robustseg",
        description="Robust medical image segmentation from small data: prepare, train, search, serve.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pr = sub.add_parser(
        "prepare", help="preprocess sources into Parquet shards + manifest",
        description="Read sources, validate, split into subject-grouped folds, preprocess with a plan, and write "
                    "Parquet shards and a manifest to a local folder, file:// or s3:// URI. Every run commits a new "
                    "snapshot atomically (a kill leaves the old one or the new one, whole); re-runs reuse unchanged shards.",
        epilog="examples:\n  robustseg prepare --source acdc_h5:../shared/data/acdc_h5 --out robustseg_work/acdc --plan cmr\n"
               "  robustseg prepare --source 'synthetic_cmr:?n_subjects=6' --out s3://bucket/syn data.cmr.crop_size=[128,128]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pr.add_argument("--source", action="append", metavar="NAME:PATH[?k=v&...]",
                    help="a registered source and its path, options after '?' (repeatable; `robustseg sources` lists them)")
    pr.add_argument("--out", metavar="URI", help="output store: local path, file:///abs or s3://bucket/prefix")
    pr.add_argument("--plan", choices=("cmr", "ct", "slices2d"), help="preprocessing plan (default cmr)")
    pr.add_argument("--config", metavar="YAML", help="experiment config; its data section is used")
    pr.add_argument("--folds", type=int, help="number of subject-grouped folds (default 5)")
    pr.add_argument("--seed", type=int, help="fold assignment seed (default 0)")
    pr.add_argument("--label-budget", type=int, metavar="N", help="keep training labels of only N subjects")
    pr.add_argument("--force", "--overwrite", dest="force", action="store_true",
                    help="replace a dataset prepared with other sources, plan or folds (the old snapshot stays "
                         "readable until the new one commits)")
    pr.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. data.cmr.crop_size=[224,224]")
    pr.set_defaults(fn=cmd_prepare)

    ins = sub.add_parser("inspect", help="summarise a prepared store")
    ins.add_argument("uri", help="store URI (local path, file:// or s3://)")
    ins.add_argument("--cases", action="store_true", help="list every case")
    ins.add_argument("--verify", action="store_true",
                     help="read every shard and check its size, SHA-256 and layout against the manifest "
                          "(default: presence and size only); exit 1 if any disagrees")
    ins.set_defaults(fn=cmd_inspect)

    src = sub.add_parser("sources", help="list registered data sources")
    src.set_defaults(fn=cmd_sources)

    cf = sub.add_parser("config", help="show, explain or validate an experiment config")
    cf.add_argument("action", choices=("show", "explain", "validate"))
    cf.add_argument("--config", metavar="YAML")
    cf.add_argument("overrides", nargs="*", metavar="key.path=value")
    cf.set_defaults(fn=cmd_config)

    tr = sub.add_parser(
        "train", help="train one model on one fold (plain process, no Ray)",
        description="Train the configured backbone and regime on prepared shards (prepared on the fly from "
                    "data.sources if the store is empty). Resumes from <out>/last.pt unless --no-resume.",
        epilog="example:\n  robustseg train --config configs/acdc_unet2d.yaml optim.epochs=20 --fold 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("--config", metavar="YAML", required=True, help="experiment config")
    tr.add_argument("--fold", type=int, help="validation fold (data.val_fold)")
    tr.add_argument("--out", metavar="DIR", help="checkpoint folder (default <workdir>/runs/<name>/fold<k>)")
    tr.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    tr.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    tr.add_argument("overrides", nargs="*", metavar="key.path=value")
    tr.set_defaults(fn=cmd_train)

    pd = sub.add_parser("predict", help="segment NIfTI/h5 volumes or 2D pictures with a checkpoint, an ensemble or "
                                        "an endpoint",
                        description="Masks are written as <stem>_seg.nii.gz in each input's geometry; 2D pictures "
                                    "(PNG/JPEG slices, e.g. COVID-SemiSeg) get <stem>_seg.png in their size, 0/255 "
                                    "for binary tasks.")
    pd.add_argument("--model", metavar="CHECKPOINT|URI",
                    help="best.pt from `robustseg train`, an ensemble folder, or models:/robustseg-cmr@champion")
    pd.add_argument("--endpoint", metavar="URL", help="send the volumes to a `robustseg serve` endpoint instead")
    pd.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ URIs (default $MLFLOW_TRACKING_URI, "
                                           "else robustseg_work/mlflow.db)")
    pd.add_argument("--input", required=True, metavar="PATH", help="a volume or picture file, or a folder of them")
    pd.add_argument("--output", required=True, metavar="DIR", help="folder for the masks (created if missing)")
    pd.add_argument("--device", choices=("cpu", "cuda"))
    pd.add_argument("--no-tta", action="store_true", help="skip mirror test-time augmentation")
    pd.add_argument("--full-fov", action="store_true", default=None,
                    help="one sliding window over the whole field of view. Default: the checkpoint decides "
                         "(patch-trained models locate the heart and segment a box around it; crop-trained "
                         "models crop around the heart, re-centring if the prediction touches the crop's edge)")
    pd.add_argument("--force", action="store_true",
                    help="also segment inputs that look like label maps (named *_gt, *_seg, *_label, *_mask, or "
                         "holding only the values 0-3); by default they are skipped with a notice")
    pd.add_argument("--fail-fast", action="store_true",
                    help="stop at the first input that fails (default: write every good mask, list the failures "
                         "at the end and exit with status 2)")
    pd.set_defaults(fn=cmd_predict)

    from robustseg.ensemble_cli import add_parsers
    from robustseg.pseudo_cli import add_parser as add_pseudo_parser
    from robustseg.analysis_cli import add_parser as add_analysis_parser
    from robustseg.robustness_cli import add_parser as add_robustness_parser
    from robustseg.serve_cli import add_serve_parser

    add_parsers(sub)
    add_serve_parser(sub)
    add_robustness_parser(sub)
    add_analysis_parser(sub)
    add_pseudo_parser(sub)

    tu = sub.add_parser(
        "tune", help="Optuna sweep over hyperparameters, objective = K-fold cross-validated Dice (Ray Tune)",
        description="Each trial trains one model per subject-grouped fold (Ray Train runs, in parallel when "
                    "resources allow) and reports the mean validation Dice. Runs are tracked in MLflow.",
        epilog="example:\n  robustseg tune --config configs/acdc_unet2d.yaml --space unet2d --trials 8 --concurrency 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tu.add_argument("--config", metavar="YAML", required=True)
    tu.add_argument("--space", required=True, help="registered search space (backbone or regime name)")
    tu.add_argument("--trials", type=int, default=8)
    tu.add_argument("--concurrency", type=int, default=1, help="trials at once")
    tu.add_argument("--scheduler", choices=("asha",), help="early-stop poor trials after their first folds")
    tu.add_argument("--name", help="sweep name (needed to --resume)")
    tu.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same --name")
    tu.add_argument("--storage", metavar="PATH_OR_URI", help="Ray storage (default <workdir>/ray_results)")
    tu.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    tu.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default max(4, cores))")
    tu.add_argument("overrides", nargs="*", metavar="key.path=value")
    tu.set_defaults(fn=cmd_tune)

    rp = sub.add_parser("report", help="self-contained HTML report of a sweep from MLflow")
    rp.add_argument("--sweep", required=True, metavar="NAME_OR_RUN_ID")
    rp.add_argument("--out", default="robustseg_report.html")
    rp.add_argument("--config", metavar="YAML", help="config whose tracking section locates MLflow")
    rp.add_argument("--tracking-uri", help="MLflow tracking URI (overrides the config)")
    rp.set_defaults(fn=cmd_report)

    ev = sub.add_parser("evaluate", help="Dice/HD95 of predicted masks against ground truth",
                        description="Pairs <stem>_seg.nii.gz predictions with <stem>_gt / -label / _label / <stem> "
                                    "ground truth (NIfTI or ACDC h5), checks grids, writes metrics.csv, summary.json, dice.png. "
                                    "Every ground-truth case needs a prediction (see --allow-missing).")
    ev.add_argument("--pred", required=True, metavar="DIR")
    ev.add_argument("--gt", required=True, metavar="DIR")
    ev.add_argument("--convention", default="auto",
                    help="ground-truth label convention (acdc, mnms, cmrxmotion, canonical_cardiac, lung_binary, ...); "
                         "auto: acdc for .h5, canonical otherwise")
    ev.add_argument("--task", default="cardiac", choices=("cardiac", "lung_binary", "lung_multiclass"))
    ev.add_argument("--out", metavar="DIR", help="where the CSV/JSON/plot go (default: the prediction folder)")
    ev.add_argument("--allow-missing", action="store_true",
                    help="score ground-truth cases that have no prediction as empty masks (Dice 0) instead of "
                         "failing; the summary lists them")
    ev.set_defaults(fn=cmd_evaluate)

    de = sub.add_parser("demo", help="end-to-end demo on synthetic data")
    de.add_argument("--workdir", default="robustseg_work/demo", help="where the demo writes (default robustseg_work/demo)")
    de.add_argument("--subjects", type=int, default=8, help="synthetic subjects (default 8)")
    de.add_argument("--trials", type=int, default=4, help="Optuna trials of the demo sweep (default 4)")
    de.add_argument("--no-sweep", action="store_true", help="only prepare the data (no Ray)")
    de.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except RobustsegError as e:
        print(f"robustseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
