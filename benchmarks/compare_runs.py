"""Compare finished training runs (e.g. the covid label-budget grid) and log the comparison to MLflow.

Each run is a ``robustseg train`` output folder (``robustseg_work/runs/<name>/fold<k>``); its
``history.json`` gives the best validation score, the epoch it came at and the training
time. The table (JSON + CSV), a bar plot and one metric per run go to one MLflow run, so the
grid can be read in one place beside the per-run training curves.

    python benchmarks/compare_runs.py --name covid_label_budget_cpu_reduced \\
        --group b10 --runs scratch_unet=robustseg_work/runs/covid_b10_scratch_unet/fold0 ... \\
        --group b40 --runs ...

Groups are columns of the plot (label budgets); run names repeat across groups (methods).
Needs matplotlib and mlflow (no Ray); ``--no-tracking`` skips MLflow.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import machine  # noqa: E402


def summarise(run_dir: Path) -> Dict[str, float]:
    """Best validation score of a finished run, from its ``history.json``.

    Raises:
        FileNotFoundError: the run has no history (never trained or still on its first epoch).
    """
    path = run_dir / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no history (is the run finished?)")
    history = json.loads(path.read_text())
    key = "val_dice" if any("val_dice" in h for h in history) else "val_score"
    scored = [h for h in history if key in h]
    best = max(scored, key=lambda h: h[key])
    out = {"best": float(best[key]), "best_epoch": int(best["epoch"]), "epochs": len(history),
           "train_minutes": round(sum(h.get("epoch_seconds", 0.0) for h in history) / 60, 2), "metric": key}
    out.update({k: float(v) for k, v in best.items() if k.startswith("val_dice_")})
    return out


def plot(rows: List[Dict], path: Path, title: str) -> None:
    """Grouped bars: one group per ``group``, one bar per run name."""
    from robustseg.analysis.outputs import pyplot, save_figure

    plt = pyplot()
    groups = list(dict.fromkeys(r["group"] for r in rows))
    names = list(dict.fromkeys(r["run"] for r in rows))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(groups) * max(len(names), 1) * 0.5, 4))
    for i, name in enumerate(names):
        xs, ys = [], []
        for g, group in enumerate(groups):
            hit = [r for r in rows if r["group"] == group and r["run"] == name]
            if hit:
                xs.append(g + (i - (len(names) - 1) / 2) * width)
                ys.append(hit[0]["best"])
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("best validation Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="result name (benchmarks/results/<name>.json, MLflow run name)")
    ap.add_argument("--group", action="append", required=True, help="a group label; the --runs after it belong to it")
    ap.add_argument("--runs", action="append", nargs="+", required=True, metavar="NAME=DIR")
    ap.add_argument("--label", default="", help="free text stored with the result (e.g. REDUCED CPU VERSION)")
    ap.add_argument("--experiment", default="comparisons")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if len(args.group) != len(args.runs):
        ap.error("give one --runs list after each --group")
    rows = []
    for group, specs in zip(args.group, args.runs):
        for spec in specs:
            name, _, folder = spec.partition("=")
            if not folder:
                ap.error(f"--runs takes NAME=DIR, got {spec!r}")
            try:
                rows.append({"group": group, "run": name, "dir": folder, **summarise(Path(folder))})
            except FileNotFoundError as e:
                print(f"skipped: {e}")
    if not rows:
        print("no finished run to compare")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": args.name, "label": args.label, "machine": machine(), "rows": rows}
    json_path = out / f"{args.name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    csv_path, png_path = out / f"{args.name}.csv", out / f"{args.name}.png"
    with csv_path.open("w", newline="") as fh:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, png_path, args.name)
    width = max(len(r["run"]) for r in rows)
    for r in rows:
        print(f"{r['group']:>6}  {r['run']:<{width}}  {r['metric']} {r['best']:.4f}  (epoch {r['best_epoch']}/"
              f"{r['epochs']}, {r['train_minutes']} min)")
    print(f"written {json_path}, {csv_path.name}, {png_path.name}")
    if not args.no_tracking:
        from robustseg.tracking import analysis_run, cli_tracking_uri, log_metrics_batched

        uri = cli_tracking_uri(args)
        with analysis_run(uri, args.experiment, args.name, "comparison",
                          tags={"label": args.label}) as (client, run_id):
            log_metrics_batched(client, run_id, [(f"{r['group']}_{r['run']}", r["best"], 0) for r in rows])
            for f in (json_path, csv_path, png_path):
                client.log_artifact(run_id, str(f))
        print(f"MLflow run {run_id} in experiment {args.experiment!r} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
