import numpy as np
import pytest
import torch

from robustseg.engine.checkpoint import (CheckpointError, load_checkpoint, load_model_state, restore_rng, rng_state,
                                         save_checkpoint, unwrap)


def test_atomic_save_and_load(tmp_path):
    p = save_checkpoint(tmp_path / "c" / "last.pt", {"model": {"w": torch.ones(2)}, "config": {"a": 1}})
    ck = load_checkpoint(p)
    assert ck["format"] == 1 and torch.equal(ck["model"]["w"], torch.ones(2))
    assert [f.name for f in (tmp_path / "c").iterdir()] == ["last.pt"]


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="junk.pt: unreadable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a robustseg checkpoint"):
        load_checkpoint(other)


def test_weight_mismatch_explained():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 2, 1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_model_state(model, state, "x.pt")  # exact fit
    with pytest.raises(CheckpointError, match="x.pt: checkpoint is a 'swin_unet' model, the config asks for 'unet2d'"):
        load_model_state(model, state, "x.pt", "unet2d", "swin_unet")
    missing = {k: v for k, v in state.items() if not k.startswith("1.")}
    with pytest.raises(CheckpointError, match=r"2 missing keys: 1.weight, 1.bias"):
        load_model_state(model, missing, "x.pt")
    shaped = dict(state, **{"1.weight": torch.zeros(3, 4, 1, 1)})
    with pytest.raises(CheckpointError, match=r"shape mismatches: 1.weight \(3, 4, 1, 1\) vs \(2, 4, 1, 1\)"):
        load_model_state(model, shaped, "x.pt")
    extra = dict(state, bogus=torch.zeros(1))
    with pytest.raises(CheckpointError, match="1 unexpected keys: bogus"):
        load_model_state(model, extra, "x.pt")


def test_rng_round_trip():
    g = torch.Generator().manual_seed(3)
    snap = rng_state(g)
    a = (torch.rand(3), np.random.rand(2), torch.rand(2, generator=g))
    restore_rng(snap, g)
    b = (torch.rand(3), np.random.rand(2), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_unwrap_compiled_prefix():
    m = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._orig_mod = m

    assert unwrap(Wrapper()) is m and unwrap(m) is m
