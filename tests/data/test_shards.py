import numpy as np
import pyarrow as pa
import pytest

from robustseg.data.cases import Case
from robustseg.data.shards import (
    SliceLayout,
    build_table,
    case_rows,
    decode_images,
    decode_labels,
    delta2d,
    undelta2d,
    encode_image,
    shard_metadata,
    table_to_parquet,
)
from robustseg.data.storage import open_store
from robustseg.data.volumes import decode_volume, volume_table
from robustseg.errors import DataError


def _case(cid="c1", z=3, h=16, w=12, label=True, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(z, h, w)).astype(np.float32)
    img[:, :2] = 0  # padding-like constant rows
    lbl = rng.integers(0, 4, size=(z, h, w)).astype(np.uint8) if label else None
    return Case(case_id=cid, subject_id="s" + cid, image=img, label=lbl, spacing=(1.5, 1.5, 8.0),
                phase="ED", motion_level=2, dataset="syn")


@pytest.mark.parametrize("dtype, filt, tol", [("uint8", "none", 1 / 255 / 2 + 1e-6), ("uint8", "delta2d", 1 / 255 / 2 + 1e-6),
                                              ("float16", "none", 1e-3), ("float32", "none", 0.0)])
def test_encode_decode_precision(dtype, filt, tol):
    case = _case()
    layout = SliceLayout(16, 12, dtype, filt)
    table = build_table([case_rows(case, 0, True, layout)], layout, {})
    dec = decode_images(table, layout)
    rng_per_slice = np.ptp(case.image.reshape(3, -1), axis=1)[:, None, None]
    err = np.abs(dec - case.image)
    if dtype == "float16":
        assert np.all(err <= 1e-3 * np.maximum(1, np.abs(case.image)))
    else:
        assert np.all(err <= tol * rng_per_slice + 1e-6)
    assert np.array_equal(decode_labels(table, layout), case.label)


def test_delta2d_is_lossless_and_wraps():
    q = np.random.default_rng(0).integers(0, 256, size=(3, 7, 5)).astype(np.uint8)
    e = delta2d(q)
    assert e.dtype == np.uint8 and not np.array_equal(e, q)
    assert np.array_equal(undelta2d(e), q)
    with pytest.raises(ValueError, match="uint8 images only"):
        SliceLayout(4, 4, "float16", "delta2d")


def test_constant_slice_decodes_exactly():
    img = np.full((2, 4, 4), -1.25, np.float32)
    enc, scale, offset = encode_image(img, "uint8")
    assert np.array_equal(enc * scale[:, None, None] + offset[:, None, None], img)


def test_rows_columns_and_metadata(tmp_path):
    layout = SliceLayout(16, 12, "uint8")
    a, b = _case("a", z=3), _case("b", z=2, label=False, seed=1)
    table = build_table([case_rows(a, 1, True, layout), case_rows(b, 1, False, layout)], layout, {"fingerprint": "x"})
    assert table.num_rows == 5
    assert table.column("slice_index").to_pylist() == [0, 1, 2, 0, 1]
    assert table.column("n_slices").to_pylist() == [3, 3, 3, 2, 2]
    assert table.column("has_label").to_pylist() == [True] * 3 + [False] * 2
    assert table.column("label").null_count == 2
    assert table.column("motion_level").to_pylist() == [2] * 5
    bits = table.column("classes_present").to_pylist()[0]
    assert bits == sum(1 << c for c in np.unique(a.label[0]) if c > 0)
    store = open_store(str(tmp_path / "store"))
    store.write_bytes("s/part.parquet", table_to_parquet(table, 3))
    md = shard_metadata(store, "s/part.parquet")
    assert md["fingerprint"] == "x" and md["layout"] == {"height": 16, "width": 12, "image_dtype": "uint8", "filter": "none"}
    assert shard_metadata(store, "s/missing.parquet") is None
    store.write_bytes("s/junk.parquet", b"not parquet")
    assert shard_metadata(store, "s/junk.parquet") is None  # damaged files are rewritten, never trusted


def test_layout_mismatch_names_case():
    with pytest.raises(DataError, match=r"synthetic://x: preprocessed size \(16, 12\) differs"):
        c = _case()
        c.source_path = "synthetic://x"
        case_rows(c, 0, True, SliceLayout(8, 8))


def test_volume_rows_round_trip():
    layout = SliceLayout(16, 12, "uint8", "delta2d")
    a, b = _case("a", z=3), _case("b", z=2, label=False, seed=1)
    table = build_table([case_rows(a, 0, True, layout), case_rows(b, 0, True, layout)], layout, {})
    vols = volume_table(table, layout)
    assert vols.num_rows == 2
    rows = vols.to_pylist()
    img, lbl = decode_volume(rows[0], layout)
    assert img.shape == (3, 16, 12) and np.array_equal(lbl, a.label)
    assert np.allclose(img, decode_images(table, layout)[:3])
    img_b, lbl_b = decode_volume(rows[1], layout)
    assert img_b.shape == (2, 16, 12) and lbl_b is None
