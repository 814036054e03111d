"""Synthetic phantoms: anatomy, labels, determinism, motion variants, CT values, sources."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest
from scipy import ndimage as ndi

from robustseg.data.cases import Case, check_unique_ids, validate_case
from robustseg.data.labels import LV, MYO, RV
from robustseg.data.synthetic import (
    ct_phantom,
    make_cardiac_dataset,
    make_cardiac_subject,
    make_ct_dataset,
    make_ct_subject,
)
from robustseg.errors import ConfigError


@pytest.fixture(scope="module")
def cardiac() -> List[Case]:
    """Four subjects, motion levels 0-3 (built once for the module)."""
    return make_cardiac_dataset(4, seed=0, motion_levels=(0, 1, 2, 3))


def _clean(cases: List[Case]) -> List[Case]:
    return [c for c in cases if c.motion_level == 0]


def test_cardiac_case_fields(cardiac: List[Case]) -> None:
    for c in cardiac:
        validate_case(c)
        assert c.image.dtype == np.float32 and c.label.dtype == np.uint8
        assert c.image.ndim == 3 and c.image.shape == c.label.shape and c.image.shape[1:] == (128, 128)
        assert 8 <= c.image.shape[0] <= 12
        assert c.spacing == (1.5, 1.5, 8.0)
        assert set(np.unique(c.label)) == {0, LV, MYO, RV}
        assert (c.modality, c.task, c.dataset) == ("MR", "cardiac", "synthetic")
        assert c.phase in ("ED", "ES")
        suffix = f"_m{c.motion_level}" if c.motion_level else ""
        assert c.case_id == f"{c.subject_id}_{c.phase}{suffix}"
        assert c.source_path == f"synthetic://cardiac/{c.case_id}"
    assert make_cardiac_subject(3, 0)[0].case_id == "syn0003_ED"


def test_ids_group_subjects(cardiac: List[Case]) -> None:
    check_unique_ids(cardiac)
    assert len(cardiac) == 4 * 2 * 4
    by_subject = {}
    for c in cardiac:
        by_subject.setdefault(c.subject_id, []).append(c)
    assert sorted(by_subject) == ["syn0000", "syn0001", "syn0002", "syn0003"]
    for cases in by_subject.values():
        assert {(c.phase, c.motion_level) for c in cases} == {(p, m) for p in ("ED", "ES") for m in range(4)}


def test_lv_inside_myo_ring(cardiac: List[Case]) -> None:
    for c in _clean(cardiac):
        for z in range(c.label.shape[0]):
            lab = c.label[z]
            lv = lab == LV
            assert lv.any(), f"{c.case_id} slice {z}: no LV cavity"
            ys, xs = np.nonzero(lab == MYO)
            cy, cx = ndi.center_of_mass(lv)
            assert ys.min() < cy < ys.max() and xs.min() < cx < xs.max()
            ring = ndi.binary_dilation(lv, iterations=2) & ~lv
            assert np.mean(lab[ring] == MYO) > 0.95


def test_rv_hugs_myo_and_ends_before_apex(cardiac: List[Case]) -> None:
    for c in _clean(cardiac):
        rv_slices = [z for z in range(c.label.shape[0]) if (c.label[z] == RV).any()]
        assert rv_slices and rv_slices[0] == 0, "RV must be present from the base"
        assert not (c.label[-1] == RV).any(), "RV must disappear at the apex"
        for z in rv_slices:
            rv = c.label[z] == RV
            border = ndi.binary_dilation(rv) & ~rv
            assert (c.label[z][border] == MYO).any(), f"{c.case_id} slice {z}: RV does not touch MYO"
            assert not (c.label[z][border] == LV).any(), "RV touches the LV cavity"


def test_structures_shrink_towards_apex(cardiac: List[Case]) -> None:
    for c in _clean(cardiac):
        lv_area = (c.label == LV).sum(axis=(1, 2))
        assert lv_area[-1] == lv_area.min() and lv_area[-1] < 0.6 * lv_area[0]
        assert np.all(np.diff(lv_area) <= 0.03 * lv_area[0])  # non-increasing up to pixel rounding


def test_es_contracts(cardiac: List[Case]) -> None:
    clean = _clean(cardiac)
    for ed, es in zip(clean[0::2], clean[1::2]):
        assert (ed.phase, es.phase, ed.subject_id) == ("ED", "ES", es.subject_id)
        edv, esv = (ed.label == LV).sum(), (es.label == LV).sum()
        assert 0.45 <= 1.0 - esv / edv <= 0.7
        assert (es.label == RV).sum() < (ed.label == RV).sum()
        # Myocardium keeps its volume, so it must be thicker where the cavity shrank.
        ratio = (es.label == MYO).sum() / (ed.label == MYO).sum()
        assert 0.85 < ratio < 1.15


def test_mr_like_intensities(cardiac: List[Case]) -> None:
    for c in _clean(cardiac):
        blood = np.median(c.image[c.label == LV])
        myo = np.median(c.image[c.label == MYO])
        corner = np.median(c.image[:, :6, :6])
        assert blood > 2.0 * myo and myo > 3.0 * corner


def test_deterministic_and_seed_dependent() -> None:
    a = make_cardiac_subject(1, 5)
    b = make_cardiac_subject(1, 5)
    c = make_cardiac_subject(1, 6)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.label, y.label)
    assert not np.array_equal(a[0].image, c[0].image)
    assert make_cardiac_subject(1, 5, n_slices=9)[0].image.shape[0] == 9


def test_motion_variants(cardiac: List[Case]) -> None:
    # Adding motion levels never changes the clean cases.
    clean_only = make_cardiac_dataset(4, seed=0)
    for x, y in zip(clean_only, _clean(cardiac)):
        assert x.case_id == y.case_id and np.array_equal(x.image, y.image)
    assert np.array_equal(make_cardiac_subject(2, 0)[1].image, clean_only[5].image)
    for i in range(0, len(cardiac), 4):
        group = cardiac[i : i + 4]
        assert [c.motion_level for c in group] == [0, 1, 2, 3]
        errors = [float(np.sqrt(np.mean((c.image - group[0].image) ** 2))) for c in group]
        assert errors[0] == 0.0 and errors[1] < errors[2] < errors[3]
        for c in group[1:]:
            assert np.array_equal(c.label, group[0].label)  # the label is the motion-free truth


def test_bad_motion_levels() -> None:
    with pytest.raises(ValueError, match="motion_levels"):
        make_cardiac_dataset(1, motion_levels=(0, 4))


# --------------------------------------------------------------------------- CT
def test_ct_values_and_lesions_in_lungs() -> None:
    for i in range(3):
        ph = ct_phantom(i, 0, multiclass=True)
        assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
        assert abs(float(np.median(ph.image[ph.lungs & (ph.label == 0)])) + 850.0) < 30.0
        assert abs(float(np.median(ph.image[:, :4, :4])) + 1000.0) < 15.0
        assert set(np.unique(ph.label)) <= {0, 1, 2} and (ph.label > 0).any()
        assert np.all(ph.lungs[ph.label > 0]), "lesions must lie inside the lungs"
        if (ph.label == 1).any():
            assert -650.0 < np.median(ph.image[ph.label == 1]) < -350.0
        if (ph.label == 2).any():
            assert -100.0 < np.median(ph.image[ph.label == 2]) < 100.0


def test_ct_cases() -> None:
    binary = make_ct_dataset(3, seed=1)
    multi = make_ct_dataset(3, seed=1, multiclass=True)
    for b, m in zip(binary, multi):
        validate_case(b), validate_case(m)
        assert (b.modality, b.dataset, b.task, m.task) == ("CT", "synthetic_ct", "lung_binary", "lung_multiclass")
        assert set(np.unique(b.label)) == {0, 1}
        assert np.array_equal(b.label, (m.label > 0).astype(np.uint8))
        assert np.array_equal(b.image, m.image)
        assert b.spacing == (1.0, 1.0, 5.0) and b.case_id == b.subject_id
    check_unique_ids(binary)
    again = make_ct_subject(2, 1)
    assert np.array_equal(again.image, binary[2].image)
    assert not np.array_equal(make_ct_subject(2, 2).image, again.image)


# --------------------------------------------------------------------------- sources
def test_sources_registered_and_read() -> None:
    from robustseg.data.sources import SOURCES, read_source

    assert "synthetic_cmr" in SOURCES and "synthetic_ct" in SOURCES
    cases = list(read_source("synthetic_cmr", "", n_subjects=2, motion_levels=[0, 2]))
    assert len(cases) == 2 * 2 * 2
    assert {c.motion_level for c in cases} == {0, 2}
    # CLI-style string options are coerced.
    small = list(read_source("synthetic_cmr", "", n_subjects="1", motion_levels="0,3", size="64x48", seed="2"))
    assert [c.case_id for c in small] == ["syn0000_ED", "syn0000_ED_m3", "syn0000_ES", "syn0000_ES_m3"]
    assert small[0].image.shape[1:] == (64, 48)
    ct = list(read_source("synthetic_ct", "", n_subjects="2", multiclass="true"))
    assert [c.task for c in ct] == ["lung_multiclass"] * 2


def test_source_options_fail_clearly() -> None:
    from robustseg.data.sources import read_source

    with pytest.raises(ConfigError, match="n_subjects"):
        read_source("synthetic_cmr", "", n_subjects="many")
    with pytest.raises(ConfigError, match="motion_levels"):
        read_source("synthetic_cmr", "", motion_levels=[0, 5])
    with pytest.raises(ConfigError, match="multiclass"):
        read_source("synthetic_ct", "", multiclass="perhaps")
