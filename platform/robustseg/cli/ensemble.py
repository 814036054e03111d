"""`robustseg ensemble` and `robustseg registry`, and prediction with an ensemble URI.

Registered by `robustseg.cli` (`register`). Prediction with an ensemble URI is in the library:
`robustseg.ensemble.predict`.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from robustseg.config import ExperimentConfig
from robustseg.errors import ConfigError


def _base_config(path: Optional[str]) -> ExperimentConfig:
    return ExperimentConfig.from_yaml(path) if path else ExperimentConfig(name="robustseg")


def tracking_uri_from_args(args: argparse.Namespace) -> str:
    """``--tracking-uri``, else the store of ``--config`` (if the command has one), else the default."""
    from robustseg.tracking_store import resolve_tracking_uri

    return args.tracking_uri or resolve_tracking_uri(_base_config(getattr(args, "config", None)))


def _weights(text: Optional[str]) -> Optional[Dict[str, float]]:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--weights: expected backbone=number pairs, got {part!r}") from None
    return out


def ensemble_from_checkpoints(args: argparse.Namespace) -> int:
    """`robustseg ensemble --checkpoints`: any trained models -> an ensemble folder, optionally registered.

    For models that did not come from one sweep (e.g. an ablation's rows, or the best model
    of a label-budget grid): no out-of-fold selection, the members are taken as given.
    """
    from robustseg.cli.common import resolve_device
    from robustseg.ensemble import Ensemble

    if not args.out:
        raise ConfigError("ensemble --checkpoints needs --out FOLDER")
    ens = Ensemble.from_checkpoints(args.checkpoints, name=args.name, device=resolve_device(args.device),
                                    combine=args.combine, centring=args.centring,
                                    **({} if args.tta is None else {"tta": args.tta}))
    folder = ens.save(args.out)
    print(f"ensemble folder: {folder} ({len(ens.spec.members)} members: "
          f"{', '.join(m.name for m in ens.spec.members)}; task {ens.spec.task})")
    if args.no_tracking or args.no_register:
        return 0
    from robustseg.ensemble import registry as reg
    from robustseg.tracking_runs import analysis_run

    uri = tracking_uri_from_args(args)
    members = {f"member.{m.name}": m.source for m in ens.spec.members}
    with analysis_run(uri, "ensembles", f"{args.name}-from-checkpoints", "ensemble", params=members) as (_, run_id):
        model_uri = reg.log_ensemble(ens, tracking_uri=uri, run_id=run_id)
    version = reg.register_ensemble(model_uri, tracking_uri=uri, name=args.name, alias=args.alias,
                                    spec=ens.spec.to_dict(), tags={"run_id": run_id})
    print(f"registered {args.name} version {version} as models:/{args.name}@{args.alias}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """Run `robustseg ensemble`."""
    from robustseg.cli.common import progress_bar, resolve_device
    from trainables.ensemble_build import build_ensemble

    if args.checkpoints:
        return ensemble_from_checkpoints(args)
    if not args.sweep:
        raise ConfigError("ensemble needs --sweep (a sweep's fold models) or --checkpoints (given models)")
    cfg = _base_config(args.config)
    backbones = [b.strip() for b in args.backbones.split(",")] if args.backbones else None
    locators = [b.strip() for b in args.locators.split(",")] if args.locators else None
    build = build_ensemble(
        args.sweep, storage_path=args.storage_path, cfg=cfg,
        backbones=backbones, folds=args.folds, combine=args.combine, weights=_weights(args.weights),
        tta=args.tta, centring=args.centring, locators=locators, select=args.select,
        register=None if args.no_register else args.name, alias=args.alias, tracking=not args.no_tracking,
        tracking_uri=tracking_uri_from_args(args), device=resolve_device(args.device), max_oof_cases=args.max_oof_cases,
        progress=progress_bar)
    print_ensemble_summary(build)
    return 0


def print_ensemble_summary(build: Any) -> None:
    """Chosen trials, the out-of-fold comparison, and where the model went."""
    from robustseg.cli.common import print_table

    spec = build.ensemble.spec
    print("candidates: " + ", ".join(f"{c.backbone} ({c.trial}, cv Dice {c.cv_dice:.3f}, {c.status.lower()})"
                                     for c in build.choices))
    keys = ["model", "n"] + [k for k in build.summary[0] if k.startswith("dice_")] + ["hd95_mean"]
    print_table([{k: (f"{r[k]:.3f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in keys}
                 for r in build.summary])
    print(selection_line(spec))
    stored = getattr(build, "stored", "")
    print(f"ensemble folder: {build.folder}" + (f" (stored at {stored})" if stored and stored != str(build.folder) else ""))
    if build.model_uri:
        print(f"MLflow run {build.run_id}; model {build.model_uri}")
    if build.version:
        print(f"registered {build.ensemble.spec.name} version {build.version} "
              f"(see: robustseg registry list --name {build.ensemble.spec.name})")


def selection_line(spec: Any) -> str:
    """One line naming what was selected and how it scored out of fold.

    One backbone's folds are called a fold ensemble of that backbone (its out-of-fold Dice is
    the backbone's own, so it is not compared with itself as if architectures were combined).
    """
    m = spec.metrics
    dice, single = float(m["oof_dice_ensemble"]), float(m["oof_dice_best_single"])
    if len(spec.backbones) == 1:
        candidates = [t.split("=", 1)[0] for t in spec.provenance.get("trials", "").split(",") if t]
        why = ("the only candidate backbone" if len(candidates) <= 1 else
               f"the best of {', '.join(candidates)}; no combination of architectures scored higher")
        return (f"selected: {spec.composition()}, {len(spec.members)} members; out-of-fold Dice {dice:.3f} "
                f"({why})")
    return (f"selected: {spec.composition()}; out-of-fold Dice {dice:.3f} vs best single architecture "
            f"{single:.3f}")


def cmd_registry(args: argparse.Namespace) -> int:
    """Run `robustseg registry list|promote|rollback`."""
    from robustseg.ensemble import registry as reg
    from robustseg.cli.common import print_table

    uri = tracking_uri_from_args(args)
    if args.action == "list":
        rows = reg.list_versions(args.name, uri)
        print_table(rows)
        return 0
    if args.action == "promote":
        if not args.version:
            raise ConfigError("registry promote needs --version N")
        before = reg.promote(args.name, args.version, alias=args.alias, tracking_uri=uri)
        print(f"{args.name}@{args.alias} -> version {args.version} (was {before or 'unset'})")
        return 0
    target = reg.rollback(args.name, alias=args.alias, tracking_uri=uri)
    print(f"{args.name}@{args.alias} rolled back to version {target}")
    return 0


def register(sub: Any) -> None:
    """Add the ``ensemble`` and ``registry`` subcommands."""
    from robustseg.ensemble.registry import DEFAULT_ALIAS, DEFAULT_NAME

    en = sub.add_parser(
        "ensemble", help="build, evaluate (out of fold), log and register the fold-by-architecture ensemble of a sweep",
        description="Takes the best configuration per backbone from a sweep, reuses (or trains) its K fold models, "
                    "compares every architecture with the ensemble on the same out-of-fold cases, logs the comparison "
                    "and the ensemble (MLflow pyfunc) and registers it with an alias.",
        epilog="example:\n  robustseg ensemble --sweep demo --config configs/demo_synthetic.yaml\n"
               "  robustseg ensemble --sweep <mlflow sweep run id> --backbones unet2d,swin_unetr --folds 5\n"
               "  robustseg ensemble --checkpoints a/best.pt b/best.pt --out ens/ --name robustseg-covid",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    en.add_argument("--sweep", help="sweep name, sweep folder, or its MLflow run id")
    en.add_argument("--checkpoints", nargs="+", metavar="BEST_PT",
                    help="instead of --sweep: these trained models as members (no out-of-fold selection)")
    en.add_argument("--out", metavar="FOLDER", help="with --checkpoints: where the ensemble folder goes")
    en.add_argument("--config", metavar="YAML", help="the sweep's experiment config (workdir, tracking)")
    en.add_argument("--storage-path", metavar="PATH_OR_URI",
                    help="durable storage of the sweep: overrides tracking.storage_uri (default: "
                         "$ROBUSTSEG_STORAGE_URI, else <workdir>/ray_results)")
    en.add_argument("--backbones", help="comma-separated backbones (default: all in the sweep)")
    en.add_argument("--folds", type=int, help="use the first N folds (default: all of the sweep's)")
    en.add_argument("--combine", choices=("mean", "vote"), default="mean", help="softmax mean or majority vote")
    en.add_argument("--weights", help="per-backbone weights, e.g. unet2d=2,swin_unetr=1")
    en.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="mirror TTA (default: config)")
    en.add_argument("--centring", choices=("two_stage", "image"), default="two_stage",
                    help="crop centre: first-stage prediction (default) or image centre")
    en.add_argument("--locators", help="backbones used for the first-stage centring (default: all)")
    en.add_argument("--select", choices=("best", "all"), default="best",
                    help="best: the backbone combination with the best out-of-fold Dice (default); all: every backbone")
    en.add_argument("--name", default=DEFAULT_NAME, help=f"registered model name (default {DEFAULT_NAME})")
    en.add_argument("--alias", default=DEFAULT_ALIAS, help=f"alias for the new version (default {DEFAULT_ALIAS})")
    en.add_argument("--no-register", action="store_true", help="log the model but do not register it")
    en.add_argument("--no-tracking", action="store_true", help="build and evaluate only (no MLflow)")
    en.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    en.add_argument("--max-oof-cases", type=int, help="most out-of-fold cases per fold")
    en.add_argument("--device", choices=("cpu", "cuda"))
    en.set_defaults(fn=cmd_ensemble)

    rg = sub.add_parser("registry", help="list registered ensemble versions, promote one to an alias, roll back",
                        epilog="examples:\n  robustseg registry list\n  robustseg registry promote --version 3\n"
                               "  robustseg registry rollback", formatter_class=argparse.RawDescriptionHelpFormatter)
    rg.add_argument("action", choices=("list", "promote", "rollback"))
    rg.add_argument("--name", default=DEFAULT_NAME)
    rg.add_argument("--version", help="version to promote")
    rg.add_argument("--alias", default=DEFAULT_ALIAS)
    rg.add_argument("--config", metavar="YAML", help="experiment config naming the tracking server")
    rg.add_argument("--tracking-uri", help="MLflow tracking URI")
    rg.set_defaults(fn=cmd_registry)


__all__ = ["register", "cmd_ensemble", "cmd_registry", "selection_line", "tracking_uri_from_args"]
