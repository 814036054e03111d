import numpy as np
import pytest
import torch

from robustseg.config import DataConfig, SourceSpec
from robustseg.data.manifest import load_case_volume, read_manifest
from robustseg.data.prepare import prepare
from robustseg.data.storage import open_store
from robustseg.engine.data import SliceBatcher, VolumeBatcher, context_rows, load_slice_set


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


def test_context_rows_are_same_case_neighbours_with_repeated_ends(store):
    st, m = store
    data = load_slice_set(st, m)
    ctx = context_rows(data, 2)
    assert ctx.shape == (len(data), 5) and torch.equal(ctx[:, 2], torch.arange(len(data)))
    for i in range(len(data)):
        z = int(data.slice_index[i])
        rows = ctx[i].tolist()
        assert {data.case_ids[r] for r in rows} == {data.case_ids[i]}  # never another case's slice
        n_slices = sum(c == data.case_ids[i] for c in data.case_ids)
        want = [min(max(z + d, 0), n_slices - 1) for d in (-2, -1, 0, 1, 2)]
        assert [int(data.slice_index[r]) for r in rows] == want  # clamped at the volume's ends


@pytest.mark.parametrize("patch, margin", [((32, 32), (8, 8)), (None, (0, 0))])
def test_slice_context_batches_stack_neighbours_around_the_same_patch(store, patch, margin):
    """2.5D batches: the middle channel is exactly the plain batcher's image (same draws), the
    others the same window of the neighbouring slices, which may be unlabelled ones."""
    st, m = store
    data = load_slice_set(st, m)
    plain = next(SliceBatcher(data, 16, patch, torch.Generator().manual_seed(5), fg_fraction=0.5, margin=margin))
    b = SliceBatcher(data, 16, patch, torch.Generator().manual_seed(5), fg_fraction=0.5, margin=margin, context=1)
    batch = next(b)
    assert batch["image"].shape == (16, 3) + plain["image"].shape[2:]
    assert torch.equal(batch["image"][:, 1:2], plain["image"]) and torch.equal(batch["label"], plain["label"])
    assert not torch.equal(batch["image"][:, 0], batch["image"][:, 1])  # real neighbours, not copies
    # Each neighbour channel is a window of the slice next to the sampled one, at the same place.
    vols = {v["case_id"]: v["image"] for v in data.volumes()}
    for i in range(4):
        centre = batch["image"][i, 1]
        for cid, vol in vols.items():
            hits = [z for z in range(vol.shape[0]) if _contains(vol[z], centre)]
            if hits:
                z = hits[0]
                up, down = vol[max(z - 1, 0)], vol[min(z + 1, vol.shape[0] - 1)]
                assert _contains(up, batch["image"][i, 0]) and _contains(down, batch["image"][i, 2])
                break
        else:
            raise AssertionError("the centre patch is not a window of any training slice")


def _contains(slice_hw: torch.Tensor, window: torch.Tensor) -> bool:
    """``window`` (with zero margins allowed) occurs in ``slice_hw`` at some offset."""
    inside = window != 0
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    w = window[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, ww = w.shape
    for y in range(slice_hw.shape[0] - h + 1):
        for x in range(slice_hw.shape[1] - ww + 1):
            if torch.equal(slice_hw[y:y + h, x:x + ww], w):
                return True
    return False


def test_context_dropout_repeats_the_sampled_slice(store):
    """Dropped samples carry their own slice in every channel; the others keep real neighbours;
    the share follows the probability; without context the option does nothing."""
    st, m = store
    data = load_slice_set(st, m)
    all_drop = next(SliceBatcher(data, 32, (32, 32), torch.Generator().manual_seed(6), context=1, context_dropout=1.0))
    x = all_drop["image"]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 2], x[:, 1])
    b = SliceBatcher(data, 256, (32, 32), torch.Generator().manual_seed(6), context=1, context_dropout=0.5)
    x = next(b)["image"]
    same = (x[:, 0] == x[:, 1]).flatten(1).all(1) & (x[:, 2] == x[:, 1]).flatten(1).all(1)
    assert 0.35 < same.float().mean() < 0.65  # about half (an end slice's neighbour may be itself anyway)
    plain = next(SliceBatcher(data, 8, None, torch.Generator().manual_seed(6), context_dropout=0.5))
    assert plain["image"].shape == (8, 1, 64, 64)
