"""`robustseg prepare`, `inspect`, `sources` and `config`: the data store and the config."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from robustseg.cli.common import human_bytes, load_config, parse_source, print_summary, print_table, progress_bar
from robustseg.config import explain


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
        summary = prepare(cfg.data, progress=progress_bar, overwrite=args.force)
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
        print(f"{args.config or '(defaults)'}: valid")
        return 0
    print(cfg.to_yaml(), end="")
    return 0


def register(sub: Any) -> None:
    """Add ``prepare``, ``inspect``, ``sources`` and ``config``."""
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
