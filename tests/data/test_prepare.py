"""The prepare pipeline end to end on synthetic data (local store)."""
import json
from collections import defaultdict

import numpy as np
import pytest

from robustseg.config import DataConfig, SourceSpec, StorageConfig
from robustseg.data import prepare as prepare_mod
from robustseg.data.manifest import load_case_volume, load_slices, read_manifest
from robustseg.data.prepare import prepare
from robustseg.data.preprocess import build_plan
from robustseg.data.shards import decode_labels
from robustseg.data.sources import read_source
from robustseg.data.storage import LOCK_FILE, open_store
from robustseg.errors import ConfigError, DataError, StorageError


def _cfg(uri, **kw) -> DataConfig:
    cfg = DataConfig(
        sources=[SourceSpec(name="synthetic_cmr", path="", options={"n_subjects": 6, "motion_levels": [0, 3]})],
        plan="cmr", shards_uri=str(uri), folds=3, slices_per_shard=50, **kw,
    )
    cfg.cmr.target_spacing = [1.5, 1.5]
    cfg.cmr.crop_size = [96, 96]
    return cfg


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cfg = _cfg(root / "shards", store_volumes=True)
    summary = prepare(cfg)
    store = open_store(cfg.shards_uri)
    return cfg, summary, store, read_manifest(store)


def test_summary_and_manifest(prepared):
    cfg, summary, store, m = prepared
    assert summary.cases == 6 * 2 * 2 and summary.subjects == 6
    assert summary.slices == m.n_slices == sum(c["n_slices"] for c in m.cases)
    assert summary.bytes == m.total_bytes > 0
    assert m.task == "cardiac" and m.class_names == {"0": "background", "1": "LV", "2": "MYO", "3": "RV"}
    assert (m.layout.height, m.layout.width, m.layout.image_dtype) == (96, 96, "uint8")
    assert json.loads(store.read_bytes("plan.json")) == m.plan
    assert m.plan["name"] == "cmr"
    slice_shards = [s for s in m.shards if s["kind"] == "slices"]
    assert all(s["rows"] <= 50 or len(s["cases"]) == 1 for s in slice_shards)
    assert len([s for s in m.shards if s["kind"] == "volumes"]) == len(slice_shards)


def test_subjects_grouped_in_one_fold(prepared):
    _, _, _, m = prepared
    by_subject = defaultdict(set)
    for c in m.cases:
        by_subject[c["subject_id"]].add(c["fold"])
    assert all(len(f) == 1 for f in by_subject.values())
    assert {c["fold"] for c in m.cases} == {0, 1, 2}
    for s in m.shards:  # shards never mix folds
        assert {m.case(cid)["fold"] for cid in s["cases"]} == {s["fold"]}


def test_fold_filtering_reads_only_that_fold(prepared):
    _, _, store, m = prepared
    t = load_slices(store, m, folds=[1], columns=["case_id", "fold", "subject_id"])
    assert set(t.column("fold").to_pylist()) == {1}
    assert set(t.column("case_id").to_pylist()) == set(m.case_ids(folds=[1]))
    rest = load_slices(store, m, exclude_folds=[1], columns=["fold"])
    assert 1 not in set(rest.column("fold").to_pylist())
    assert t.num_rows + rest.num_rows == m.n_slices


def test_volume_reassembly_and_plan_inversion(prepared):
    cfg, _, store, m = prepared
    plan = build_plan(cfg)
    originals = {c.case_id: c for c in read_source("synthetic_cmr", "", n_subjects=6, motion_levels=[0, 3])}
    for entry in m.cases[:4]:
        image, label = load_case_volume(store, m, entry["case_id"])
        assert image.shape == (entry["n_slices"], 96, 96) and label.dtype == np.uint8
        pc, _ = plan.preprocess(originals[entry["case_id"]])
        assert np.array_equal(label, pc.label)
        assert np.abs(image - pc.image).max() <= (pc.image.max() - pc.image.min()) / 255
        if entry["record"].get("foreground_voxels_lost", 0) == 0:
            back = plan.invert_label(label, entry["record"])
            assert np.array_equal(back, originals[entry["case_id"]].label)


def test_rerun_skips_then_rewrites_changed(tmp_path):
    cfg = _cfg(tmp_path / "s")
    first = prepare(cfg)
    again = prepare(cfg)
    assert again.shards_written == 0 and again.shards_skipped == first.shards_written
    assert not again.committed and again.generation == first.generation == 1  # a cheap no-op
    cfg.cmr.normalization = "minmax"  # a plan change invalidates every shard...
    with pytest.raises(ConfigError, match=r"already holds a dataset prepared with different settings "
                                          r"\(plan.params.normalization: 'zscore' -> 'minmax'\).*--force"):
        prepare(cfg)  # ...and is refused without overwrite, naming the store and the difference
    changed = prepare(cfg, overwrite=True)
    assert changed.shards_written == first.shards_written and changed.generation == 2
    cfg.slices_per_shard = 1000  # regrouping (storage only, same data): allowed; stale shards are removed
    regrouped = prepare(cfg)
    store = open_store(cfg.shards_uri)
    m = read_manifest(store)
    assert sorted(store.list("slices")) == sorted(s["path"] for s in m.shards)
    assert regrouped.shards_written == len(m.shards) == 3


def test_label_budget_marks_training_labels(tmp_path):
    cfg = _cfg(tmp_path / "s", label_budget=2)
    prepare(cfg)
    store = open_store(cfg.shards_uri)
    m = read_manifest(store)
    assert len(m.label_budget["subjects"]) == 2
    for c in m.cases:
        assert c["has_label"]
        assert c["train_labelled"] == (c["subject_id"] in m.label_budget["subjects"])
    t = load_slices(store, m, columns=["train_labelled", "has_label", "subject_id"])
    assert set(t.column("has_label").to_pylist()) == {True}
    labelled_subjects = {s for s, tl in zip(t.column("subject_id").to_pylist(), t.column("train_labelled").to_pylist()) if tl}
    assert labelled_subjects == set(m.label_budget["subjects"])


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path / "s")
    real = prepare_mod.case_rows
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 10:
            raise DataError("synthetic://boom", "simulated failure after some shards")
        return real(*a, **k)

    monkeypatch.setattr(prepare_mod, "case_rows", flaky)
    with pytest.raises(DataError, match="simulated failure"):
        prepare(cfg)
    root = tmp_path / "s"
    assert not (root / "manifest.json").exists()
    assert [p for p in root.rglob("*") if p.is_file() and p.name != LOCK_FILE] == []


def test_bad_input_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path / "s")
    cfg.sources = cfg.sources + cfg.sources  # the same subjects twice -> duplicate case ids
    with pytest.raises(DataError, match="duplicate case id 'syn0000_ED'"):
        prepare(cfg)
    assert not any(p.is_file() for p in (tmp_path / "s").rglob("*"))


def test_no_sources_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="no sources given"):
        prepare(DataConfig(shards_uri=str(tmp_path / "x")))
    with pytest.raises(KeyError, match="unknown source 'dicom'"):
        prepare(DataConfig(sources=[SourceSpec(name="dicom", path="x")], shards_uri=str(tmp_path / "y")))


def test_unreachable_store_fails_before_reading(monkeypatch):
    from conftest import free_port

    port = free_port()
    cfg = _cfg("s3://bucket/x")
    cfg.storage = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", access_key="a", secret_key="b", connect_timeout_s=1)
    monkeypatch.setattr(prepare_mod, "read_cases", lambda *a, **k: pytest.fail("read before the store was checked"))
    with pytest.raises(StorageError, match="s3://bucket/x: object store unreachable"):
        prepare(cfg)


def test_budget_holdout_validates_on_the_labelled_rest(tmp_path):
    """budget_split=holdout: fold 0 = labelled subjects outside the budget, fold 1 = budget + unlabelled."""
    from robustseg.config import DataConfig, SourceSpec
    from robustseg.data.manifest import read_manifest
    from robustseg.data.prepare import prepare
    from robustseg.data.storage import open_store
    from robustseg.errors import ConfigError

    cfg = DataConfig(sources=[SourceSpec(name="synthetic_cmr", path="", options={"n_subjects": 5, "motion_levels": [0]})],
                     plan="cmr", shards_uri=str(tmp_path / "s"), folds=2, label_budget=2, budget_split="holdout")
    cfg.cmr.crop_size = [32, 32]
    prepare(cfg)
    cases = read_manifest(open_store(cfg.shards_uri)).cases
    train = {c["subject_id"] for c in cases if c["fold"] == 1}
    val = {c["subject_id"] for c in cases if c["fold"] == 0}
    assert len(train) == 2 and len(val) == 3 and not train & val
    assert all(c["train_labelled"] for c in cases if c["fold"] == 1)
    with pytest.raises(ConfigError, match="needs data.label_budget, data.folds: 2"):
        DataConfig(folds=5, label_budget=2, budget_split="holdout")
    with pytest.raises(ConfigError, match="needs data.label_budget"):
        DataConfig(folds=2, budget_split="holdout")
