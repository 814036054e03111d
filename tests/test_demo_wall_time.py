"""benchmarks/demo_wall_time.py: what it reads from a timestamped `make demo` output."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_wall_time", REPO / "benchmarks" / "demo_wall_time.py")
demo_wall_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_wall_time)  # type: ignore[union-attr]

OUTPUT = """\
python3 -m venv .venv
[1/5] preparing 8 synthetic subjects (ED/ES x motion levels 0-3) with the CMR plan
fold  subjects  cases  slices  labelled
   0         4     32     344       344
cbd749fa  COMPLETE        unet   0.00214   0.8694      0.8561      0.8827
model   n  dice_LV  dice_MYO  dice_RV  dice_mean  hd95_mean
 unet  64    0.944     0.826    0.853      0.874      3.027
  LV: EDV 128.7 mL (true 135.0), ESV 57.6 mL (true 56.9), EF 55.2 % (true 57.8 %, off by -2.6 points)
  RV: EDV 77.1 mL (true 78.1), ESV 30.3 mL (true 24.1), EF 60.6 % (true 69.2 %, off by -8.5 points)
demo finished in 207.7 s; shards at file:///tmp/x/shards
"""


def test_parse_reads_the_install_serve_and_accuracy_lines() -> None:
    lines = [(10.0 * i, line) for i, line in enumerate(OUTPUT.splitlines())]
    got = demo_wall_time.parse_demo_output(lines)
    assert got["install_s"] == 10.0
    assert got["serve_answered_s"] == 70.0  # the first EF line: Serve has answered
    assert got["demo_reported_s"] == 207.7
    assert got["oof_dice"] == {"model": "unet", "cases": 64, "LV": 0.944, "MYO": 0.826, "RV": 0.853, "mean": 0.874}
    assert got["ef"] == {"LV": {"predicted": 55.2, "true": 57.8, "off_by": -2.6},
                         "RV": {"predicted": 60.6, "true": 69.2, "off_by": -8.5}}


def test_parse_leaves_what_never_printed_as_none() -> None:
    got = demo_wall_time.parse_demo_output([(1.0, "make: *** [Makefile:12: .venv/.installed] Error 1")])
    assert got == {"install_s": None, "serve_answered_s": None, "demo_reported_s": None, "oof_dice": None, "ef": {}}
