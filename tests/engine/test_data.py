import numpy as np
import pytest
import torch

from robustseg.config import DataConfig, SourceSpec
from robustseg.data.manifest import load_case_volume, read_manifest
from robustseg.data.prepare import prepare
from robustseg.data.storage import open_store
from robustseg.engine.data import SliceBatcher, VolumeBatcher, load_slice_set


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cfg = DataConfig(sources=[SourceSpec(name="synthetic_cmr", path="", options={"n_subjects": 4, "motion_levels": [0]})],
                     shards_uri=str(tmp_path_factory.mktemp("d") / "s"), folds=2, label_budget=3)
    cfg.cmr.target_spacing = [1.5, 1.5]
    cfg.cmr.crop_size = [64, 64]
    prepare(cfg)
    st = open_store(cfg.shards_uri)
    return st, read_manifest(st)


def test_slice_set_matches_shards(store):
    st, m = store
    train = load_slice_set(st, m, exclude_folds=[0])
    assert train.images.shape[1:] == (64, 64) and train.images.dtype == torch.float32
    assert set(train.case_ids) == set(m.case_ids(folds=[1]))
    vols = train.volumes()
    v = vols[0]
    image, label = load_case_volume(st, m, v["case_id"])
    assert np.allclose(v["image"].numpy(), image) and np.array_equal(v["label"].numpy(), label)
    assert v["spacing"][0] == pytest.approx(1.5)


def test_slice_batcher_shapes_fg_budget_and_determinism(store):
    st, m = store
    data = load_slice_set(st, m)
    budget = set(m.label_budget["subjects"])
    g = torch.Generator().manual_seed(0)
    b = SliceBatcher(data, 12, None, g, fg_fraction=0.5)
    batch = next(b)
    assert batch["image"].shape == (12, 1, 64, 64) and batch["label"].dtype == torch.int64
    assert all(cid.split("_")[0] in budget for cid in b.data.case_ids)  # only budgeted labels are sampled
    assert (batch["label"][:6] > 0).flatten(1).any(1).all()  # the foreground share has foreground
    again = next(SliceBatcher(data, 12, None, torch.Generator().manual_seed(0), fg_fraction=0.5))
    assert torch.equal(batch["image"], again["image"])
    other = next(SliceBatcher(data, 12, None, torch.Generator().manual_seed(1), fg_fraction=0.5))
    assert not torch.equal(batch["image"], other["image"])


@pytest.mark.parametrize("patch, margin", [((32, 32), (16, 16)), ((32, 32), (24, 8)), (None, (5, 5))])
def test_source_patches_carry_the_same_patch_at_their_centre(store, patch, margin):
    """A margin widens every crop around the SAME sampled patch (no extra draws), with the
    slice's real pixels where they exist and zeros where the margin leaves the slice."""
    st, m = store
    data = load_slice_set(st, m)
    plain = next(SliceBatcher(data, 16, patch, torch.Generator().manual_seed(4), fg_fraction=0.5))
    wide_b = SliceBatcher(data, 16, patch, torch.Generator().manual_seed(4), fg_fraction=0.5, margin=margin)
    wide = next(wide_b)
    my, mx = margin
    h, w = plain["image"].shape[2:]
    assert wide["image"].shape == (16, 1, h + 2 * my, w + 2 * mx)
    assert torch.equal(wide["image"][:, :, my:my + h, mx:mx + w], plain["image"])
    assert torch.equal(wide["label"][:, :, my:my + h, mx:mx + w], plain["label"])
    if patch is None:  # a whole slice: the margin is entirely outside it
        assert wide["image"][:, :, :my].abs().sum() == 0 and wide["label"][:, :, :, -mx:].sum() == 0
    else:  # inside the 64 x 64 slice the margin holds image: most source pixels are non-zero
        assert (wide["image"] != 0).float().mean() > 0.5


def test_patch_crops_keep_alignment_and_foreground(store):
    st, m = store
    data = load_slice_set(st, m)
    b = SliceBatcher(data, 16, (32, 32), torch.Generator().manual_seed(2), fg_fraction=0.5)
    batch = next(b)
    assert batch["image"].shape == (16, 1, 32, 32)
    assert (batch["label"][:8] > 0).flatten(1).any(1).float().mean() >= 0.75
    # crops are real windows of the source slices: find each crop in its slice
    img = batch["image"][0, 0]
    found = False
    for s in b.data.images:
        for y in range(33):
            for x in range(33):
                if torch.equal(s[y:y + 32, x:x + 32], img):
                    found = True
                    break
            if found:
                break
        if found:
            break
    assert found


def test_volume_batcher_slabs(store):
    st, m = store
    data = load_slice_set(st, m)
    vb = VolumeBatcher(data, 3, (4, 64, 64), torch.Generator().manual_seed(0))
    batch = next(vb)
    assert batch["image"].shape == (3, 1, 4, 64, 64) and batch["label"].shape == (3, 1, 4, 64, 64)
    assert (batch["label"][:1] > 0).any()


def test_no_labelled_slices_is_clear(store):
    st, m = store
    data = load_slice_set(st, m)
    with pytest.raises(ValueError, match="no labelled training slices"):
        SliceBatcher(data.subset(torch.zeros(len(data), dtype=torch.bool).logical_or(~data.labelled)), 2, None,
                     torch.Generator())
