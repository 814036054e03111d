"""2.5D input (``model.slice_context``): neighbouring slices as channels, end to end.

Pixel-wise stand-in networks make the contract exact: a network that reads only its first
channel must predict each slice from the slice *above* it, the last channel from the slice
below, so a wrong stack order, a missed edge clamp or a member fed another member's channels
shows up as a different label map.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustseg.config import ExperimentConfig
from robustseg.data.cases import Case
from robustseg.engine.inference import context_stack, sliding_window_2d
from robustseg.engine.predict import load_predictor, predict_case
from robustseg.engine.train import train_from_config
from robustseg.errors import ConfigError
from robustseg.models import build_model
from tiny import tiny_cfg


class Channel(nn.Module):
    """Logits from one input channel: above the mean is class 1. ``slice_context`` as built."""

    def __init__(self, channel: int, slice_context: int) -> None:
        super().__init__()
        self.channel, self.slice_context = channel, slice_context

    def forward(self, x):
        assert x.shape[1] == 1 + 2 * self.slice_context  # fed exactly the channels it was trained on
        v = x[:, self.channel : self.channel + 1]
        return torch.cat([-10 * v, 10 * v], dim=1)


def _volume(z=5, hw=(40, 36)) -> torch.Tensor:
    """Slice z is bright in a band of rows that moves with z, so every slice differs."""
    img = -torch.ones((z,) + hw)
    for k in range(z):
        img[k, 4 + 6 * k : 8 + 6 * k] = 1.0
    return img


def test_context_stack_orders_neighbours_and_repeats_the_ends():
    img = torch.arange(4.0)[:, None, None].expand(4, 2, 3)
    s = context_stack(img, 2)
    assert s.shape == (4, 5, 2, 3)
    assert s[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]


@pytest.mark.parametrize("patch, tta", [(None, False), ((16, 16), True)])
def test_2p5d_network_sees_the_slice_above_and_below(patch, tta):
    img = _volume()
    kw = dict(num_classes=2, patch_size=patch, overlap=0.5, tta=tta)
    above = sliding_window_2d(Channel(0, 1), img, **kw).argmax(0)
    below = sliding_window_2d(Channel(2, 1), img, **kw).argmax(0)
    plain = sliding_window_2d(Channel(0, 0), img, **kw).argmax(0)
    assert torch.equal(plain, (img > 0).long())
    assert torch.equal(above[1:], plain[:-1]) and torch.equal(above[0], plain[0])  # first slice: itself
    assert torch.equal(below[:-1], plain[1:]) and torch.equal(below[-1], plain[-1])


def test_ensemble_members_each_read_their_own_channels():
    """A 2D and a 2.5D member in one ensemble: the stack is built once for the widest context
    and each member gets the channels centred on the slice (a 2D member the middle one)."""
    img = _volume()
    kw = dict(num_classes=2, patch_size=None)
    plain, wide = Channel(0, 0), Channel(0, 2)  # wide reads the slice two above
    alone = [sliding_window_2d(m, img, **kw) for m in (plain, wide)]
    assert torch.equal(alone[1].argmax(0)[2:], alone[0].argmax(0)[:-2])
    for w, want in (([1.0, 0.0], alone[0]), ([0.0, 1.0], alone[1])):
        assert torch.allclose(sliding_window_2d([plain, wide], img, weights=w, **kw), want)
    mean = sliding_window_2d([plain, wide], img, **kw)
    assert torch.allclose(mean, (alone[0] + alone[1]) / 2)


def test_config_checks_slice_context_at_load():
    cfg = ExperimentConfig.from_dict({"model": {"name": "unet2d", "slice_context": 1,
                                                "params": {"filters_base": 4, "filters_max": 8, "max_stages": 3}}})
    net = build_model(cfg.model, (32, 32))
    assert net.slice_context == 1
    assert net(torch.zeros(2, 3, 32, 32))[0].shape == (2, 4, 32, 32)  # three input channels
    for bad in (-1, 5):
        with pytest.raises(ConfigError, match="model.slice_context must be an integer in \\[0, 4\\]"):
            ExperimentConfig.from_dict({"model": {"slice_context": bad}})
    for bad in (True, "1"):
        with pytest.raises(ConfigError, match="model.slice_context must be an integer"):
            ExperimentConfig.from_dict({"model": {"slice_context": bad}})
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="model.slice_context_dropout must be a probability in \\[0, 1\\]"):
            ExperimentConfig.from_dict({"model": {"slice_context": 1, "slice_context_dropout": bad}})
    with pytest.raises(ConfigError, match="'unet3d' is 3D"):
        ExperimentConfig.from_dict({"model": {"name": "unet3d", "slice_context": 1}})
    with pytest.raises(ConfigError, match="regime 'genesis' restores its input image"):
        ExperimentConfig.from_dict({"model": {"slice_context": 1}, "regime": {"name": "genesis"}})
    with pytest.raises(ConfigError, match="one-channel image; model.in_channels is 2"):
        ExperimentConfig.from_dict({"model": {"slice_context": 1, "in_channels": 2}})


@pytest.mark.slow
def test_trained_2p5d_checkpoint_predicts_with_its_stack(tmp_path):
    """Train a tiny 2.5D model, reload it from last.pt: the predictor stacks the neighbours
    the checkpoint says, on every path (whole field and the two-stage crop)."""
    cfg = tiny_cfg(tmp_path, **{"model.slice_context": 1, "optim.epochs": 1})
    res = train_from_config(cfg, out_dir=tmp_path / "run", device=torch.device("cpu"))
    pred = load_predictor(res.last_checkpoint, torch.device("cpu"))
    assert pred.model.slice_context == 1 and pred.cfg.model.slice_context == 1
    first = next(m for m in pred.model.modules() if isinstance(m, (nn.Conv2d,)))
    assert first.in_channels == 3
    rng = np.random.default_rng(0)
    case = Case(case_id="c", subject_id="c", image=rng.normal(size=(6, 80, 72)).astype(np.float32),
                spacing_known=False, modality="MR", task="cardiac", source_path="c.nii.gz")
    for full_fov in (True, False):
        lab = predict_case(pred, case, full_fov=full_fov, post=False)
        assert lab.shape == (6, 80, 72) and lab.dtype == np.uint8


def test_ray_data_stream_refuses_slice_context(tmp_path):
    """The streamed path feeds single slices: a 2.5D config stops before any training."""
    cfg = tiny_cfg(tmp_path, **{"model.slice_context": 1})
    with pytest.raises(ConfigError, match="only the in-memory batcher gathers"):
        train_from_config(cfg, out_dir=tmp_path / "run", device=torch.device("cpu"),
                          train_batches=lambda generator, patch: iter(()))
