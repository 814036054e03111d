"""`robustseg robustness`: Dice/HD95 per structure against simulated respiratory motion.

Registered by `robustseg.cli` (`register`). The analysis itself lives in
`robustseg.analysis.robustness`; the models and the evaluation cases are found by
`robustseg.analysis.robustness_cases`.

Where the evaluation cases come from. Motion is simulated on the *original* acquisition
grid (see `robustseg.analysis.robustness`), and a prepared store holds only preprocessed
(resampled, cropped, normalised) slices. So:

* ``--data STORE`` (a store URI, or its ``manifest.json``) chooses the cases: labelled,
  motion-free (``motion_level`` 0 or unknown: a scan that already moved would stack two
  motions), optionally of one held-out ``--fold``, the first ``--cases N`` in manifest order.
  Their original volumes are re-read from the sources the manifest records (``data.sources``
  of the prepare run), or from ``--source NAME:PATH`` when the data has moved; each must have
  the shape the manifest recorded.
* ``--source NAME:PATH`` alone evaluates the source's labelled, motion-free cases (the first
  ``--cases N``): an external test set. ``--fold`` needs ``--data`` (folds live in a manifest).

A fold is held out only for the models trained without it: an ensemble of fold models has
seen every fold, so its absolute Dice on ``--data`` is optimistic (the drop with the level is
still informative); score ensembles on an external ``--source``.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from robustseg.analysis.robustness_cases import load_eval_cases, load_segmenter, model_name
from robustseg.errors import ConfigError
from robustseg.tracking_runs import add_run_arguments

_NAMED = re.compile(r"^([\w.\-]+)=(.+)$")


def parse_levels(text: str) -> List[int]:
    """``"0,1,2,3"`` -> ``[0, 1, 2, 3]``.

    Raises:
        ConfigError: not a comma-separated list of levels 0-3.
    """
    from robustseg.analysis.robustness import check_levels

    try:
        return check_levels([int(p) for p in text.split(",") if p.strip()])
    except ValueError:
        raise ConfigError(f"--levels: expected comma-separated CMRxMotion levels 0-3, got {text!r}") from None


def parse_models(args: Sequence[str]) -> Dict[str, str]:
    """``[NAME=]URI`` arguments -> ``{name: uri}`` (names made unique)."""
    out: Dict[str, str] = {}
    for arg in args:
        m = _NAMED.match(arg)
        named = m is not None and not arg.startswith(("models:/", "runs:/"))
        name, uri = (m.group(1), m.group(2)) if named and m else (model_name(arg), arg)
        base, i = name, 2
        while name in out:
            name, i = f"{base}-{i}", i + 1
        out[name] = uri
    return out


def _fmt(v: Any) -> Any:
    return f"{v:.3f}" if isinstance(v, float) else v


def summary_table(summary: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Printable rows: model, level, n, Dice per structure, mean, drop, HD95 mean."""
    from robustseg.analysis.robustness import structures

    keys = ["model", "motion_level", "n"] + [f"dice_{s}" for s in structures(summary)] + [
        "dice_mean", "dice_mean_drop", "hd95_mean"]
    return [{k.replace("motion_level", "level"): _fmt(r.get(k, "")) for k in keys} for r in summary]


def _model_identity(uri: str) -> Any:
    """A model URI with its file's size and mtime: a checkpoint retrained in place is another model."""
    p = Path(uri)
    f = p / "spec.json" if p.is_dir() else p
    if f.is_file():
        st = f.stat()
        return [uri, st.st_size, st.st_mtime_ns]
    return uri


def open_journal(args: argparse.Namespace, models: Dict[str, str], data_info: Dict[str, Any]) -> Any:
    """The per-case journal under ``--out``: rows of an interrupted run with the same settings are reused.

    Args:
        args: Parsed ``robustness`` arguments (seed, phase axis, full FOV, out, restart).
        models: ``{name: uri}``.
        data_info: Where the cases came from (`load_eval_cases`).

    Returns:
        A `robustseg.analysis.robustness.RowJournal`.
    """
    from robustseg.analysis import robustness as rb

    settings = {"models": {n: _model_identity(u) for n, u in models.items()}, "seed": args.seed,
                "phase_axis": args.phase_axis, "full_fov": bool(args.full_fov),
                "data": {k: v for k, v in data_info.items() if k != "skipped_moving_cases"}}
    journal = rb.RowJournal(Path(args.out) / rb.JOURNAL, settings, restart=args.restart)
    if journal.rows:
        print(f"  resuming: {len(journal.rows)} row(s) already scored in {journal.path}", flush=True)
    elif journal.discarded:
        print(f"  {journal.path}: an earlier unfinished run with other settings{' (--restart)' if args.restart else ''}"
              " is discarded", flush=True)
    return journal


def cmd_robustness(args: argparse.Namespace) -> int:
    """Run `robustseg robustness`."""
    from robustseg.analysis import robustness as rb
    from robustseg.cli.common import print_table, progress_bar, resolve_device
    from robustseg.tracking_runs import cli_tracking_uri

    if not args.model:
        raise ConfigError("robustness needs at least one --model (checkpoint, ensemble folder or models:/ URI)")
    levels = parse_levels(args.levels)
    if args.phase_axis not in ("y", "x"):
        raise ConfigError(f"--phase-axis must be y or x, got {args.phase_axis!r}")
    phase_axis = -2 if args.phase_axis == "y" else -1
    models = parse_models(args.model)
    cases, data_info = load_eval_cases(args.data, args.source or (), args.fold, args.cases)
    # Also where models:/ URIs are looked up, so --no-tracking still loads registered models.
    tracking_uri = cli_tracking_uri(args)
    device = resolve_device(args.device)
    segmenters = {}
    for name, uri in models.items():
        segment, task = load_segmenter(uri, device=device, tracking_uri=tracking_uri, full_fov=args.full_fov)
        if task != cases[0].task:
            raise ConfigError(f"--model {uri}: segments {task!r} but the cases are {cases[0].task!r}")
        segmenters[name] = segment
    print(f"robustness: {len(models)} model(s) x {len(cases)} case(s) x levels {levels} "
          f"(seed {args.seed}, phase encoding along {args.phase_axis})", flush=True)
    if data_info.get("skipped_moving_cases"):
        print(f"  left out {data_info['skipped_moving_cases']} case(s) already graded with motion (level > 0)")
    t0 = time.perf_counter()
    journal = open_journal(args, models, data_info)
    try:
        rows = rb.evaluate_robustness(segmenters, cases, levels, args.seed, phase_axis=phase_axis,
                                      progress=progress_bar, journal=journal)
    except KeyboardInterrupt:
        print(f"robustseg robustness: interrupted; {len(journal.rows)} scored row(s) are saved in {journal.path}: "
              "re-run the same command to resume", file=sys.stderr)
        return 130
    summary = rb.summarise(rows)
    params = {"levels": ",".join(map(str, levels)), "seed": args.seed, "phase_axis": args.phase_axis,
              "n_cases": len(cases), **{k: v for k, v in data_info.items() if v is not None},
              **{f"model.{rb.metric_name(n)}": u for n, u in models.items()}}
    files = rb.write_outputs(rows, summary, args.out, {"models": models, "levels": levels, "seed": args.seed,
                                                       "phase_axis": args.phase_axis, **data_info,
                                                       "cases": [c.case_id for c in cases]})
    journal.remove()  # everything is in cases.csv now; a later run scores afresh
    print_table(summary_table(summary))
    unit = summary[0].get("hd95_unit", "")
    print(f"done in {time.perf_counter() - t0:.1f} s (HD95 in {unit}); per-case {files['cases']}, "
          f"summary {files['summary_json']}, plot {files['plot']}")
    if not args.no_tracking:
        run_id = rb.log_to_mlflow(rows, summary, tracking_uri=tracking_uri, experiment=args.experiment,
                                  run_name=args.run_name or f"robustness-{'+'.join(models)}"[:250], params=params,
                                  files=files)
        print(f"MLflow run {run_id} ({tracking_uri}, experiment {args.experiment})")
    return 0


def register(sub: Any) -> None:
    """Add the ``robustness`` subcommand to the `robustseg` parser's subparsers."""
    p = sub.add_parser(
        "robustness", help="Dice/HD95 per structure vs simulated respiratory motion (CMRxMotion levels 0-3)",
        description="Corrupt each evaluation volume on its original grid with k-space respiratory motion at each "
                    "level (deterministic per seed, case and level), segment it with every model through the "
                    "model's own preprocessing, and score it against the motion-free label. Writes cases.csv, "
                    "summary.csv/json and dice_vs_motion.png, and logs an MLflow run.",
        epilog="examples:\n"
               "  robustseg robustness --model runs/unet2d/fold0/best.pt --data robustseg_work/acdc --fold 0\n"
               "  robustseg robustness --model champion=models:/robustseg-cmr@champion --model old=ens/ \\\n"
               "      --source acdc_h5:../shared/data/acdc_h5 --cases 20 --levels 0,1,2,3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", metavar="[NAME=]URI",
                   help="checkpoint (best.pt), ensemble folder or models:/name@alias (repeatable: one curve each)")
    p.add_argument("--data", metavar="STORE", help="prepared store (or its manifest.json): which cases and folds")
    p.add_argument("--source", action="append", metavar="NAME:PATH[?k=v]",
                   help="original data (repeatable): instead of --data, or where --data's sources now live")
    p.add_argument("--fold", type=int, help="only this held-out fold of --data")
    p.add_argument("--cases", type=int, metavar="N", help="at most N cases")
    p.add_argument("--levels", default="0,1,2,3", help="motion levels, comma-separated (default 0,1,2,3)")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (default 0)")
    p.add_argument("--phase-axis", default="y", choices=("y", "x"),
                   help="phase-encoding axis of the volumes (default y)")
    p.add_argument("--out", default="robustseg_work/robustness", metavar="DIR",
                   help="output folder; per-case rows are saved there as they are scored, and a re-run of an "
                        "interrupted evaluation with the same settings resumes from them")
    p.add_argument("--restart", action="store_true", help="discard the rows of an interrupted run in --out")
    add_run_arguments(p, experiment="robustseg", run_name="robustness-<models>")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--full-fov", action="store_true", default=None,
                   help="checkpoints: one sliding window over the whole field of view (as predict --full-fov; "
                        "default: the checkpoint decides, as predict)")
    p.set_defaults(fn=cmd_robustness)


__all__ = ["register", "cmd_robustness", "load_eval_cases", "load_segmenter", "model_name", "parse_levels",
           "parse_models", "summary_table"]
