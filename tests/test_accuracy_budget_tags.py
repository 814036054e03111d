"""benchmarks/accuracy_budget.py: where each run's checkpoints go (a seed replicate keeps seed 0's)."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("h5py")
REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("accuracy_budget", REPO / "benchmarks" / "accuracy_budget.py")
accuracy_budget = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy_budget)  # type: ignore[union-attr]


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"quick": False, "epochs": 24, "iters": 40, "batch": 16, "tag": "", "seed": 0, **kw})


def test_seed_zero_keeps_the_folder_names_of_earlier_runs() -> None:
    assert accuracy_budget.run_tag(_args()) == "e24_i40_b16"
    assert accuracy_budget.run_tag(_args(tag="m5_23")) == "e24_i40_b16-m5_23"
    assert accuracy_budget.run_tag(_args(quick=True, epochs=2, iters=5, batch=4)) == "quick-e2_i5_b4"


def test_a_seed_replicate_gets_its_own_folder() -> None:
    assert accuracy_budget.run_tag(_args(seed=1)) == "e24_i40_b16_s1"
    assert accuracy_budget.run_tag(_args(seed=1, tag="m5_23")) == "e24_i40_b16_s1-m5_23"
    assert accuracy_budget.run_tag(_args(seed=1)) != accuracy_budget.run_tag(_args())
