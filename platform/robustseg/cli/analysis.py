"""`robustseg analyze svcca`: how each layer converges over training, and how two models differ.

Registered by `robustseg.cli` (`register`). What runs, probes and layers mean, and the
analysis itself: `robustseg.analysis.svcca_runs` and `robustseg.analysis.svcca`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from robustseg.analysis.svcca_runs import (SVCCAJob, curve_table, log_to_mlflow, pair_table, resolve_run,
                                           run_svcca)
from robustseg.errors import ConfigError
from robustseg.tracking_runs import add_run_arguments


def cmd_svcca(args: argparse.Namespace) -> int:
    """Run `robustseg analyze svcca`."""
    from robustseg.analysis.svcca_math import SVCCAOptions
    from robustseg.analysis.svcca_outputs import write_outputs
    from robustseg.cli.common import print_table, progress_bar, resolve_device
    from robustseg.tracking_runs import cli_tracking_uri

    opts = SVCCAOptions(keep=args.keep, max_points=args.max_points, max_grid=args.max_grid, seed=args.seed)
    job = SVCCAJob([resolve_run(r) for r in args.runs], layers=args.layers, probe=args.probe, fold=args.fold,
                   max_slices=args.max_slices, batch_size=args.batch_size, device=resolve_device(args.device))
    labels = [r.label for r in job.runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--runs: two runs named {labels[0]!r}; name them NAME=PATH")
    for r in job.runs:
        print(f"svcca: {r.label}: converged model {r.reference}, {len(r.timeline)} checkpoint(s) over training",
              flush=True)
    t0 = time.perf_counter()
    curves, pair, info = run_svcca(job, opts, progress=progress_bar)
    out = Path(args.out or Path("robustseg_work") / "analysis" / "svcca" / time.strftime("%Y%m%d-%H%M%S"))
    files = write_outputs(curves, pair, out, info)
    for c in curves:
        print(f"\n{c.run}: SVCCA similarity to the converged model (epoch {c.reference_epoch})")
        print_table(curve_table(c))
        if c.underdetermined:
            print(f"  note: too few datapoints for the kept directions in {', '.join(c.underdetermined)} "
                  "(values biased towards 1): probe more slices (--max-slices) or raise --max-points")
    if pair is not None:
        print(f"\n{pair.label_a} vs {pair.label_b}: converged models, layer by layer")
        print_table(pair_table(pair))
    print(f"\ndone in {time.perf_counter() - t0:.1f} s on {info['probe']['n']} probe image(s) of "
          f"{info['probe']['store']} fold {info['probe']['fold']}; " + ", ".join(f"{k} {v}" for k, v in files.items()))
    if not args.no_tracking:
        tracking_uri = cli_tracking_uri(args)
        params = {**{f"run.{label}": r["path"] for label, r in info["runs"].items()},
                  "probe": info["probe"]["store"], "fold": info["probe"]["fold"], "probe_images": info["probe"]["n"],
                  "keep": opts.keep, "max_points": opts.max_points, "max_grid": opts.max_grid, "seed": opts.seed,
                  "layers": "default" if not args.layers else ",".join(args.layers)}
        run_id = log_to_mlflow(curves, pair, files, tracking_uri=tracking_uri, experiment=args.experiment,
                               run_name=args.run_name or f"svcca-{'+'.join(labels)}"[:250], params=params)
        print(f"MLflow run {run_id} ({tracking_uri}, experiment {args.experiment})")
    return 0


def register(sub: Any) -> None:
    """Add ``analyze`` (with its ``svcca`` analysis) to the `robustseg` parser's subparsers."""
    an = sub.add_parser("analyze", help="analyses of trained models (svcca: layer similarity over training / "
                                        "between models)",
                        description="Analyses of trained models. Run `robustseg analyze ANALYSIS --help`.")
    kinds = an.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    p = kinds.add_parser(
        "svcca", help="SVCCA similarity of layers: each checkpoint vs the converged model, and model A vs model B",
        description="Singular Vector CCA (Raghu et al. 2017). For a run folder, every snapshot (snapshots/"
                    "epoch_*.pt, from optim.snapshot_every) and last.pt is compared layer by layer with the converged "
                    "model (best.pt, else last.pt) on a fixed probe set: how each layer converges. For two runs (e.g. "
                    "from scratch vs fine-tuned) the converged models are also compared layer i against layer j "
                    "(heatmap). Writes svcca.json, svcca_training.png and svcca_heatmap.png, prints a table, and logs "
                    "one MLflow run (experiment 'analysis', metrics svcca_<layer>).",
        epilog="examples:\n"
               "  robustseg analyze svcca --runs robustseg_work/runs/lung_scratch/fold0\n"
               "  robustseg analyze svcca --runs scratch=runs/lung_scratch/fold0 finetuned=runs/lung_ft/fold0 \\\n"
               "      --probe robustseg_work/lung --fold 0 --max-slices 64\n"
               "  robustseg analyze svcca --runs a/best.pt b/best.pt --layers net.input_block net.bottleneck",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="[NAME=]PATH",
                   help="one or two run folders (.../runs/<name>/fold0) or checkpoint files")
    p.add_argument("--layers", nargs="+", metavar="MODULE",
                   help="model.named_modules() names to compare (default: the backbone's top-level blocks in "
                        "forward order)")
    p.add_argument("--probe", metavar="STORE", help="prepared store of the probe slices (default: the first run's "
                                                    "data.shards_uri)")
    p.add_argument("--fold", type=int, default=0, help="fold of the store to probe with (default 0)")
    p.add_argument("--max-slices", type=int, default=32, metavar="N", help="probe slices (default 32)")
    p.add_argument("--keep", type=float, default=0.99, help="variance kept by the SV step (default 0.99)")
    p.add_argument("--max-points", type=int, default=8192, metavar="N",
                   help="datapoints (image positions) per comparison, a fixed random subset (default 8192)")
    p.add_argument("--max-grid", type=int, default=32, metavar="N",
                   help="feature maps are average-pooled to at most N positions per axis (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the datapoint subset (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="probe images per forward pass (default 8)")
    p.add_argument("--out", metavar="DIR", help="output folder (default robustseg_work/analysis/svcca/<timestamp>)")
    add_run_arguments(p, experiment="analysis", run_name="svcca-<runs>")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.set_defaults(fn=cmd_svcca)


__all__ = ["cmd_svcca", "register"]
