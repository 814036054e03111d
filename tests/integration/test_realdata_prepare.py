"""`prepare` on the real shared data (../shared/data): ACDC, M&Ms-2, COVID slices."""
from collections import defaultdict

import numpy as np
import pytest

from anatomy import assert_lv_inside_myo
from robustseg.config import DataConfig, SourceSpec
from robustseg.data.manifest import load_case_volume, load_slices, read_manifest
from robustseg.data.prepare import prepare
from robustseg.data.preprocess import plan_from_dict
from robustseg.data.shards import decode_labels
from robustseg.data.sources import read_source
from robustseg.data.storage import open_store

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_acdc_all_160_volumes_prepare(shared_data, tmp_path):
    cfg = DataConfig(sources=[SourceSpec(name="acdc_h5", path=str(shared_data("acdc_h5")))],
                     plan="cmr", shards_uri=str(tmp_path / "acdc"), folds=5)
    summary = prepare(cfg)
    assert (summary.cases, summary.subjects) == (160, 80)
    assert summary.bytes < 60 * 2**20, f"ACDC shards are {summary.bytes / 2**20:.1f} MiB"
    store = open_store(cfg.shards_uri)
    m = read_manifest(store)
    folds = defaultdict(set)
    for c in m.cases:
        folds[c["subject_id"]].add(c["fold"])
        assert c["record"]["resample"]["applied"] is False  # h5 stores no spacing
    assert all(len(f) == 1 for f in folds.values())
    assert sorted(f["subjects"] for f in m.fold_summary()) == [16] * 5
    # Canonical remap survives preprocessing and storage: LV sits inside the MYO ring.
    for entry in m.cases[::20]:
        _, label = load_case_volume(store, m, entry["case_id"])
        assert_lv_inside_myo(label, entry["case_id"])
    labels = decode_labels(load_slices(store, m, folds=[0], columns=["label"]), m.layout)
    assert set(np.unique(labels)) == {0, 1, 2, 3}


def test_mnms2_plan_inverts_to_original_grid(shared_data, tmp_path):
    folder = str(shared_data("mnms2_sample"))
    cfg = DataConfig(sources=[SourceSpec(name="mnms", path=folder)], plan="cmr",
                     shards_uri=str(tmp_path / "mnms"), folds=2, stratify=None)
    cfg.cmr.target_spacing = [1.25, 1.25]
    cfg.cmr.crop_size = [320, 320]
    with pytest.raises(Exception, match="cannot make 2 subject-grouped folds from 1 subjects"):
        prepare(cfg)  # one subject cannot make folds: said plainly, nothing written
    assert not any(p.is_file() for p in (tmp_path / "mnms").rglob("*"))

    originals = {c.case_id: c for c in read_source("mnms", folder)}
    plan = plan_from_dict({"name": "cmr", "version": 1, "params": {**cfg.cmr.__dict__}})
    for cid, case in originals.items():
        pc, record = plan.preprocess(case)
        assert pc.spacing == pytest.approx((1.25, 1.25, 10.0), abs=1e-3)
        assert record["foreground_voxels_lost"] == 0
        back = plan.invert_label(pc.label, record)
        assert back.shape == case.label.shape and np.array_equal(back, case.label), cid
        assert_lv_inside_myo(case.label, cid)


def test_covid_slices_prepare(shared_data, tmp_path):
    cfg = DataConfig(sources=[SourceSpec(name="slices2d", path=str(shared_data("covid_semiseg/labeled")))],
                     plan="slices2d", shards_uri=str(tmp_path / "covid"), folds=5, label_budget=10)
    summary = prepare(cfg)
    assert summary.cases == 50 and summary.slices == 50
    m = read_manifest(open_store(cfg.shards_uri))
    assert m.task == "lung_binary" and len(m.label_budget["subjects"]) == 10
    assert sum(c["train_labelled"] for c in m.cases) == 10
    sizes = {tuple(c["original_geometry"]["shape_zyx"]) for c in m.cases}
    assert len(sizes) > 1  # original sizes vary and are recorded for inversion
