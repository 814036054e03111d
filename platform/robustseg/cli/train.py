"""`robustseg train`, `tune` and `report`: one model, a sweep, and a sweep's report."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict

from robustseg.cli.common import load_config, print_table, progress_bar, resolve_device


def cmd_train(args: argparse.Namespace) -> int:
    """Run `robustseg train` (one model, one fold, plain process)."""
    from robustseg.engine.plots import plot_history
    from robustseg.engine.train import train_from_config

    overrides = list(args.overrides)
    if args.fold is not None:
        overrides.append(f"data.val_fold={args.fold}")
    cfg = load_config(args.config, overrides)
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
    result = train_from_config(cfg, out_dir=out, device=resolve_device(args.device), resume=not args.no_resume,
                               callbacks=[report], progress=progress_bar)
    if result.last_checkpoint is not None:
        curve = plot_history(result.history, result.last_checkpoint.parent / "learning_curve.png")
        print(f"learning curve: {curve}")
    score = "Dice" if any("val_dice" in h for h in result.history) else "score"
    print(f"done in {time.perf_counter() - t0:.1f} s: best validation {score} {result.best_score:.4f} at epoch "
          f"{result.best_epoch}{' (early stop)' if result.stopped_early else ''}; best checkpoint {result.best_checkpoint}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Run `robustseg tune`: an Optuna sweep whose objective is the K-fold mean Dice."""
    from robustseg.tracking import resolve_tracking_uri
    from trainables.tune_driver import run_sweep

    cfg = load_config(args.config, args.overrides)
    from trainables.ray_session import init_ray

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
    from robustseg.sweep_report import write_report
    from robustseg.tracking import require_store, resolve_tracking_uri

    cfg = load_config(args.config, [])
    # A report only reads: a missing store is an error naming it, never an empty new one.
    uri = require_store(args.tracking_uri or resolve_tracking_uri(cfg))
    out = write_report(uri, args.sweep, args.out)
    print(f"report written to {out}")
    return 0


def register(sub: Any) -> None:
    """Add ``train``, ``tune`` and ``report``."""
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
    tu.add_argument("--storage", metavar="PATH_OR_URI",
                    help="durable storage for Ray results and sweep files: overrides tracking.storage_uri "
                         "(default: $ROBUSTSEG_STORAGE_URI, else <workdir>/ray_results)")
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
