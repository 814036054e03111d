"""The mean-teacher regime: EMA math, ramp-up, consistency, pseudo labels, mixup, exact resumption."""
from __future__ import annotations

import math
from itertools import count

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustseg.augment import build_augmenter
from robustseg.config import AugmentConfig, ConfigError, LossConfig, from_dict
from robustseg.engine.checkpoint import CheckpointError
from robustseg.engine.losses import DiceCELoss
from robustseg.errors import DataError
from robustseg.regimes import StepContext
from robustseg.regimes.mean_teacher import (MeanTeacher, MeanTeacherParams, ema_decay, ema_update, make_teacher,
                                            pad_to_multiple, read_pseudo_labels, sigmoid_rampup)
from robustseg.registry import REGIMES

K = 3


class TinyNet(nn.Module):
    """Small conv net (divisible by 4); optional batch norm and deep supervision in train mode."""

    divisible_by, spatial_dims = 4, 2

    def __init__(self, bn: bool = False, deep: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6) if bn else nn.Identity(), nn.ReLU())
        self.head, self.aux, self.deep = nn.Conv2d(6, K, 1), nn.Conv2d(6, K, 1), deep

    def forward(self, x):
        f = self.body(x)
        out = self.head(f)
        return [out, self.aux(F.avg_pool2d(f, 2))] if self.deep and self.training else out


class ConstNet(nn.Module):
    """Logits that are one learnt vector at every pixel: losses have closed forms."""

    divisible_by, spatial_dims = 4, 2

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))

    def forward(self, x):
        return self.b.view(1, K, 1, 1).expand(x.shape[0], K, *x.shape[2:])


def _labelled(i: int, n: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(100 + i)
    label = torch.zeros(n, 1, size, size, dtype=torch.long)
    for k in range(n):  # shapes move from sample to sample, so mixed pairs disagree somewhere
        label[k, :, 1 + k:7 + k, 4:10] = 1
        label[k, :, 10:14, 1 + k:8 + k] = 2
    return {"image": label.float() + 0.3 * torch.randn(label.shape, generator=g), "label": label}


def _unlabelled(i: int, n: int = 4, size: int = 16):
    return {"image": torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(500 + i))}


def _stream(start: int = 0):
    return (_unlabelled(i) for i in count(start))


def _ctx(model, seed=0, augmenter=None, mixup_p=0.0, loss=None, unlabelled="stream"):
    return StepContext(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                       loss_fn=loss or DiceCELoss(LossConfig(), K), augmenter=augmenter or (lambda i, l, g: (i, l)),
                       generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), amp_dtype=None,
                       num_classes=K, mixup_p=mixup_p, mixup_alpha=1.0,
                       unlabelled=_stream() if unlabelled == "stream" else unlabelled)


def _regime(model, ctx=None, **params) -> MeanTeacher:
    params.setdefault("view_intensity", False)
    regime = REGIMES.get("mean_teacher")()
    regime.setup(ctx or _ctx(model), MeanTeacherParams(**params))
    return regime


def _pseudo_file(path, n=5, size=6, **override):
    g = torch.Generator().manual_seed(7)
    soft = torch.softmax(torch.randn(n, K, size, size, generator=g), dim=1)
    data = {"images": torch.randn(n, 1, size, size, generator=g), "soft": soft,
            "similarity": torch.linspace(0.87, 0.96, n), "source": [f"case{i}" for i in range(n)], "meta": {"k": 1}}
    data.update(override)
    for key in [k for k, v in override.items() if v is None]:
        del data[key]
    torch.save(data, path)
    return str(path)


def test_registered_as_a_semi_supervised_regime():
    from robustseg.engine.train import regime_data

    assert REGIMES.get("mean_teacher") is MeanTeacher
    assert REGIMES.meta("mean_teacher")["params"] is MeanTeacherParams
    assert regime_data("mean_teacher") == "semi"


# --------------------------------------------------------------------------- EMA
def test_ema_decay_follows_the_reference_warm_up():
    assert ema_decay(0, 0.99) == 0.0 and ema_decay(1, 0.99) == 0.5 and ema_decay(3, 0.99) == 0.75
    assert ema_decay(1000, 0.99) == 0.99


def test_ema_update_exact_values_and_copied_buffers():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
    student.train()
    student(torch.randn(8, 2))  # non-trivial running statistics
    ema_update(teacher, student, 0.25)
    assert all(torch.equal(p, torch.full_like(p, 2.5)) for p in teacher.parameters())  # 0.25 * 1 + 0.75 * 3
    assert all(torch.equal(t, s) for t, s in zip(teacher.buffers(), student.buffers()))
    assert int(teacher[1].num_batches_tracked) == 1
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_teacher_is_frozen_out_of_the_optimiser_and_follows_the_student():
    torch.manual_seed(0)
    model = TinyNet(bn=True, deep=True)
    regime = _regime(model, decay=0.99)
    opt_ids = {id(p) for g in regime.ctx.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in regime.teacher.parameters()}
    start = [p.detach().clone() for p in model.parameters()]
    for step in (1, 2):
        before = [p.detach().clone() for p in regime.teacher.parameters()]
        parts = regime.train_step(_labelled(step))
        a = min(1 - 1 / (step + 1), 0.99)
        assert float(parts["ema_decay"]) == pytest.approx(a)
        for t, t0, s in zip(regime.teacher.parameters(), before, model.parameters()):
            assert torch.allclose(t, a * t0 + (1 - a) * s.detach(), atol=1e-6)
        assert torch.equal(regime.teacher.body[1].running_mean, model.body[1].running_mean)
    assert any(not torch.equal(p0, p) for p0, p in zip(start, model.parameters()))  # the student learnt
    assert any(not torch.equal(p0, t) for p0, t in zip(start, regime.teacher.parameters()))  # the teacher moved
    assert all(not p.requires_grad and p.grad is None for p in regime.teacher.parameters())
    assert regime.step == 2


def test_decay_after_rampup_switches_once_the_rampup_is_over():
    regime = _regime(TinyNet(), rampup_steps=3, decay=0.5, decay_after_rampup=0.9)
    decays = [float(regime.train_step(_labelled(i))["ema_decay"]) for i in range(5)]
    # step t uses min(1 - 1/(t + 1), d): t = 1, 2 ramp (d = 0.5), t = 3.. after the ramp-up (d = 0.9)
    assert decays == pytest.approx([0.5, 0.5, 0.75, 0.8, 1 - 1 / 6])


def test_the_teacher_of_a_wrapped_model_is_the_plain_module():
    model = TinyNet()

    class Wrapped(nn.Module):  # what torch.compile's OptimizedModule looks like to unwrap
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            return self._orig_mod(x)

    teacher = make_teacher(Wrapped(model))
    assert type(teacher) is TinyNet and teacher is not model


def test_a_teacher_can_be_made_after_a_forward_that_left_non_leaf_tensors_behind():
    class KeepsHeads(TinyNet):  # as MONAI's DynUNet, which keeps its deep-supervision outputs in a list
        def forward(self, x):
            out = super().forward(x)
            self.heads = [out * 2]
            return out

    model = KeepsHeads()
    model(torch.randn(2, 1, 8, 8))
    teacher = make_teacher(model)
    assert not teacher.heads[0].requires_grad and torch.equal(teacher.heads[0], model.heads[0].detach())


# --------------------------------------------------------------------------- ramp-up and consistency
def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(25, 10) == 1.0
    assert sigmoid_rampup(-3, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(0, 0) == 1.0


def test_consistency_weight_ramps_up_with_the_step():
    regime = _regime(TinyNet(), consistency_weight=0.5, rampup_steps=4)
    got = [float(regime.train_step(_labelled(i))["consistency_weight"]) for i in range(6)]
    assert got == pytest.approx([0.5 * sigmoid_rampup(i, 4) for i in range(6)])


def test_consistency_is_zero_for_identical_views_and_weights_and_positive_with_noise():
    torch.manual_seed(1)
    model = TinyNet()
    quiet = _regime(model, noise_std=0.0, augment_unlabelled=False)
    assert float(quiet.train_step(_labelled(0))["consistency"]) < 1e-12  # teacher == student, same view
    torch.manual_seed(1)
    noisy = _regime(TinyNet(), noise_std=0.5, noise_clip=0.0, augment_unlabelled=False)
    assert float(noisy.train_step(_labelled(0))["consistency"]) > 1e-6


def test_views_differ_by_their_own_noise_and_intensity_draws():
    aug = build_augmenter(AugmentConfig(preset="nnunet"), 2)
    regime = _regime(TinyNet(), _ctx(TinyNet(), augmenter=aug), view_intensity=True, noise_std=0.1, noise_clip=0.2)
    x = _unlabelled(0)["image"]
    s, t = regime.views(x)
    assert s.shape == t.shape == x.shape and not torch.equal(s, t)
    regime_plain = _regime(TinyNet(), noise_std=0.1, noise_clip=0.2, augment_unlabelled=False)
    s, t = regime_plain.views(x)
    assert (s - x).abs().max() <= 0.2 + 1e-6 and (t - x).abs().max() <= 0.2 + 1e-6  # clipped noise only
    assert not torch.equal(s, t)


def test_missing_unlabelled_data_is_a_clear_config_error():
    model = TinyNet()
    with pytest.raises(ConfigError, match="unlabelled data.*semi"):
        _regime(model, _ctx(model, unlabelled=None))


# --------------------------------------------------------------------------- pseudo labels
def test_pseudo_label_file_loads_and_is_padded_to_the_size_multiple(tmp_path):
    path = _pseudo_file(tmp_path / "pl.pt", n=5, size=6)
    pl = read_pseudo_labels(path, K)
    assert pl.images.shape == (5, 1, 6, 6) and pl.soft.shape == (5, K, 6, 6) and pl.source[0] == "case0"
    regime = _regime(TinyNet(), pseudo_labels=path)
    assert regime.pseudo.images.shape == (5, 1, 8, 8)  # 6 -> 8, the next multiple of 4
    assert torch.equal(regime.pseudo.images, F.pad(pl.images, [1, 1, 1, 1], mode="reflect"))
    assert torch.equal(regime.pseudo.soft, F.pad(pl.soft, [1, 1, 1, 1], mode="reflect"))
    parts = regime.train_step(_labelled(0))  # patches of another size than the batch: a second forward
    assert float(parts["pseudo_loss"]) > 0


def test_patches_of_the_batch_size_share_its_forward(tmp_path):
    calls = []
    model = TinyNet()
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    regime = _regime(model, pseudo_labels=_pseudo_file(tmp_path / "pl.pt", n=3, size=16), pseudo_batch=2)
    regime.train_step(_labelled(0))
    # The teacher (a deep copy, hook included) on its view, then one student forward of labelled + view + patches.
    assert calls == [4, 4 + 4 + 2]


def test_too_small_patches_replicate_their_edge():
    images, soft = torch.arange(4.0).reshape(1, 1, 2, 2), torch.full((1, 2, 2, 2), 0.5)
    big, big_soft = pad_to_multiple(images, soft, (8, 8))
    assert big.shape == (1, 1, 8, 8) and big_soft.shape == (1, 2, 8, 8)
    assert float(big[0, 0, 0, 0]) == 0.0 and float(big[0, 0, -1, -1]) == 3.0


@pytest.mark.parametrize("override,match", [
    ({"soft": None}, "missing keys"),
    ({"soft": torch.full((4, K, 6, 6), 1 / K)}, "soft must be"),
    ({"soft": torch.full((5, 2, 6, 6), 0.5)}, "2 classes, the model 3"),
    ({"images": torch.full((5, 1, 6, 6), float("nan"))}, "images has non-finite values"),
])
def test_bad_pseudo_label_files_fail_setup_naming_file_and_problem(tmp_path, override, match):
    path = _pseudo_file(tmp_path / "pl.pt", **override)
    with pytest.raises(DataError, match=match) as info:
        _regime(TinyNet(), pseudo_labels=path)
    assert "pl.pt" in str(info.value)
    with pytest.raises(DataError, match="not found"):
        _regime(TinyNet(), pseudo_labels=str(tmp_path / "nope.pt"))


def _const_soft_file(path, vectors, sims):
    soft = torch.tensor(vectors).view(len(vectors), K, 1, 1).expand(len(vectors), K, 6, 6).contiguous()
    return _pseudo_file(path, n=len(vectors), soft=soft, similarity=torch.tensor(sims))


def test_pseudo_loss_is_the_cross_entropy_against_the_soft_masks(tmp_path):
    path = _const_soft_file(tmp_path / "pl.pt", [[0.7, 0.2, 0.1]], [0.9])
    model = ConstNet()
    ce_only = DiceCELoss(LossConfig(dice_weight=0.0, ce_weight=1.0), K)
    regime = _regime(model, _ctx(model, loss=ce_only), pseudo_labels=path, pseudo_batch=2)
    logp = F.log_softmax(model.b.detach(), dim=0)
    expected = -(torch.tensor([0.7, 0.2, 0.1]) * logp).sum()
    got = regime.train_step(_labelled(0))["pseudo_loss"]
    assert float(got) == pytest.approx(float(expected), abs=1e-6)
    assert abs(float(got) - float(-logp[0])) > 0.1  # the hard (argmax) target would give another value


def test_similarity_weighting_weighs_each_drawn_patch(tmp_path):
    vectors, sims = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]], [0.9, 0.3, 0.6]
    path = _const_soft_file(tmp_path / "pl.pt", vectors, sims)
    model = ConstNet()
    ce_only = DiceCELoss(LossConfig(dice_weight=0.0, ce_weight=1.0), K)
    ctx = _ctx(model, loss=ce_only)
    regime = _regime(model, ctx, pseudo_labels=path, pseudo_batch=4, similarity_weighting=True, noise_std=0.0)
    # Nothing else draws before the patches (identity augmenter, no mixup, no noise): replay the draw.
    replay = torch.Generator().manual_seed(0)
    idx = torch.randint(3, (4,), generator=replay)
    logp = F.log_softmax(model.b.detach(), dim=0)
    ce = torch.stack([-(torch.tensor(vectors[i]) * logp).sum() for i in idx.tolist()])
    w = torch.tensor(sims)[idx]
    got = regime.train_step(_labelled(0))["pseudo_loss"]
    assert float(got) == pytest.approx(float((ce * w).sum() / w.sum()), abs=1e-6)
    assert float(got) != pytest.approx(float(ce.mean()), abs=1e-4)


def test_no_pseudo_labels_reports_a_zero_pseudo_loss():
    parts = _regime(TinyNet()).train_step(_labelled(0))
    assert float(parts["pseudo_loss"]) == 0.0
    assert {"loss", "ce", "dice_loss", "consistency", "consistency_weight", "pseudo_loss", "ema_decay"} <= set(parts)
    assert all(not v.requires_grad for v in parts.values())


# --------------------------------------------------------------------------- mixup
class Spy:
    """A loss that records the targets it is given."""

    def __init__(self) -> None:
        self.inner, self.targets = DiceCELoss(LossConfig(), K), []

    def __call__(self, out, target):
        self.targets.append(target)
        return self.inner(out, target)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_mixup_kinds_reach_the_supervised_loss(kind):
    model, spy = TinyNet(), Spy()
    regime = _regime(model, _ctx(model, mixup_p=1.0, loss=spy), mixup=kind)
    regime.train_step(_labelled(0))
    target = spy.targets[0]
    assert target.is_floating_point() and target.shape == (4, K, 16, 16)
    soft = bool(((target > 0) & (target < 1)).any())
    assert soft == (kind == "symmetric")  # asymmetric targets are hard or left out, never soft


def test_mixup_settings_that_contradict_augment_mixup_are_rejected():
    model = TinyNet()
    with pytest.raises(ConfigError, match="augment.mixup is 0.5"):
        _regime(model, _ctx(model, mixup_p=0.5), mixup="none")
    with pytest.raises(ConfigError, match="asymmetric but augment.mixup is 0"):
        _regime(model, _ctx(model, mixup_p=0.0), mixup="asymmetric")
    with pytest.raises(ConfigError, match="mixup_rare_classes"):
        _regime(model, _ctx(model, mixup_p=0.5), mixup="asymmetric", mixup_rare_classes=[3])
    with pytest.raises(ConfigError, match="view_intensity"):
        _regime(model, view_intensity=True)


@pytest.mark.parametrize("params,match", [
    ({"decay": 1.5}, "decay"), ({"rampup_steps": -1}, "rampup_steps"), ({"pseudo_batch": 0}, "pseudo_batch"),
    ({"consistency_weight": -1.0}, "consistency_weight"), ({"mixup": "asym"}, "mixup"),
    ({"mixup_margin": 1.0}, "mixup_margin"), ({"mixup_rare_classes": [1, 1]}, "mixup_rare_classes"),
    ({"decay_after_rampup": 2.0}, "decay_after_rampup"),
])
def test_bad_params_are_config_errors(params, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(MeanTeacherParams, params, "regime.params (mean_teacher)")


# --------------------------------------------------------------------------- state
def _model(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(bn=True, deep=True)


def _full_regime(tmp_path, model, unlabelled) -> MeanTeacher:
    """Every part on: nnU-Net augmentation, intensity views, mixup, padded pseudo labels, ramp-up."""
    ctx = _ctx(model, augmenter=build_augmenter(AugmentConfig(preset="nnunet"), 2), mixup_p=0.5, unlabelled=unlabelled)
    return _regime(model, ctx, view_intensity=True, pseudo_labels=str(tmp_path / "pl.pt"), pseudo_batch=2,
                   rampup_steps=3, decay_after_rampup=0.999)


def test_state_dict_round_trip_continues_identically(tmp_path):
    _pseudo_file(tmp_path / "pl.pt", n=5, size=6)
    straight_model = _model(0)
    straight = _full_regime(tmp_path, straight_model, _stream())
    parts_straight = [straight.train_step(_labelled(i)) for i in range(4)]

    first_model = _model(0)
    first = _full_regime(tmp_path, first_model, _stream())
    for i in range(2):
        first.train_step(_labelled(i))
    saved = {"model": first_model.state_dict(), "optim": first.ctx.optimizer.state_dict(),
             "regime": first.state_dict(), "rng": first.ctx.generator.get_state()}
    # A fresh process, restored in the fit loop's order: model weights, setup, then the states.
    resumed_model = _model(99)
    resumed_model.load_state_dict(saved["model"])
    resumed = _full_regime(tmp_path, resumed_model, _stream(2))
    resumed.ctx.optimizer.load_state_dict(saved["optim"])
    resumed.load_state_dict(saved["regime"])
    resumed.ctx.generator.set_state(saved["rng"])
    assert resumed.step == 2
    parts_resumed = [resumed.train_step(_labelled(i)) for i in range(2, 4)]

    assert all(torch.equal(a, b) for a, b in zip(straight_model.state_dict().values(),
                                                 resumed_model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(straight.teacher.state_dict().values(),
                                                 resumed.teacher.state_dict().values()))
    for a, b in zip(parts_straight[2:], parts_resumed):
        assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    # Without the regime state the teacher would restart from the student: the state matters.
    assert not all(torch.equal(t, s) for t, s in zip(straight.teacher.parameters(), straight_model.parameters()))


def test_load_state_dict_checks_its_keys_and_tolerates_an_empty_state():
    regime = _regime(TinyNet())
    before = {k: v.clone() for k, v in regime.teacher.state_dict().items()}
    regime.load_state_dict({})
    assert all(torch.equal(before[k], v) for k, v in regime.teacher.state_dict().items()) and regime.step == 0
    with pytest.raises(CheckpointError, match="'teacher' and 'step'"):
        regime.load_state_dict({"step": 3})
    with pytest.raises(CheckpointError, match="does not fit"):
        regime.load_state_dict({"teacher": {"head.weight": torch.zeros(1)}, "step": 1})


def test_short_fit_with_unlabelled_slices_keeps_the_teacher_in_the_checkpoint(tmp_path):
    from robustseg.engine.checkpoint import load_checkpoint
    from robustseg.engine.train import train_from_config
    from tiny import tiny_cfg

    cfg = tiny_cfg(tmp_path, **{"optim.epochs": 1, "optim.iters_per_epoch": 2, "regime.name": "mean_teacher",
                                "data.label_budget": 3})
    cfg.regime.params = {"rampup_steps": 2}
    res = train_from_config(cfg, out_dir=tmp_path / "run", device=torch.device("cpu"))
    h = res.history[-1]
    for key in ("loss", "consistency", "consistency_weight", "val_dice"):
        assert math.isfinite(h[key])
    assert h["pseudo_loss"] == 0.0 and h["consistency"] > 0
    ck = load_checkpoint(res.last_checkpoint)
    assert ck["regime"]["step"] == 2 and set(ck["regime"]["teacher"]) == set(ck["model"])


@pytest.mark.parametrize("teacher", [True, False])
def test_fit_validates_and_exports_the_teacher(tmp_path, teacher):
    """best.pt holds the EMA teacher (validate_teacher) or the student; last.pt always the student."""
    import torch

    from robustseg.engine.checkpoint import load_checkpoint
    from robustseg.engine.train import train_from_config
    from tiny import tiny_cfg

    cfg = tiny_cfg(tmp_path, **{"data.label_budget": 3, "regime.name": "mean_teacher", "optim.epochs": 1,
                                "regime.params": {"validate_teacher": teacher, "rampup_steps": 2}})
    train_from_config(cfg, out_dir=tmp_path / "run", device=torch.device("cpu"))
    best, last = load_checkpoint(tmp_path / "run" / "best.pt"), load_checkpoint(tmp_path / "run" / "last.pt")
    expected = last["regime"]["teacher"] if teacher else last["model"]
    assert all(torch.equal(best["model"][k], expected[k]) for k in expected)
    # After 3 EMA updates the teacher differs from the student: the test tells the two apart.
    assert not all(torch.equal(last["regime"]["teacher"][k], last["model"][k]) for k in last["model"])
