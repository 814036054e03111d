"""`robustseg robustness`: Dice/HD95 per structure against simulated respiratory motion.

Registered by `robustseg.cli` (`register`). The analysis itself lives in
`robustseg.analysis.robustness`; this module finds the models and the evaluation cases.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

from robustseg.errors import ConfigError, DataError
from robustseg.tracking import add_run_arguments

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


def model_name(uri: str) -> str:
    """Default display name of a ``--model``: checkpoint folder, ensemble folder, or ``name@alias``."""
    if uri.startswith(("models:/", "runs:/")):
        return uri.split(":/", 1)[1].strip("/")
    p = Path(uri)
    if p.suffix == ".pt":
        return p.parent.name if p.stem in ("best", "last") and p.parent.name else p.stem
    return p.name or str(p)


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


def load_segmenter(uri: str, *, device: Any = None, tracking_uri: Optional[str] = None,
                   full_fov: Optional[bool] = None) -> Tuple[Any, str]:
    """A segmenter (cases -> label maps on their grids) for a checkpoint, ensemble folder or MLflow URI.

    Args:
        uri: ``best.pt``, an ensemble folder, or ``models:/`` / ``runs:/`` URI.
        device: Inference device (default CUDA if available).
        tracking_uri: MLflow tracking URI for MLflow URIs.
        full_fov: Checkpoints only: as `predict_case` (None: the checkpoint decides; True: ``--full-fov``).

    Returns:
        ``(segmenter, task)``.

    Raises:
        ConfigError: a path that is neither a checkpoint nor an ensemble.
    """
    from robustseg.cli.ensemble import is_ensemble_uri

    if is_ensemble_uri(uri):
        from robustseg.model_registry import load_ensemble

        ens, _ = load_ensemble(uri, tracking_uri, device)
        return ens.predict_cases, ens.spec.task
    if Path(uri).suffix == ".pt" and Path(uri).is_file():
        from robustseg.engine.predict import load_predictor, predict_case

        pred = load_predictor(uri, device)
        return (lambda cases: [predict_case(pred, c, full_fov=full_fov) for c in cases]), pred.task
    raise ConfigError(f"--model {uri}: not a checkpoint (.pt), an ensemble folder (spec.json) or a models:/ URI")


def _read_sources(specs: Sequence[Any], keep: Any, want: Optional[int]) -> List[Any]:
    """Validated cases of ``specs`` for which ``keep(case)`` holds; stop after ``want``."""
    from robustseg.data.cases import validate_case
    from robustseg.data.sources import read_source

    out: List[Any] = []
    for spec in specs:
        for case in read_source(spec.name, spec.path, **spec.options):
            if keep(case):
                out.append(validate_case(case))
                if want is not None and len(out) >= want:
                    return out
    return out


def load_eval_cases(data: Optional[str] = None, sources: Sequence[str] = (), fold: Optional[int] = None,
                    n_cases: Optional[int] = None) -> Tuple[List[Any], Dict[str, Any]]:
    """Evaluation cases on their original grids (see the module notes).

    Args:
        data: Store URI or its ``manifest.json``.
        sources: ``NAME:PATH[?k=v]`` sources (the original data; overrides the manifest's).
        fold: Held-out fold of the manifest.
        n_cases: At most this many cases.

    Returns:
        ``(cases, info)``; info records where they came from (for the outputs and MLflow).

    Raises:
        ConfigError: neither ``data`` nor ``sources``, or a fold without ``data`` / out of range.
        DataError: no usable cases, cases the sources do not hold, or a volume of another shape.
    """
    from robustseg.cli.common import parse_source
    from robustseg.config import SourceSpec

    specs = [parse_source(s) for s in sources]
    if n_cases is not None and n_cases < 1:
        raise ConfigError(f"--cases must be >= 1, got {n_cases}")
    if data is None:
        if not specs:
            raise ConfigError("robustness needs --data STORE (cases and folds of a prepared store) "
                              "or --source NAME:PATH")
        if fold is not None:
            raise ConfigError("--fold needs --data: folds are defined by the manifest the models were trained on")
        cases = _read_sources(specs, lambda c: c.label is not None and c.motion_level <= 0, n_cases)
        if not cases:
            raise DataError(", ".join(sources), "no labelled, motion-free cases")
        return cases, {"sources": list(sources)}

    from robustseg.data.manifest import MANIFEST, read_manifest
    from robustseg.data.storage import open_store

    uri = data[: -len(MANIFEST)].rstrip("/") if data.endswith(MANIFEST) else data
    manifest = read_manifest(open_store(uri))
    k = int(manifest.folds["k"])
    if fold is not None and not 0 <= fold < k:
        raise ConfigError(f"--fold {fold}: {manifest.uri} has folds 0..{k - 1}")
    labelled = [c for c in manifest.cases if c["has_label"] and (fold is None or c["fold"] == fold)]
    entries = [c for c in labelled if int(c.get("motion_level", -1)) <= 0]
    skipped = len(labelled) - len(entries)
    entries = entries[:n_cases] if n_cases else entries
    if not entries:
        raise DataError(manifest.uri, f"no labelled, motion-free cases{f' in fold {fold}' if fold is not None else ''}")
    if not specs:
        specs = [SourceSpec(**s) for s in manifest.data_config.get("sources", [])]
        if not specs:
            raise DataError(manifest.uri,
                            "the manifest records no sources: pass --source NAME:PATH (the original data)")
    wanted = {c["case_id"]: c for c in entries}
    found = {c.case_id: c for c in _read_sources(specs, lambda c: c.case_id in wanted, len(wanted))}
    missing = [cid for cid in wanted if cid not in found]
    where = ", ".join(f"{s.name}:{s.path}" for s in specs)
    if missing:
        raise DataError(where, f"{len(missing)} case(s) of {manifest.uri} not found in these sources "
                        f"(e.g. {missing[0]}); pass --source NAME:PATH pointing at the original data")
    for cid, entry in wanted.items():
        shape = list(found[cid].image.shape)
        if shape != list(entry["original_geometry"]["shape_zyx"]):
            prepared = entry["original_geometry"]["shape_zyx"]
            raise DataError(found[cid].source_path or cid, f"shape {shape} differs from the prepared "
                            f"{prepared}: not the data {manifest.uri} was made from")
    info = {"data": manifest.uri, "fold": fold, "sources": [f"{s.name}:{s.path}" for s in specs],
            "skipped_moving_cases": skipped}
    return [found[cid] for cid in wanted], info


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
    from robustseg.tracking import cli_tracking_uri

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
