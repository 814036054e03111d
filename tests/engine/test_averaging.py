"""Tail weight averaging (optim.average_from): the mean is exact, served, and survives a kill."""

import pytest
import torch

from robustseg.config import ConfigError
from robustseg.engine.averaging import WeightAverage, build_average
from robustseg.engine.checkpoint import load_checkpoint
from robustseg.engine.predict import load_predictor
from robustseg.engine.train import train_from_config
from tiny import Stop as _Stop, stop_after as _stop_after, tiny_cfg


def test_average_is_the_mean_of_the_chosen_iterates():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    avg = WeightAverage(net, start=2, every=2)
    seen = []
    for it in range(7):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        avg.update(net, it)
        if it >= 2 and (it - 2) % 2 == 0:
            seen.append(net.weight.detach().clone())
    assert avg.count == 3 == len(seen)  # iterations 2, 4, 6
    torch.testing.assert_close(avg.module.weight, torch.stack(seen).mean(0))
    assert not avg.module.weight.requires_grad


def test_inactive_before_start_and_off_when_null():
    net = torch.nn.Linear(2, 2)
    assert build_average(net, None, 1, 100) is None
    avg = build_average(net, 0.75, 1, 100)
    assert avg.start == 75
    avg.update(net, 74)
    assert not avg.active


@pytest.mark.parametrize("key,value,match", [("optim.average_from", "1.0", "average_from must be in"),
                                             ("optim.average_from", "-0.1", "average_from must be in"),
                                             ("optim.average_every", "0", "average_every must be >= 1")])
def test_bad_average_config_is_refused(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(tmp_path, **{key: value})


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    # 2 epochs x 3 iterations; from 0.34 of the run: iterations 2..5 are averaged.
    cfg = tiny_cfg(root, **{"optim.average_from": 0.34})
    res = train_from_config(cfg, out_dir=root / "run", device=torch.device("cpu"))
    return root, cfg, res


def test_checkpoint_serves_the_average_and_keeps_the_trained_weights(averaged):
    root, cfg, res = averaged
    ck = load_checkpoint(res.last_checkpoint)
    assert ck["average"] == {"count": 4}
    assert set(ck["model"]) == set(ck["raw_model"])
    assert any(not torch.equal(ck["model"][k], ck["raw_model"][k]) for k in ck["model"])
    # predict (and so the ensemble and serving) loads the average, not the trained weights
    own = load_predictor(res.last_checkpoint, device=torch.device("cpu")).model.state_dict()
    assert all(torch.equal(own[k], ck["model"][k]) for k in ck["model"])
    # validation scored the average, so best.pt holds the average of its epoch (1 iterate after epoch 1)
    best = load_checkpoint(res.best_checkpoint)
    assert best["average"]["count"] == {1: 1, 2: 4}[best["epoch"]]
    same_as_last = all(torch.equal(best["model"][k], ck["model"][k]) for k in ck["model"])
    assert same_as_last == (best["epoch"] == 2)


def test_resume_mid_average_is_exact(tmp_path, averaged):
    root, cfg, full = averaged
    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        train_from_config(cfg, out_dir=out, device=torch.device("cpu"), callbacks=[_stop_after(1)])
    assert load_checkpoint(out / "last.pt")["average"] == {"count": 1}  # killed with the average begun
    train_from_config(cfg, out_dir=out, device=torch.device("cpu"))
    a, b = load_checkpoint(full.last_checkpoint), load_checkpoint(out / "last.pt")
    assert b["average"] == a["average"]
    for key in ("model", "raw_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_hold_lr_keeps_the_rate_from_where_averaging_starts():
    from robustseg.config import OptimConfig
    from robustseg.engine.optim import lr_factor

    swa = OptimConfig(epochs=4, iters_per_epoch=10, average_from=0.5, average_hold_lr=True)
    tail = OptimConfig(epochs=4, iters_per_epoch=10, average_from=0.5)
    assert [lr_factor(swa, i) for i in (0, 19)] == [lr_factor(tail, i) for i in (0, 19)]  # poly until the start
    held = lr_factor(tail, 20)
    assert held > 0.5 and all(lr_factor(swa, i) == held for i in (20, 30, 39))
    assert lr_factor(tail, 39) < 0.05  # without the hold the poly tail decays to ~0
