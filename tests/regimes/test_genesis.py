"""The Models Genesis regime: registration, params, intensity mapping, learning, validation, 3D."""
from __future__ import annotations

import pytest
import torch

from robustseg.config import ConfigError, ModelConfig, from_dict
from robustseg.models import build_model, size_multiple
from robustseg.regimes import StepContext
from robustseg.regimes.genesis import GenesisParams, GenesisRegime, restoration, to_unit, validation_samples
from robustseg.registry import REGIMES

TINY2D = {"filters_base": 4, "filters_max": 16, "max_stages": 3}
TINY3D = {"filters_base": 4, "filters_max": 8, "max_stages": 3, "ds_heads": 1}


def _model(dims: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if dims == 2:
        return build_model(ModelConfig(name="unet2d", params=TINY2D, in_channels=1, num_classes=4), (48, 48))
    return build_model(ModelConfig(name="unet3d", params=TINY3D, in_channels=1, num_classes=4), (8, 32, 32),
                       (8.0, 1.5, 1.5))


def _regime(model, seed: int = 0, lr: float = 3e-3, augmenter=None, mixup_p: float = 0.0, **params) -> GenesisRegime:
    ctx = StepContext(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr), loss_fn=None,
                      augmenter=augmenter or (lambda i, l, g: (i, l)), generator=torch.Generator().manual_seed(seed),
                      device=torch.device("cpu"), amp_dtype=None, num_classes=4, mixup_p=mixup_p)
    regime = REGIMES.get("genesis")()
    regime.setup(ctx, GenesisParams(**params))
    return regime


def _volume(z: int = 6, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth z-scored-looking slices: a bright disk on a ramp, varying with z, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = []
    for k in range(z):
        cy, cx = size / 2 + 3 * (k % 3) - 3, size / 2 - 2 * (k % 2)
        disk = ((yy - cy) ** 2 + (xx - cx) ** 2 < (size / 5) ** 2).float()
        out.append(1.5 * disk + xx / size - 0.5 + 0.05 * torch.randn(size, size, generator=g))
    return torch.stack(out)


def _cases(n: int = 2, **kw) -> list:
    return [{"image": _volume(seed=i, **kw), "label": torch.zeros(1), "case_id": f"c{i}"} for i in range(n)]


def test_registered_for_image_batches_with_its_params():
    assert REGIMES.get("genesis") is GenesisRegime
    meta = REGIMES.meta("genesis")
    assert meta["params"] is GenesisParams and meta["data"] == "images"


def test_defaults_are_models_genesis_and_documented():
    p = GenesisParams()
    assert (p.flip_p, p.local_p, p.nonlinear_p, p.paint_p, p.outpaint_p) == (0.4, 0.5, 0.9, 0.9, 0.8)
    import dataclasses
    for f in dataclasses.fields(GenesisParams):
        assert f.metadata.get("doc"), f.name
    c = p.corruption()
    assert (c.flip_p, c.local_p, c.nonlinear_p, c.invert_p, c.paint_p, c.outpaint_p) == (0.4, 0.5, 0.9, 0.5, 0.9, 0.8)


@pytest.mark.parametrize("bad", [{"paint_p": 1.5}, {"local_p": -0.1}, {"block_fraction": 0}, {"input_space": "hu"},
                                 {"val_samples": 0}, {"val_crop": True}, {"grad_clip": -1}])
def test_invalid_params_fail(bad):
    with pytest.raises(ConfigError):
        from_dict(GenesisParams, bad, "regime.params")


def test_unknown_param_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="outpaint_p"):
        from_dict(GenesisParams, {"outpaint_rate": 0.8}, "regime.params")


def test_mixup_is_refused():
    with pytest.raises(ConfigError, match="mixup"):
        _regime(_model(), mixup_p=0.5)


def test_to_unit_maps_each_sample_to_the_unit_range_and_back():
    x = torch.stack([_volume(1, 16, 0), 3 * _volume(1, 16, 1) - 7, torch.full((1, 16, 16), 2.0)])
    unit, lo, span = to_unit(x)
    assert unit.shape == x.shape and not torch.isnan(unit).any()
    for s in range(2):
        assert float(unit[s].min()) == 0.0 and float(unit[s].max()) == pytest.approx(1.0)
    assert torch.allclose(unit[:2] * span[:2] + lo[:2], x[:2], atol=1e-5)
    assert torch.equal(unit[2], torch.zeros_like(unit[2]))  # a constant slice: zeros, not NaN


def test_to_unit_ignores_padding():
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:6, 2:6] = torch.linspace(5, 6, 16).reshape(4, 4)
    valid = torch.zeros_like(x, dtype=torch.bool)
    valid[..., 2:6, 2:6] = True
    unit, lo, span = to_unit(x, valid)
    assert float(lo) == 5.0 and float(span) == pytest.approx(1.0)
    assert float(unit[valid].min()) == 0.0 and float(unit[~valid].abs().max()) == 0.0


def test_restoration_takes_channel_0_of_the_full_resolution_head():
    full, coarse = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4, requires_grad=True)
    restored, tie = restoration([full, coarse])
    assert torch.equal(restored, torch.sigmoid(full[:, :1]))
    assert float(tie.detach()) == 0.0 and tie.requires_grad
    assert torch.equal(restoration(full)[0], restored)


@pytest.mark.parametrize("space", ["plan", "unit"])
def test_uncorrupted_input_is_the_image_in_the_chosen_space(space):
    regime = _regime(_model(), input_space=space, flip_p=0, local_p=0, nonlinear_p=0, paint_p=0)
    image = _volume(4, 16)[:, None]
    inp, clean = regime.pair(image, torch.Generator().manual_seed(0))
    unit, _, _ = to_unit(image)
    assert torch.equal(clean, unit)
    assert torch.allclose(inp, image if space == "plan" else unit, atol=1e-5)


def test_step_returns_detached_parts_and_reaches_every_parameter():
    model = _model()
    regime = _regime(model)
    parts = regime.train_step({"image": _volume(4)[:, None]})
    assert set(parts) == {"loss", "mse"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and torch.isfinite(v) for v in parts.values())
    assert 0 < float(parts["mse"]) < 1
    # Deep-supervision heads are tied into the loss with weight 0: every parameter has a gradient (DDP).
    assert all(p.grad is not None for p in model.parameters())


def test_steps_are_reproducible_from_the_generator_seed():
    batch = {"image": _volume(4)[:, None]}
    runs = []
    for _ in range(2):
        regime = _regime(_model(seed=1), seed=7)
        runs.append([float(regime.train_step(batch)["mse"]) for _ in range(2)])
    assert runs[0] == runs[1]
    other = _regime(_model(seed=1), seed=8)
    assert float(other.train_step(batch)["mse"]) != runs[0][0]


def test_training_reduces_the_restoration_error():
    model = _model()
    regime = _regime(model, lr=1e-2, val_samples=6)
    cases = _cases(2, z=3, size=32)
    batch = {"image": torch.cat([c["image"] for c in cases])[:, None]}
    before = regime.validate(cases)
    for _ in range(30):
        regime.train_step(batch)
    after = regime.validate(cases)
    assert after["val_mse"] < 0.7 * before["val_mse"], (before, after)


def test_validate_is_deterministic_and_leaves_the_model_as_it_was():
    model = _model()
    regime = _regime(model, val_samples=5)
    cases = _cases(2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    a, b = regime.validate(cases), regime.validate(cases)
    assert set(a) == {"val_score", "val_mse"} and a == b
    assert a["val_score"] == -a["val_mse"] and a["val_mse"] > 0
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert regime.validate(cases) != _regime(model, val_samples=5, val_seed=1).validate(cases)


def test_validation_samples_are_spread_cropped_and_padded():
    cases = _cases(2, z=5, size=40)
    images, valid = validation_samples(cases, 2, 4, 32, (16, 16))
    assert images.shape == valid.shape == (4, 1, 32, 32)  # 40 -> crop 32, a multiple of 16
    assert bool(valid.all())
    assert torch.equal(images[0, 0], cases[0]["image"][0, 4:36, 4:36])  # centred crop
    assert torch.equal(images[-1, 0], cases[1]["image"][4, 4:36, 4:36])  # first and last slices
    images, valid = validation_samples(cases, 2, 100, 128, (16, 16))
    assert images.shape == (10, 1, 48, 48)  # every slice; 40 padded up to 48
    assert int(valid[0].sum()) == 40 * 40 and not valid[0, 0, :4].any()
    vol, vvalid = validation_samples(cases, 3, 8, 128, (4, 16, 16))
    assert vol.shape == (2, 1, 8, 48, 48) and int(vvalid[0].sum()) == 5 * 40 * 40


def test_augmenter_is_used_only_when_asked():
    calls = []

    def augmenter(image, label, generator):
        calls.append(label.shape)
        return image.flip(-1), label

    batch = {"image": _volume(2, 16)[:, None]}
    _regime(_model(), augmenter=augmenter).train_step(batch)
    assert not calls
    _regime(_model(), augmenter=augmenter, use_augmenter=True).train_step(batch)
    assert calls == [batch["image"].shape]


def test_3d_step_and_validation():
    model = _model(3)
    regime = _regime(model, val_samples=2)
    batch = {"image": torch.stack([_volume(8, 32, s) for s in range(2)])[:, None]}
    parts = regime.train_step(batch)
    assert torch.isfinite(parts["loss"]) and float(parts["mse"]) > 0
    assert len(size_multiple(model)) == 3
    cases = [{"image": _volume(7, 36, s), "label": torch.zeros(1), "case_id": str(s)} for s in range(2)]
    a, b = regime.validate(cases), regime.validate(cases)
    assert a == b and a["val_mse"] > 0


def test_state_dict_round_trips():
    regime = _regime(_model())
    regime.load_state_dict(regime.state_dict())
    assert regime.state_dict() == {}
