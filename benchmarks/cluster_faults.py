"""Cluster start time and fault recovery on the namespaced 3-node cluster, as JSON.

Runs ``tests/cluster`` (the sweep, ensemble and Serve on `deploy.local_cluster` with a killed
worker node, a cut link, a killed replica node and a killed MLflow server) with
``ROBUSTSEG_FAULT_RECORD`` set, and writes what the tests measured, the test outcome and the
machine to ``benchmarks/results/cluster_faults_cpu.json``. Needs root (network namespaces).

    sudo .venv/bin/python benchmarks/cluster_faults.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from serve_latency import machine  # noqa: E402  (the benchmarks share one machine record)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DEFAULT_OUT = REPO / "benchmarks" / "results" / "cluster_faults_cpu.json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the cluster tests once and write their measurements."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("-k", default=None, help="pytest -k expression (default: every cluster test)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "faults.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "cluster")]
        if args.k:
            cmd += ["-k", args.k]
        t0 = time.time()
        res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, ROBUSTSEG_FAULT_RECORD=str(record)),
                             capture_output=True, text=True)
        rows: List[Dict[str, Any]] = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    summary = (res.stdout.strip().splitlines() or [""])[-1]
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "pytest": summary, "passed": res.returncode == 0,
           "wall_s": round(time.time() - t0, 1), "faults": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-2000:], file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
