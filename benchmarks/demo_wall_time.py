"""Fresh clone -> `make demo` -> Serve answering: wall time and what the demo's models scored, as JSON.

Clones the repository's committed HEAD into a temporary folder (uncommitted changes are not
measured), runs ``make demo`` there with pip's configured (local) wheels, timestamps every
output line, and writes to ``benchmarks/results/demo_wall_time_cpu.json``:

* ``install_s``: until the demo's first step prints (venv, pip, torch, the package);
* ``serve_answered_s``: until the served ED/ES pair's ejection fractions print (issue 15's
  clock: "fresh clone to Serve answering");
* ``total_s``: until ``make demo`` exits;
* the out-of-fold Dice per structure and the served EF against the phantom's true EF.

Runs with the system Python and the standard library only: the venv is part of what it measures.

    python3 benchmarks/demo_wall_time.py [--out F] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "demo_wall_time_cpu.json"

_FIRST_STEP = re.compile(r"^\[1/5\] ")
_EF = re.compile(r"^\s*(LV|RV): .*EF (-?[\d.]+) % \(true (-?[\d.]+) %(?:, off by (-?[\d.]+) points)?")
# The ensemble step's table row: model, n, dice_LV, dice_MYO, dice_RV, dice_mean, hd95_mean.
_OOF_ROW = re.compile(r"^\s*(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
_FINISHED = re.compile(r"^demo finished in ([\d.]+) s")


def parse_demo_output(lines: Sequence[Tuple[float, str]]) -> Dict[str, Any]:
    """What a timestamped ``make demo`` output says: step times, out-of-fold Dice, served EF.

    Args:
        lines: ``(seconds since the clone finished, line)`` in order.

    Returns:
        ``install_s``, ``serve_answered_s``, ``demo_reported_s`` (the demo's own clock),
        ``oof_dice`` ({LV, MYO, RV, mean, cases}) and ``ef`` ({LV/RV: {predicted, true, off_by}});
        a key is None where its line never came.
    """
    out: Dict[str, Any] = {"install_s": None, "serve_answered_s": None, "demo_reported_s": None,
                           "oof_dice": None, "ef": {}}
    for t, line in lines:
        if out["install_s"] is None and _FIRST_STEP.match(line):
            out["install_s"] = round(t, 1)
        elif (m := _EF.match(line)) is not None:
            pred, true = float(m.group(2)), float(m.group(3))
            # The demo's own difference (of unrounded values) when it prints one.
            off = float(m.group(4)) if m.group(4) is not None else round(pred - true, 1)
            out["ef"][m.group(1)] = {"predicted": pred, "true": true, "off_by": off}
            if out["serve_answered_s"] is None:
                out["serve_answered_s"] = round(t, 1)
        elif (m := _OOF_ROW.match(line)) is not None:
            lv, myo, rv, mean = (float(m.group(i)) for i in range(3, 7))
            out["oof_dice"] = {"model": m.group(1), "cases": int(m.group(2)), "LV": lv, "MYO": myo, "RV": rv,
                               "mean": mean}
        elif (m := _FINISHED.match(line)) is not None:
            out["demo_reported_s"] = float(m.group(1))
    return out


def _machine() -> Dict[str, Any]:
    """CPU model and core count (no torch: the benchmark runs before any venv exists)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _run_timed(cmd: List[str], cwd: Path, echo: bool) -> Tuple[int, List[Tuple[float, str]], float]:
    """Run ``cmd``; every output line with its time since the start; exit status and total seconds."""
    t0 = time.perf_counter()
    lines: List[Tuple[float, str]] = []
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\n")))
        if echo:
            print(f"{lines[-1][0]:7.1f} {lines[-1][1]}", flush=True)
    rc = proc.wait()
    return rc, lines, time.perf_counter() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Clone, time ``make demo``, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    p.add_argument("--quiet", action="store_true", help="do not echo the demo's output")
    args = p.parse_args(argv)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="robustseg-demo-clone-"))
    try:
        clone = tmp / "robustseg"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        rc, lines, total = _run_timed(["make", "demo"], clone, echo=not args.quiet)
    finally:
        if args.keep:
            print(f"clone kept at {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": _machine(), "commit": head, "command": "git clone && make demo (wheels local)",
              "returncode": rc, "total_s": round(total, 1), **parse_demo_output(lines),
              "goal_s": 300}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("total_s", "install_s", "serve_answered_s", "oof_dice", "ef")}))
    print(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
