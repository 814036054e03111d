"""Ray Data streaming of slice shards: fold rows, label budget, bit-exact decode, S3."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from robustseg.config import DataConfig, SourceSpec, StorageConfig
from robustseg.data.manifest import load_slices, read_manifest
from robustseg.data.prepare import prepare
from robustseg.data.shards import decode_images, decode_labels
from robustseg.data.storage import open_store

pytestmark = pytest.mark.slow

KEYS = ("case_id", "slice_index", "image", "image_scale", "image_offset", "label")


def _data_cfg(uri: str, storage: StorageConfig = None) -> DataConfig:
    cfg = DataConfig(
        sources=[SourceSpec(name="synthetic_cmr", path="", options={"n_subjects": 4, "motion_levels": [0]})],
        plan="cmr", shards_uri=uri, folds=2, slices_per_shard=16, label_budget=3,
    )
    cfg.cmr.target_spacing = [1.5, 1.5]
    cfg.cmr.crop_size = [64, 64]
    if storage is not None:
        cfg.storage = storage
    return cfg


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    cfg = _data_cfg(str(tmp_path_factory.mktemp("stream") / "shards"))
    prepare(cfg)
    store = open_store(cfg.shards_uri)
    return cfg, store, read_manifest(store)


def _collect(ray, ds) -> pa.Table:
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return table.sort_by([("case_id", "ascending"), ("slice_index", "ascending")])


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("case_id", "ascending"), ("slice_index", "ascending")])


def test_fold_rows_match_manifest(ray_session, local_store):
    from robustseg.data.streaming import labelled_rows, slice_dataset

    cfg, store, m = local_store
    ds = slice_dataset(cfg, m, exclude_folds=[0], labelled_only=False, columns=KEYS)
    got = _collect(ray_session, ds)
    want = _sorted(load_slices(store, m, exclude_folds=[0], columns=list(KEYS)))
    assert got.num_rows == want.num_rows == sum(c["n_slices"] for c in m.cases if c["fold"] == 1)
    assert got.column("case_id").to_pylist() == want.column("case_id").to_pylist()
    assert got.column("slice_index").to_pylist() == want.column("slice_index").to_pylist()
    assert np.array_equal(decode_images(got, m.layout), decode_images(want, m.layout))
    assert np.array_equal(decode_labels(got, m.layout), decode_labels(want, m.layout))
    assert set(got.column_names) == set(KEYS)  # only what was asked for is read
    # The default selection is exactly what a training step needs.
    default = slice_dataset(cfg, m, folds=[1])
    assert set(default.columns()) == {"image", "image_scale", "image_offset", "label"}
    assert default.count() == labelled_rows(m, folds=[1])


def test_label_budget_filter(ray_session, local_store):
    from robustseg.data.streaming import labelled_rows, slice_dataset

    cfg, store, m = local_store
    full = load_slices(store, m, folds=[1], columns=list(KEYS) + ["train_labelled"])
    flags = np.asarray(full.column("train_labelled").to_pylist())
    assert 0 < flags.sum() < len(flags)  # the budget left one subject of fold 1 unlabelled
    want = _sorted(full.filter(pc.field("train_labelled")))
    got = _collect(ray_session, slice_dataset(cfg, m, folds=[1], labelled_only=True, columns=KEYS))
    assert got.column("case_id").to_pylist() == want.column("case_id").to_pylist()
    assert np.array_equal(decode_labels(got, m.layout), decode_labels(want, m.layout))
    assert got.num_rows == labelled_rows(m, folds=[1])
    with pytest.raises(ValueError, match="no slice shards"):
        slice_dataset(cfg, m, folds=[7])


def test_batches_are_bit_exact_and_infinite(ray_session, local_store):
    from robustseg.data.streaming import RayDataBatches, slice_dataset

    cfg, store, m = local_store
    ref = load_slices(store, m, exclude_folds=[0], columns=list(KEYS) + ["train_labelled"])
    ref = ref.filter(pc.field("train_labelled"))
    images, labels = decode_images(ref, m.layout), decode_labels(ref, m.layout)
    by_image = {images[i].tobytes(): labels[i] for i in range(len(images))}
    n, bs = len(images), 4

    # Materialised once: the passes below then re-iterate blocks instead of re-reading files.
    ds = slice_dataset(cfg, m, exclude_folds=[0]).materialize()
    batches = RayDataBatches(ds, m.layout, bs, torch.device("cpu"), local_shuffle_buffer_size=8, seed=0)
    seen = []
    for _ in range(n // bs):  # one full pass (drop_last)
        b = next(batches)
        assert b["image"].shape == (bs, 1, 64, 64) and b["image"].dtype == torch.float32
        assert b["label"].shape == (bs, 1, 64, 64) and b["label"].dtype == torch.int64
        for img, lbl in zip(b["image"][:, 0].numpy(), b["label"][:, 0].numpy()):
            key = img.tobytes()
            assert key in by_image, "a streamed slice differs from decode_images of the shard"
            assert np.array_equal(lbl, by_image[key])
            seen.append(key)
    assert len(set(seen)) == len(seen) == (n // bs) * bs  # no row twice within a pass
    assert batches.passes == 0
    for _ in range(n // bs + 1):  # keeps going past the end of the data
        next(batches)
    assert batches.passes >= 1
    batches.close()

    crops = RayDataBatches(ds, m.layout, bs, torch.device("cpu"), patch_size=(32, 48),
                           generator=torch.Generator().manual_seed(0))
    b = next(crops)
    assert b["image"].shape == (bs, 1, 32, 48) and b["label"].shape == (bs, 1, 32, 48)
    assert set(np.unique(b["label"].numpy())) <= {0, 1, 2, 3}
    crops.close()

    too_big = RayDataBatches(ds, m.layout, n + 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(too_big)


def test_stream_from_s3(ray_session, local_store, s3_endpoint):
    from robustseg.data.streaming import RayDataBatches, slice_dataset

    lcfg, lstore, lman = local_store
    storage = StorageConfig(endpoint_url=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1")
    cfg = _data_cfg("s3://robustseg-stream/syn", storage)
    prepare(cfg)
    m = read_manifest(open_store(cfg.shards_uri, cfg.storage))
    got = _collect(ray_session, slice_dataset(cfg, m, exclude_folds=[0], columns=KEYS))
    want = _sorted(load_slices(lstore, lman, exclude_folds=[0], columns=list(KEYS) + ["train_labelled"])
                   .filter(pc.field("train_labelled")))
    assert got.num_rows == want.num_rows > 0
    assert np.array_equal(decode_images(got, m.layout), decode_images(want, lman.layout))
    assert np.array_equal(decode_labels(got, m.layout), decode_labels(want, lman.layout))
    batches = RayDataBatches(slice_dataset(cfg, m, exclude_folds=[0]), m.layout, 4, torch.device("cpu"))
    assert next(batches)["image"].shape == (4, 1, 64, 64)
    batches.close()


def test_weighted_stream_gives_each_dataset_its_share(ray_session, local_store):
    """data.sampling_weights under Ray Data: rows are thinned per dataset to the weighted share."""
    from robustseg.data.streaming import RayDataBatches, acceptance_rates

    cfg, store, m = local_store
    ref = load_slices(store, m, exclude_folds=[0], columns=list(KEYS) + ["train_labelled"])
    ref = ref.filter(pc.field("train_labelled")).select(["image", "image_scale", "image_offset", "label"])
    n = ref.num_rows
    n_target = max(2, n // 5)  # a small target set beside a larger pool
    names = ["target"] * n_target + ["pool"] * (n - n_target)
    table = ref.append_column("dataset", pa.array(names))
    images = decode_images(table, m.layout)
    source = {images[i].tobytes(): names[i] for i in range(n)}

    rates = acceptance_rates({"target": n_target, "pool": n - n_target}, {"target": 1.0, "pool": 1.0})
    assert rates["target"] == 1.0 and rates["pool"] == pytest.approx(n_target / (n - n_target))
    ds = ray_session.data.from_arrow(table)
    batches = RayDataBatches(ds, m.layout, 4, torch.device("cpu"), local_shuffle_buffer_size=8, seed=3, accept=rates)
    got = [source[img.tobytes()] for _ in range(60) for img in next(batches)["image"][:, 0].numpy()]
    share = got.count("target") / len(got)
    assert len(got) == 240 and 0.4 < share < 0.6, share  # unweighted it would be ~n_target / n (0.2)
    batches.close()
    with pytest.raises(Exception, match="not in the training data"):
        acceptance_rates({"pool": 10}, {"target": 1.0})
