"""`robustseg predict` and `evaluate`: masks from a checkpoint, an ensemble or an endpoint, and their scores."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from robustseg.cli.common import print_table, progress_bar, report_masks, resolve_device
from robustseg.errors import ConfigError


def cmd_predict(args: argparse.Namespace) -> int:
    """Run `robustseg predict` (masks in the input geometry).

    A bad input does not stop the batch (unless ``--fail-fast``): every good mask is written,
    the failures are listed at the end and the exit status is 2. Inputs that look like label
    maps are skipped with a notice unless ``--force``.
    """
    from robustseg.engine.predict import check_output_dir, list_inputs, predict_files
    from robustseg.cli.ensemble import tracking_uri_from_args
    from robustseg.ensemble.predict import is_ensemble_uri, predict_with_ensemble

    # Before any model is loaded or request sent: a bad --output or --input costs nothing.
    check_output_dir(args.output)
    if args.endpoint:
        from robustseg.cli.serve import predict_endpoint

        return predict_endpoint(args.endpoint, args.input, args.output, force=args.force, fail_fast=args.fail_fast)
    if not args.model:
        raise ConfigError("predict needs --model (checkpoint, ensemble folder or models:/ URI) or --endpoint URL")
    list_inputs(args.input)
    tta = False if args.no_tta else None
    options = {"device": resolve_device(args.device), "tta": tta, "progress": progress_bar, "force": args.force,
               "fail_fast": args.fail_fast}
    if is_ensemble_uri(args.model):
        # The same default store as `ensemble`/`registry` ($MLFLOW_TRACKING_URI, else the workdir's
        # SQLite), so a model registered with the defaults is found with the defaults.
        rows = predict_with_ensemble(args.model, args.input, args.output, tracking_uri=tracking_uri_from_args(args),
                                     **options)
    else:
        rows = predict_files(args.model, args.input, args.output, full_fov=args.full_fov, **options)
    return report_masks(rows, f"{len(rows)} masks written to {args.output}")


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


def register(sub: Any) -> None:
    """Add ``predict`` and ``evaluate``."""
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
