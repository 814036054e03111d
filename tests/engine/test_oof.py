"""Out-of-fold evaluation: every architecture and every combination on the same cases; selection."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from robustseg.data.manifest import read_manifest
from robustseg.data.storage import open_store
from robustseg.engine import oof
from robustseg.engine.predict import load_predictor
from tiny_ensemble import tiny_member_checkpoints

CPU = torch.device("cpu")


def test_names_keys_and_selection():
    assert oof.ensemble_name(["unet", "unet2d"]) == "ensemble(unet+unet2d)"
    assert oof.combination_of("ensemble(unet+unet2d)") == ["unet", "unet2d"] and oof.combination_of("unet") == ["unet"]
    assert oof.metric_key("ensemble(unet+unet2d)") == "ensemble_unet-unet2d"
    summary = [{"model": "a", "dice_mean": 0.8}, {"model": "b", "dice_mean": 0.5},
               {"model": "ensemble(a+b)", "dice_mean": 0.7}]
    assert oof.select(summary)["model"] == "a"  # a weak member drags the ensemble below its best member
    summary[2]["dice_mean"] = 0.8
    assert oof.select(summary)["model"] == "a"  # a tie goes to fewer members
    summary[2]["dice_mean"] = 0.85
    assert oof.select(summary)["model"] == "ensemble(a+b)"
    assert oof.select([{"model": "a", "dice_mean": math.nan}, {"model": "b", "dice_mean": 0.1}])["model"] == "b"


def test_every_model_scored_on_the_same_cases(tmp_path):
    ckpts = tiny_member_checkpoints(tmp_path)
    store = open_store(str(tmp_path / "shards"))
    manifest = read_manifest(store)
    models = {"unet2d": {0: load_predictor(ckpts[0], CPU)}, "unet": {0: load_predictor(ckpts[1], CPU)}}
    rows = oof.oof_evaluate(models, store, manifest, max_cases=2)
    assert [r["model"] for r in rows] == ["unet2d", "unet", "ensemble(unet+unet2d)"] * 2
    assert len({r["case_id"] for r in rows}) == 2 and {r["fold"] for r in rows} == {0}
    assert all(0.0 <= r["dice_mean"] <= 1.0 or np.isnan(r["dice_mean"]) for r in rows)
    summary = oof.summarise(rows)
    assert [s["model"] for s in summary] == ["unet2d", "unet", "ensemble(unet+unet2d)"]
    assert all(s["n"] == 2 and s["hd95_unit"] == "mm" for s in summary) and "fold" not in summary[0]
    png = oof.plot_comparison(summary, {0: "background", 1: "LV", 2: "MYO", 3: "RV"}, tmp_path / "cmp.png")
    assert png.stat().st_size > 5000
    with pytest.raises(ValueError, match="has folds \\[1\\], expected \\[0\\]"):
        oof.oof_evaluate({"a": {0: models["unet"][0]}, "b": {1: models["unet"][0]}}, store, manifest)
