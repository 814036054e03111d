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
from robustseg.models.context_input import blur_neighbours, mean_neighbours
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
    for bad in (-1.0, 9.0):
        with pytest.raises(ConfigError, match="model.slice_context_blur must be a Gaussian sigma in \\[0, 8\\]"):
            ExperimentConfig.from_dict({"model": {"slice_context": 1, "slice_context_blur": bad}})
    for bad in (True, "two"):
        with pytest.raises(ConfigError, match="model.slice_context_blur must be a number"):
            ExperimentConfig.from_dict({"model": {"slice_context": 1, "slice_context_blur": bad}})
    with pytest.raises(ConfigError, match="slice_context_blur=2.0 smooths neighbouring slices; set "
                                          "model.slice_context >= 1 \\(it is 0"):
        ExperimentConfig.from_dict({"model": {"slice_context_blur": 2.0}})
    with pytest.raises(ConfigError, match="model.slice_context_fusion must be one of 'channels', 'mean', got 'max'"):
        ExperimentConfig.from_dict({"model": {"slice_context": 1, "slice_context_fusion": "max"}})
    with pytest.raises(ConfigError, match="slice_context_fusion='mean' fuses neighbouring slices; set "
                                          "model.slice_context >= 1"):
        ExperimentConfig.from_dict({"model": {"slice_context_fusion": "mean"}})


def test_blur_smooths_the_neighbours_and_leaves_the_slice_bit_for_bit():
    x = torch.randn(2, 5, 24, 20)
    x[:, :, 12, 10] += 50.0  # a spike in every channel
    y = blur_neighbours(x, 1.5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[:, 2], x[:, 2])  # the slice itself (k = 2): untouched
    for c in (0, 1, 3, 4):
        # The spike spreads: its peak drops, the mean is kept (a normalised kernel, replicated borders).
        assert y[:, c, 12, 10].max() < 0.2 * x[:, c, 12, 10].min()
        assert torch.allclose(y[:, c].mean(), x[:, c].mean(), atol=0.05)
        assert y[:, c].std() < x[:, c].std()
    const = torch.full((1, 3, 16, 16), 3.0)
    assert torch.allclose(blur_neighbours(const, 2.0), const)  # borders replicated: a flat field stays flat
    assert blur_neighbours(x, 0.0) is x
    one = x[:, :1]
    assert blur_neighbours(one, 2.0) is one  # a plain 2D input has no neighbours


def test_mean_fusion_feeds_the_neighbours_mean_in_their_place():
    x = torch.randn(2, 5, 8, 6)
    y = mean_neighbours(x)
    assert y.shape == x.shape and torch.equal(y[:, 2], x[:, 2])
    m = (x[:, 0] + x[:, 1] + x[:, 3] + x[:, 4]) / 4
    for c in (0, 1, 3, 4):
        assert torch.allclose(y[:, c], m, atol=1e-6)
    one = x[:, :1]
    assert mean_neighbours(one) is one


def test_built_network_fuses_its_neighbours_in_every_forward():
    model = {"name": "unet2d", "slice_context": 1, "params": {"filters_base": 4, "filters_max": 8, "max_stages": 3}}
    sharp = build_model(ExperimentConfig.from_dict({"model": model}).model, (32, 32)).eval()
    fused = build_model(ExperimentConfig.from_dict({"model": {**model, "slice_context_fusion": "mean",
                                                              "slice_context_blur": 1.0}}).model, (32, 32))
    fused.load_state_dict(sharp.state_dict())
    fused.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fused(x), sharp(blur_neighbours(mean_neighbours(x), 1.0)), atol=1e-5)
        swapped = x[:, [2, 1, 0]]  # above and below exchanged: the same mean, the same answer
        assert torch.allclose(fused(swapped), fused(x), atol=1e-5)
        assert not torch.allclose(sharp(swapped), sharp(x), atol=1e-3)


def test_built_network_blurs_its_neighbours_in_every_forward(tmp_path):
    model = {"name": "unet2d", "slice_context": 1, "params": {"filters_base": 4, "filters_max": 8, "max_stages": 3}}
    sharp = build_model(ExperimentConfig.from_dict({"model": model}).model, (32, 32)).eval()
    soft = build_model(ExperimentConfig.from_dict({"model": {**model, "slice_context_blur": 2.0}}).model, (32, 32))
    soft.load_state_dict(sharp.state_dict())  # no weights of its own: the same checkpoint loads
    soft.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(soft(x), sharp(blur_neighbours(x, 2.0)), atol=1e-5)
        assert not torch.allclose(soft(x), sharp(x), atol=1e-3)
        flat = x.clone()
        flat[:, 0] = flat[:, 2] = 0.7  # flat neighbours: nothing to smooth
        assert torch.allclose(soft(flat), sharp(flat), atol=1e-5)
    torch.save(soft, tmp_path / "m.pt")  # the hook is a plain class: the network still pickles
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.allclose(again(x), soft(x), atol=1e-6)


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
