import math

import pytest
import torch

from robustseg.config import LossConfig, OptimConfig
from robustseg.engine.losses import DiceCELoss, ds_weights, resize_target, to_soft
from robustseg.engine.optim import build_optimizer, build_scheduler, lr_factor


def test_ds_weights_nnunet_style():
    assert ds_weights(1, 0.5) == [1.0]
    w = ds_weights(4, 0.5)
    assert w[-1] == 0 and sum(w) == pytest.approx(1) and w[0] > w[1] > w[2]
    assert w[0] / w[1] == pytest.approx(2)


def test_perfect_prediction_has_low_loss_and_wrong_high():
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[:, :, 2:6, 2:6] = 1
    good = (to_soft(target, 3) * 20 - 10)  # confident and correct logits
    bad = torch.roll(good, 1, dims=1)
    loss = DiceCELoss(LossConfig(), 3)
    lg, parts = loss(good, target)
    lb, _ = loss(bad, target)
    assert float(lg) < 0.05 < 1.0 < float(lb)
    assert set(parts) == {"ce", "dice_loss"} and parts["ce"].requires_grad is False


def test_batch_dice_ignores_a_structure_missing_from_one_sample():
    # Sample 0 holds class 1, sample 1 does not; the model puts a little class-1 mass on sample 1.
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[0, :, 2:6, 2:6] = 1
    logits = to_soft(target, 2) * 20 - 10
    logits[1, 1] = -2.0  # ~2 % class 1 everywhere on the empty sample
    per_sample = DiceCELoss(LossConfig(batch_dice=False, ce_weight=0), 2)(logits, target)[1]["dice_loss"]
    batch = DiceCELoss(LossConfig(ce_weight=0), 2)(logits, target)[1]["dice_loss"]
    assert LossConfig().batch_dice  # the default, as nnU-Net 2D and MONAI's batch=True
    assert float(per_sample) > 0.45  # the empty sample's Dice is ~0 and weighs half
    assert float(batch) < 0.1  # over the batch the stray mass is a small false positive
    p1 = torch.softmax(logits, 1)[:, 1]
    expected = 1 - 2 * float((p1 * (target[:, 0] == 1)).sum()) / (float(p1.sum()) + 16)
    assert float(batch) == pytest.approx(expected, abs=1e-4)


def test_soft_targets_equal_hard_for_one_hot():
    target = torch.randint(0, 4, (2, 1, 6, 6))
    logits = torch.randn(2, 4, 6, 6)
    loss = DiceCELoss(LossConfig(), 4)
    hard, _ = loss(logits, target)
    soft, _ = loss(logits, to_soft(target, 4))
    assert float(hard) == pytest.approx(float(soft), rel=1e-5)


def test_deep_supervision_heads_resize_targets_and_gradients_flow():
    target = torch.randint(0, 4, (2, 1, 16, 16))
    heads = [torch.randn(2, 4, s, s, requires_grad=True) for s in (16, 8, 4)]
    loss, _ = DiceCELoss(LossConfig(), 4)(heads, target)
    loss.backward()
    assert heads[0].grad is not None and heads[1].grad is not None
    assert heads[2].grad is None  # the coarsest head weighs 0 (nnU-Net)
    no_ds, _ = DiceCELoss(LossConfig(deep_supervision=False), 4)(heads, target)
    single, _ = DiceCELoss(LossConfig(), 4)(heads[0], target)
    assert float(no_ds.detach()) == pytest.approx(float(single.detach()))


def test_resize_target_keeps_label_values():
    t = torch.randint(0, 4, (1, 1, 9, 9))
    r = resize_target(t, (4, 4))
    assert r.dtype == t.dtype and set(r.unique().tolist()) <= set(t.unique().tolist())


def test_loss_weights_validated():
    with pytest.raises(Exception, match="not both 0"):
        LossConfig(dice_weight=0, ce_weight=0)


@pytest.mark.parametrize("name, cls, extra", [("sgd_nesterov", torch.optim.SGD, {"nesterov": True}),
                                              ("sgd", torch.optim.SGD, {"nesterov": False}),
                                              ("adamw", torch.optim.AdamW, {}), ("adam", torch.optim.Adam, {})])
def test_optimizers(name, cls, extra):
    opt = build_optimizer(OptimConfig(name=name, lr=0.05, weight_decay=1e-4), [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.05
    for k, v in extra.items():
        assert opt.param_groups[0][k] == v


def test_schedules():
    poly = OptimConfig(schedule="poly", epochs=10, iters_per_epoch=10)
    assert lr_factor(poly, 0) == 1 and lr_factor(poly, 50) == pytest.approx(0.5 ** 0.9)
    assert 0 < lr_factor(poly, 99) < 0.02
    step = OptimConfig(name="adam", lr=2e-4, schedule="step", step_every=25, step_gamma=0.8, epochs=100, iters_per_epoch=4)
    assert lr_factor(step, 24 * 4) == 1 and lr_factor(step, 25 * 4) == pytest.approx(0.8)
    assert lr_factor(step, 75 * 4) == pytest.approx(0.8 ** 3)
    cos = OptimConfig(schedule="cosine", epochs=2, iters_per_epoch=5)
    assert lr_factor(cos, 5) == pytest.approx(0.5) and lr_factor(cos, 10) == pytest.approx(0)
    opt = build_optimizer(poly, [torch.nn.Parameter(torch.zeros(1))])
    sched = build_scheduler(poly, opt)
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(poly.initial_lr * 0.5 ** 0.9)
