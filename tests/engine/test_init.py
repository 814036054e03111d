"""Pooled pre-training -> fine-tuning: `regime.init` from a checkpoint or an ensemble, reset
rules, non-strict loading, resume precedence, and per-dataset sampling weights."""
from __future__ import annotations

import collections

import pytest
import torch

from robustseg.config import ExperimentConfig
from robustseg.engine.checkpoint import CheckpointError, load_checkpoint
from robustseg.engine.data import SliceBatcher, SliceSet, slice_probabilities
from robustseg.engine.init import apply_init, resolve_init
from robustseg.engine.train import train_from_config
from robustseg.errors import ConfigError
from robustseg.models import build_model
from tiny import tiny_cfg
from tiny_ensemble import tiny_ensemble_folder, tiny_member_checkpoints

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    return root, tiny_member_checkpoints(root)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_config_validation():
    with pytest.raises(ConfigError, match="init_optimizer must be 'fresh' or 'checkpoint'"):
        ExperimentConfig.from_dict({"regime": {"init_optimizer": "keep"}})
    with pytest.raises(ConfigError, match="init_lr_scale must be > 0"):
        ExperimentConfig.from_dict({"regime": {"init_lr_scale": 0}})
    with pytest.raises(ConfigError, match="sampling_weights must be non-negative"):
        ExperimentConfig.from_dict({"data": {"sampling_weights": {"acdc": -1}}})


def test_fine_tuning_starts_from_the_checkpoint(pretrained, tmp_path):
    root, (unet2d_ckpt, _) = pretrained
    cfg = tiny_cfg(root, **{"regime.init": str(unet2d_ckpt), "optim.epochs": 1, "optim.iters_per_epoch": 1,
                            "optim.lr": 1e-30, "regime.init_lr_scale": 0.5})
    res = train_from_config(cfg, out_dir=tmp_path / "ft", device=CPU)
    before, after = _weights(unet2d_ckpt), _weights(res.last_checkpoint)
    # lr ~0: one step moves nothing visible, so the fine-tuned weights are the pre-trained ones.
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-12) for k in before if before[k].is_floating_point())
    # Without init the same run starts elsewhere.
    scratch = train_from_config(tiny_cfg(root, **{"optim.epochs": 1, "optim.iters_per_epoch": 1, "optim.lr": 1e-30}),
                                out_dir=tmp_path / "scratch", device=CPU)
    w = _weights(scratch.last_checkpoint)
    assert any(not torch.allclose(before[k], w[k], rtol=0, atol=1e-6) for k in before if before[k].is_floating_point())


def test_lr_scale_and_checkpoint_optimizer(pretrained, tmp_path):
    root, (unet2d_ckpt, _) = pretrained
    cfg = tiny_cfg(root, **{"regime.init": str(unet2d_ckpt), "optim.epochs": 1, "optim.iters_per_epoch": 1,
                            "optim.lr": 0.01, "regime.init_lr_scale": 0.1, "regime.init_optimizer": "checkpoint"})
    res = train_from_config(cfg, out_dir=tmp_path / "ft", device=CPU)
    history = load_checkpoint(res.last_checkpoint)["history"]
    assert history[0]["lr"] == pytest.approx(0.001, rel=1e-6)


def test_resume_wins_over_init(pretrained, tmp_path):
    root, (unet2d_ckpt, unet_ckpt) = pretrained
    out = tmp_path / "run"
    first = train_from_config(tiny_cfg(root, **{"optim.epochs": 1, "optim.iters_per_epoch": 1}), out_dir=out, device=CPU)
    own = _weights(first.last_checkpoint)
    cfg = tiny_cfg(root, **{"optim.epochs": 1, "optim.iters_per_epoch": 1, "regime.init": str(unet2d_ckpt)})
    again = train_from_config(cfg, out_dir=out, device=CPU)  # already finished: nothing re-initialised
    assert all(torch.equal(own[k], v) for k, v in _weights(again.last_checkpoint).items())


def test_init_from_an_ensemble_member_and_errors(pretrained):
    root, (unet2d_ckpt, unet_ckpt) = pretrained
    folder = tiny_ensemble_folder(root)
    cfg = tiny_cfg(root, **{"regime.init": str(folder)})
    state = resolve_init(cfg)
    assert state.backbone == "unet2d" and "member unet2d_0" in state.where
    assert all(torch.equal(state.model[k], v) for k, v in _weights(unet2d_ckpt).items())
    cfg_unet = tiny_cfg(root, **{"regime.init": str(folder)})
    cfg_unet.model.name, cfg_unet.model.params = "unet", {"base": 4, "depth": 3}
    assert resolve_init(cfg_unet).backbone == "unet"
    with pytest.raises(CheckpointError, match="no member 'nope'"):
        resolve_init(tiny_cfg(root, **{"regime.init": str(folder), "regime.init_member": "nope"}))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        resolve_init(tiny_cfg(root, **{"regime.init": str(root / "missing.pt")}))
    # A unet2d checkpoint does not fit a unet strictly; non-strict finds no matching parameter.
    model = build_model(cfg_unet.model, (64, 64), None)
    with pytest.raises(CheckpointError, match="is a 'unet2d' model"):
        apply_init(model, resolve_init(tiny_cfg(root, **{"regime.init": str(unet2d_ckpt)})), cfg_unet)


def test_non_strict_loading_skips_mismatched_head(pretrained):
    root, (unet2d_ckpt, _) = pretrained
    cfg = tiny_cfg(root, **{"regime.init": str(unet2d_ckpt), "regime.init_strict": False, "model.num_classes": 2})
    model = build_model(cfg.model, (64, 64), None)
    state = apply_init(model, resolve_init(cfg), cfg)
    assert state.skipped and len(state.skipped) < len(model.state_dict()) / 2  # the heads, not the encoder
    src = _weights(unet2d_ckpt)
    own = model.state_dict()
    loaded = [k for k in own if k not in state.skipped]
    assert loaded and all(torch.equal(own[k], src[k]) for k in loaded)


def _slice_set(datasets):
    n = len(datasets)
    meta = {f"c{i}": {"dataset": d} for i, d in enumerate(datasets)}
    return SliceSet(images=torch.zeros(n, 8, 8), labels=torch.ones(n, 8, 8, dtype=torch.uint8),
                    labelled=torch.ones(n, dtype=torch.bool), foreground=torch.ones(n, dtype=torch.bool),
                    case_ids=[f"c{i}" for i in range(n)], slice_index=torch.zeros(n, dtype=torch.int64), meta=meta)


def test_sampling_weights_give_each_dataset_its_share():
    data = _slice_set(["pool"] * 90 + ["target"] * 10)
    prob = slice_probabilities(data, {"target": 1.0, "pool": 1.0})
    assert prob[:90].sum() == pytest.approx(prob[90:].sum())
    gen = torch.Generator().manual_seed(0)
    batcher = SliceBatcher(data, 64, None, gen, dataset_weights={"pool": 1.0, "target": 3.0})
    counts = collections.Counter()
    for _ in range(50):
        b = next(batcher)
        counts["target"] += int((b["image"].shape[0]))  # batch size sanity
    idx = torch.multinomial(batcher.prob, 20000, replacement=True, generator=gen)
    share = float((idx >= 90).float().mean())
    assert share == pytest.approx(0.75, abs=0.02) and counts["target"] == 50 * 64
    with pytest.raises(ConfigError, match="datasets \\['mnms'\\] not in the training data"):
        slice_probabilities(data, {"mnms": 1.0})
    with pytest.raises(ConfigError, match="no dataset with a positive weight"):
        slice_probabilities(data, {"pool": 0.0, "target": 0.0})
