"""`robustseg pseudo-label`: cosine-similarity pseudo labels for unlabelled slices (thesis Ch. 5.3.4).

Registered by `robustseg.cli` (`register`). The method lives in
`robustseg.engine.pseudo_labels`; this module parses options, prints the counts and records
an MLflow run (experiment ``pseudo_labels``, ``robustseg.role=pseudo_labels``) with the
similarity histogram and the summary. The ``.pt`` file itself is not uploaded (hundreds of
MB for a full MosMed-sized pool); the run records its path.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

from robustseg.errors import ConfigError
from robustseg.tracking_runs import add_run_arguments

ROLE = "pseudo_labels"
_METRICS = ("unlabelled_cases", "unlabelled_slices", "unlabelled_boxes", "skipped_slices", "labelled_boxes",
            "dictionary", "patches", "kept", "too_similar", "too_dissimilar")


def parse_window(text: str) -> List[float]:
    """``"0.87,0.96"`` -> ``[0.87, 0.96]``.

    Raises:
        ConfigError: not two comma-separated numbers.
    """
    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--window: expected LOW,HIGH cosine similarities (e.g. 0.87,0.96), got {text!r}") from None
    return [low, high]


def run_metrics(summary: Mapping[str, Any]) -> Dict[str, float]:
    """Counts, the kept fraction and the similarity statistics of a summary, as MLflow metrics."""
    counts = summary["counts"]
    out = {k: float(counts[k]) for k in _METRICS}
    out["kept_fraction"] = counts["kept"] / counts["patches"] if counts["patches"] else 0.0
    out.update({f"similarity_{k}": float(v) for k, v in summary["similarity"].items() if v is not None})
    return out


def log_to_mlflow(summary: Mapping[str, Any], files: Mapping[str, Path], *, tracking_uri: str,
                  experiment: str = "pseudo_labels", run_name: str = "pseudo-labels") -> str:
    """Record one pseudo-labelling run: params, `run_metrics`, histogram and summary under ``pseudo_labels/``.

    Uses an `MlflowClient` bound to ``tracking_uri`` (`robustseg.tracking.analysis_run`), so
    later runs of this process keep their own store. A new local experiment keeps its artifacts
    beside a SQLite database. A failure marks the run FAILED.

    Returns:
        The run id.
    """
    from robustseg.tracking_runs import analysis_run, log_metrics_batched

    params = {f"pl.{k}": v for k, v in summary["params"].items()}
    params.update({k: summary[k] for k in ("checkpoint", "encoder", "feature_module", "store", "fold")})
    params["output"] = str(files["labels"])
    with analysis_run(tracking_uri, experiment, run_name, ROLE, params=params) as (client, run_id):
        log_metrics_batched(client, run_id, run_metrics(summary))
        for key in ("histogram", "summary"):
            client.log_artifact(run_id, str(files[key]), ROLE)
    return run_id


def _params(args: argparse.Namespace) -> Any:
    from robustseg.engine.pseudo_labels_pipeline import PseudoLabelParams

    given = {"patch_size": args.patch, "window": parse_window(args.window) if args.window else None,
             "fold": args.fold, "max_unlabelled_cases": args.max_unlabelled, "dictionary_size": args.dictionary_size,
             "per_case": args.per_case, "feature_module": args.feature_module, "encoder": args.encoder,
             "seed": args.seed}
    return PseudoLabelParams(**{k: v for k, v in given.items() if v is not None})


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    """Run `robustseg pseudo-label`."""
    from robustseg.cli.common import progress_bar, resolve_device
    from robustseg.engine.pseudo_labels_files import write_outputs
    from robustseg.engine.pseudo_labels_pipeline import generate_pseudo_labels
    from robustseg.tracking_runs import cli_tracking_uri

    params = _params(args)
    t0 = time.perf_counter()
    result = generate_pseudo_labels(args.model, args.data, params, device=resolve_device(args.device), progress=progress_bar)
    files = write_outputs(result, args.out)
    c, s = result.summary["counts"], result.summary["similarity"]
    low, high = params.window
    print(f"pseudo-label: fold {result.summary['fold']} left out; dictionary {c['dictionary']} patches from "
          f"{c['labelled_boxes']} labelled slices ({c['skipped_labelled_slices']} without foreground)")
    print(f"  {c['unlabelled_cases']} unlabelled case(s), {c['unlabelled_slices']} slices: {c['unlabelled_boxes']} "
          f"boxes, {c['skipped_slices']} skipped (no predicted foreground)")
    print(f"  {c['patches']} patches: kept {c['kept']} in [{low:g}, {high:g}], too similar {c['too_similar']}, "
          f"too dissimilar {c['too_dissimilar']}" + (f" (median best similarity {s['median']:.3f})" if s["median"]
                                                     is not None else ""))
    if not c["kept"]:
        print("  warning: no patch in the window: the file holds no pseudo labels (see the histogram to move "
              "--window)")
    print(f"done in {time.perf_counter() - t0:.1f} s: {files['labels']}, histogram {files['histogram']}, "
          f"summary {files['summary']}")
    if not args.no_tracking:
        tracking_uri = cli_tracking_uri(args)
        run_id = log_to_mlflow(result.summary, files, tracking_uri=tracking_uri, experiment=args.experiment,
                               run_name=args.run_name or f"pseudo-labels-fold{result.summary['fold']}")
        print(f"MLflow run {run_id} ({tracking_uri}, experiment {args.experiment})")
    return 0


def register(sub: Any) -> None:
    """Add the ``pseudo-label`` subcommand to the `robustseg` parser's subparsers."""
    p = sub.add_parser(
        "pseudo-label", help="soft pseudo labels for unlabelled slices by encoder cosine similarity (thesis Ch. 5.3.4)",
        description="A coarse model boxes its predicted foreground on every unlabelled slice of the store (+15 px); "
                    "patches from those boxes are encoded by the model's encoder (global average pooling) and "
                    "compared with a dictionary of labelled patches from ground-truth boxes (+10 px). Patches whose "
                    "best cosine similarity is in --window get a soft mask mixing their top-2 dictionary labels. "
                    "Writes FILE (for regime.params.pseudo_labels), FILE's _similarity.png and _summary.json, and "
                    "logs an MLflow run.",
        epilog="example:\n"
               "  robustseg pseudo-label --model runs/lung/fold0/best.pt --data robustseg_work/lung --fold 0 \\\n"
               "      --out robustseg_work/pseudo/fold0.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="CKPT", help="coarse model checkpoint (best.pt) of this store")
    p.add_argument("--data", required=True, metavar="STORE", help="prepared store (or its manifest.json)")
    p.add_argument("--fold", type=int, metavar="K",
                   help="validation fold to leave out entirely (default: the checkpoint's data.val_fold)")
    p.add_argument("--window", metavar="LOW,HIGH", help="kept best-similarity window (default 0.87,0.96)")
    p.add_argument("--patch", type=int, metavar="P", help="patch side in pixels (default 68)")
    p.add_argument("--dictionary-size", type=int, metavar="N", help="labelled patches (default 120)")
    p.add_argument("--per-case", type=int, metavar="N", help="patches per unlabelled case (default 32)")
    p.add_argument("--max-unlabelled", type=int, metavar="N", help="at most N unlabelled cases (quick runs)")
    p.add_argument("--feature-module", metavar="NAME",
                   help="encoder module to pool (default: the backbone's deepest, e.g. net.bottleneck)")
    p.add_argument("--encoder", metavar="CKPT", help="2D checkpoint giving the features (default: --model)")
    p.add_argument("--seed", type=int, help="patch-position seed (default 0)")
    p.add_argument("--out", default="robustseg_work/pseudo_labels/pseudo_labels.pt", metavar="FILE",
                   help="output .pt (histogram and summary beside it)")
    add_run_arguments(p, experiment="pseudo_labels", run_name="pseudo-labels-fold<K>")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.set_defaults(fn=cmd_pseudo_label)


__all__ = ["register", "cmd_pseudo_label", "log_to_mlflow", "parse_window", "run_metrics"]
