"""Helpers every `robustseg` subcommand shares: progress bars, tables, config loading, devices."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from robustseg.config import ExperimentConfig, SourceSpec
from robustseg.errors import ConfigError


def progress_bar(iterable: Any = None, **kw: Any) -> Any:
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
    """``NAME:PATH[?key=value&...]`` -> `SourceSpec` (`robustseg.data.sources.parse_source_spec`)."""
    from robustseg.data.sources import parse_source_spec

    return parse_source_spec(arg)


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


def resolve_device(name: Optional[str]) -> Any:
    """``--device`` value -> `torch.device` (None: the command's default); CUDA must exist."""
    import torch

    if name is None:
        return None
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


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
