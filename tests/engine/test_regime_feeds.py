"""What the fit loop feeds a regime (labelled / images / semi), regime-owned validation, snapshots."""
from typing import Any, Dict, List

import pytest
import torch

from robustseg.engine.checkpoint import load_checkpoint
from robustseg.engine.data import SliceBatcher, load_slice_set
from robustseg.engine.train import ensure_prepared, regime_data, train_from_config
from robustseg.errors import ConfigError
from robustseg.registry import REGIMES
from robustseg.data.storage import open_store
from tiny import tiny_cfg


class _Probe:
    """A regime that records what it is fed and scores epochs itself."""

    seen: List[Dict[str, Any]] = []

    def setup(self, ctx: Any, params: Any) -> None:
        self.ctx = ctx

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        extra = next(self.ctx.unlabelled)["image"] if self.ctx.unlabelled is not None else None
        _Probe.seen.append({"batch": batch["image"].clone(), "unlabelled": extra})
        out = self.ctx.model(batch["image"])
        loss = (out[0] if isinstance(out, (list, tuple)) else out).float().pow(2).mean()
        self.ctx.optimizer.zero_grad()
        loss.backward()
        self.ctx.optimizer.step()
        return {"loss": loss.detach()}

    def validate(self, val_cases: Any) -> Dict[str, float]:
        # Epoch 1 scores best: the best checkpoint must follow this score, not Dice.
        return {"val_score": -float(len(_Probe.seen)), "val_cases_seen": float(len(val_cases))}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


@pytest.fixture()
def probe(monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class NoParams:
        pass

    def register(data: str) -> None:
        monkeypatch.setitem(REGIMES._items, "probe", _Probe)
        monkeypatch.setitem(REGIMES._meta, "probe", {"params": NoParams, "data": data})
        _Probe.seen = []
    return register


@pytest.fixture(scope="module")
def budget_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("feeds")
    cfg = tiny_cfg(root, **{"data.label_budget": 3})
    manifest = ensure_prepared(cfg)
    train = [c for c in manifest.cases if c["fold"] != cfg.data.val_fold]
    # The fixed split must leave both labelled and unlabelled training slices for this test.
    assert any(c["train_labelled"] for c in train) and not all(c["train_labelled"] for c in train)
    return root


def _train_slices(root):
    cfg = tiny_cfg(root, **{"data.label_budget": 3})
    manifest = ensure_prepared(cfg)
    return load_slice_set(open_store(cfg.data.shards_uri), manifest, exclude_folds=[cfg.data.val_fold])


def _members(batch_images, data, mask):
    """Whether each whole-slice image of a batch is one of the slices under ``mask``."""
    pool = data.images[mask].flatten(1)
    return [bool((pool == img.flatten()).all(1).any()) for img in batch_images[:, 0]]


def test_semi_regime_gets_labelled_batches_and_unlabelled_stream(probe, budget_root, tmp_path):
    probe("semi")
    assert regime_data("probe") == "semi" and regime_data("supervised") == "labelled"
    cfg = tiny_cfg(budget_root, **{"data.label_budget": 3, "regime.name": "probe", "optim.snapshot_every": 1,
                                   "optim.epochs": 3})
    result = train_from_config(cfg, out_dir=tmp_path / "run", device=torch.device("cpu"))
    data = _train_slices(budget_root)
    assert len(_Probe.seen) == 9
    for step in _Probe.seen:
        assert all(_members(step["batch"], data, data.labelled))
        assert step["unlabelled"] is not None and all(_members(step["unlabelled"], data, ~data.labelled))
    # The regime's own score picked the best epoch (the first), and Dice validation never ran.
    assert result.best_epoch == 1 and result.best_score == -3.0
    assert all("val_dice" not in h and h["val_cases_seen"] == 2 for h in result.history)
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 1
    snaps = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert snaps == ["epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt"]
    slim = load_checkpoint(tmp_path / "run" / "snapshots" / "epoch_0002.pt")
    assert slim["epoch"] == 2 and "optimizer" not in slim and slim["model"].keys() == \
        load_checkpoint(tmp_path / "run" / "last.pt")["model"].keys()


def test_images_regime_samples_every_training_slice(probe, budget_root, tmp_path):
    probe("images")
    cfg = tiny_cfg(budget_root, **{"data.label_budget": 3, "regime.name": "probe", "optim.epochs": 1,
                                   "optim.iters_per_epoch": 8})
    train_from_config(cfg, out_dir=tmp_path / "run", device=torch.device("cpu"))
    data = _train_slices(budget_root)
    drawn = torch.cat([s["batch"] for s in _Probe.seen])
    unlab = _members(drawn, data, ~data.labelled)
    assert all(_members(drawn, data, torch.ones_like(data.labelled))) and any(unlab) and not all(unlab)
    assert all(s["unlabelled"] is None for s in _Probe.seen)


def test_row_sets_and_errors(budget_root):
    data = _train_slices(budget_root)
    g = torch.Generator().manual_seed(0)
    only = SliceBatcher(data.subset(data.labelled), 4, None, g)
    with pytest.raises(ValueError, match="no unlabelled training slices"):
        SliceBatcher(only.data, 4, None, g, rows="unlabelled")
    with pytest.raises(ValueError, match="rows must be one of"):
        SliceBatcher(data, 4, None, g, rows="some")
    with pytest.raises(ConfigError, match="snapshot_every"):
        tiny_cfg(budget_root, **{"optim.snapshot_every": -1})


def test_semi_regime_refuses_the_ray_stream(probe, budget_root):
    probe("semi")
    cfg = tiny_cfg(budget_root, **{"regime.name": "probe"})
    with pytest.raises(ConfigError, match="in-memory batcher"):
        train_from_config(cfg, train_batches=lambda g, p: iter(()), device=torch.device("cpu"))
