"""Start-up time of the `robustseg` command: wall seconds of ``--help`` in a fresh process.

Each measurement starts a new interpreter (the console script, or ``python -m robustseg.cli``
when the script is not installed), so it pays everything a user pays: interpreter start,
the imports of `robustseg.cli` and building the argparse parser. The median of ``--repeats``
runs is reported for ``robustseg --help`` and for ``robustseg <cmd> --help`` of a few
commands, after one untimed warm-up run each (file-system cache).

    python benchmarks/cli_startup.py --label before     # before a change
    python benchmarks/cli_startup.py --label after      # after it; keeps the "before" entry

Writes (merges into) ``benchmarks/results/cli_startup_<tag>.json``: the machine, and per
label the median/min/max seconds per command line and the heavy modules the parser
imported. Needs only this package (no torch is imported by the benchmark itself).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("", "train", "predict", "tune", "robustness", "registry", "serve")
HEAVY = ("torch", "monai", "ray", "mlflow", "SimpleITK", "optuna")
PROBE = ("import sys; from robustseg.cli import build_parser; build_parser(); "
         "print(' '.join(m for m in {heavy!r} if m in sys.modules))")


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (the machine the numbers belong to)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command() -> List[str]:
    """The console script next to this interpreter, else ``python -m robustseg.cli``."""
    script = Path(sys.executable).with_name("robustseg")
    if script.is_file():
        return [str(script)]
    found = shutil.which("robustseg")
    return [found] if found else [sys.executable, "-m", "robustseg.cli"]


def time_once(argv: Sequence[str]) -> float:
    """Wall seconds of one run of ``argv`` (output discarded; a failure raises)."""
    t0 = time.perf_counter()
    subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=REPO)
    return time.perf_counter() - t0


def measure(base: Sequence[str], commands: Sequence[str], repeats: int) -> Dict[str, Dict[str, float]]:
    """Median/min/max seconds of ``robustseg [cmd] --help`` for each command.

    Runs are interleaved across commands (one of each per repeat) so background load on a
    shared machine hits them alike.
    """
    lines = {(f"robustseg {c} --help" if c else "robustseg --help"): [*base, *([c] if c else []), "--help"]
             for c in commands}
    for argv in lines.values():
        time_once(argv)  # warm-up: file-system cache, .pyc files
    times: Dict[str, List[float]] = {k: [] for k in lines}
    for _ in range(repeats):
        for key, argv in lines.items():
            times[key].append(time_once(argv))
    return {k: {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3), "max_s": round(max(v), 3)}
            for k, v in times.items()}


def heavy_imports() -> List[str]:
    """Heavy modules that importing `robustseg.cli` and building its parser pulls in."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return out.stdout.split()


def main(argv: Sequence[str] = ()) -> int:
    """Measure, merge into the results JSON under ``--label``, print the medians."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after", help="key of this measurement in the JSON (before, after, ...)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--commands", default=",".join(COMMANDS),
                   help="comma-separated subcommands ('' = the top level)")
    p.add_argument("--tag", default="cpu", help="file name suffix: results/cli_startup_<tag>.json")
    p.add_argument("--note", default="", help="free text stored with this label (e.g. the commit)")
    args = p.parse_args(list(argv) or None)
    path = REPO / "benchmarks" / "results" / f"cli_startup_{args.tag}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"benchmark": "cli_startup"}
    doc["machine"] = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                      "python": platform.python_version()}
    doc["settings"] = {"repeats": args.repeats, "command": " ".join(Path(c).name for c in _command()),
                       "what": "wall seconds of a fresh process printing the help, median over repeats"}
    results = measure(_command(), args.commands.split(","), args.repeats)
    doc[args.label] = {"when": time.strftime("%Y-%m-%d %H:%M"), "note": args.note,
                       "heavy_modules_imported_by_parser": heavy_imports(), "seconds": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    for key, r in results.items():
        print(f"{key:34s} median {r['median_s']:.3f} s  (min {r['min_s']:.3f}, max {r['max_s']:.3f})")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
