"""NIfTI sources (acdc_nifti, mnms, cmrxmotion, ct_nifti) on tiny files written with SimpleITK."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from robustseg.data.cases import validate_case
from robustseg.data.labels import LV, MYO, RV
from robustseg.data.sources import read_source
from robustseg.errors import ConfigError, DataError


from anatomy import assert_lv_inside_myo, ring_slice

SPACING = (1.5, 1.25, 8.0)
ORIGIN = (10.0, -5.0, 2.0)
ACDC_STACK = np.stack([ring_slice()] * 3)  # ACDC values: 1 RV, 2 MYO, 3 LV
MNMS_STACK = np.choose(ACDC_STACK, [0, 3, 2, 1]).astype(np.uint8)  # 1 LV, 2 MYO, 3 RV == canonical


def nii(path: Path, array: np.ndarray, spacing: Sequence[float] = SPACING, origin: Sequence[float] = ORIGIN) -> Path:
    """Write a 3D (or 4D, as a series of volumes) array as NIfTI with SimpleITK."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 4:
        image = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])
        image.SetSpacing(list(spacing) + [1.0])
        image.SetOrigin(list(origin) + [0.0])
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def mri(shape=(3, 32, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32) * 500


def read_all(name: str, path: Path, **options) -> list:
    return list(read_source(name, str(path), **options))


def data_error(name: str, path: Path, **options) -> str:
    with pytest.raises(DataError) as err:
        read_all(name, path, **options)
    return str(err.value)


def assert_canonical(label: Optional[np.ndarray]) -> None:
    assert label is not None and label.dtype == np.uint8
    assert np.array_equal(label == LV, ACDC_STACK == 3) and np.array_equal(label == RV, ACDC_STACK == 1)
    assert np.array_equal(label == MYO, ACDC_STACK == 2)


# --- acdc_nifti --------------------------------------------------------------------------


@pytest.fixture
def acdc_root(tmp_path: Path) -> Path:
    for number, es in (("001", 3), ("002", 5)):
        folder = tmp_path / f"patient{number}"
        folder.mkdir()
        (folder / "Info.cfg").write_text(f"ED: 1\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
        for frame in (1, es):
            nii(folder / f"patient{number}_frame{frame:02d}.nii.gz", mri(seed=frame))
            nii(folder / f"patient{number}_frame{frame:02d}_gt.nii.gz", ACDC_STACK)
        nii(folder / f"patient{number}_4d.nii.gz", np.stack([mri()] * 2))
    return tmp_path


def test_acdc_nifti_cases(acdc_root: Path) -> None:
    cases = read_all("acdc_nifti", acdc_root)
    assert [c.case_id for c in cases] == [
        "acdc_patient001_ED", "acdc_patient001_ES", "acdc_patient002_ED", "acdc_patient002_ES",
    ]
    es = cases[3]
    assert es.subject_id == "acdc_patient002" and es.phase == "ES" and es.meta["frame"] == 5
    assert es.meta["group"] == "DCM" and es.meta["height_cm"] == 184.0 and es.meta["original_convention"] == "acdc"
    assert es.spacing_known and np.allclose(es.spacing, SPACING) and np.allclose(es.origin, ORIGIN)
    assert es.source_path.endswith("patient002_frame05.nii.gz") and es.dataset == "acdc"
    assert_canonical(es.label)
    validate_case(es)


def test_acdc_nifti_single_patient_folder(acdc_root: Path) -> None:
    assert [c.case_id for c in read_all("acdc_nifti", acdc_root / "patient002")] == [
        "acdc_patient002_ED", "acdc_patient002_ES",
    ]


def test_acdc_nifti_info_and_missing_files(acdc_root: Path) -> None:
    folder = acdc_root / "patient002"
    (folder / "patient002_frame05_gt.nii.gz").unlink()
    msg = data_error("acdc_nifti", folder)
    assert "patient002_frame05_gt.nii.gz: file not found" in msg
    (folder / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")
    msg = data_error("acdc_nifti", folder)
    assert "Info.cfg" in msg and "'ES'" in msg


def test_acdc_nifti_geometry_mismatch(acdc_root: Path) -> None:
    nii(acdc_root / "patient001" / "patient001_frame03_gt.nii.gz", ACDC_STACK, origin=(10.0, -5.0, 3.0))
    msg = data_error("acdc_nifti", acdc_root / "patient001")
    assert msg.startswith(str(acdc_root / "patient001" / "patient001_frame03_gt.nii.gz"))
    assert "patient001_frame03.nii.gz" in msg and "origin" in msg


def test_acdc_nifti_unknown_label_and_truncated(acdc_root: Path) -> None:
    bad = ACDC_STACK.copy()
    bad[1, 0, 0] = 5
    nii(acdc_root / "patient001" / "patient001_frame01_gt.nii.gz", bad)
    msg = data_error("acdc_nifti", acdc_root / "patient001")
    assert "patient001_frame01_gt.nii.gz" in msg and "unknown label values [5]" in msg
    image = acdc_root / "patient002" / "patient002_frame01.nii.gz"
    image.write_bytes(image.read_bytes()[:300])
    msg = data_error("acdc_nifti", acdc_root / "patient002")
    assert "patient002_frame01.nii.gz" in msg and "truncated" in msg


# --- mnms ----------------------------------------------------------------------------------


def _mnms2(folder: Path, subject: str, views: Sequence[str] = ("SA",)) -> None:
    for view in views:
        for phase in ("ED", "ES"):
            nii(folder / f"{subject}_{view}_{phase}.nii.gz", mri().astype(np.float64))
            nii(folder / f"{subject}_{view}_{phase}_gt.nii.gz", MNMS_STACK.astype(np.float64))
    nii(folder / f"{subject}_SA_CINE.nii.gz", np.stack([mri()] * 2))


def test_mnms2_nested_and_flat_layouts(tmp_path: Path) -> None:
    _mnms2(tmp_path / "002", "002", views=("SA", "LA"))
    _mnms2(tmp_path, "001")
    cases = read_all("mnms", tmp_path)
    assert [c.case_id for c in cases] == ["mnms2_001_ED", "mnms2_001_ES", "mnms2_002_ED", "mnms2_002_ES"]
    assert cases[2].subject_id == "mnms2_002" and cases[2].dataset == "mnms2" and cases[2].phase == "ED"
    assert cases[0].meta["original_convention"] == "mnms" and cases[0].image.dtype == np.float32
    assert_canonical(cases[1].label)
    la = read_all("mnms", tmp_path, view="la")
    assert [c.case_id for c in la] == ["mnms2_002_LA_ED", "mnms2_002_LA_ES"]
    with pytest.raises(ConfigError, match="mnms.view"):
        read_all("mnms", tmp_path, view="2CH")


def test_mnms2_info_csv_adds_meta(tmp_path: Path) -> None:
    _mnms2(tmp_path, "001")
    (tmp_path / "info.csv").write_text("SUBJECT_CODE,DISEASE,VENDOR,SCANNER,FIELD\n1,NOR,SIEMENS,Avanto,1.5\n")
    case = read_all("mnms", tmp_path, info=str(tmp_path / "info.csv"))[0]
    assert case.meta["vendor"] == "SIEMENS" and case.meta["disease"] == "NOR"


def test_mnms2_bad_inputs(tmp_path: Path) -> None:
    _mnms2(tmp_path, "001")
    nii(tmp_path / "001_SA_ES_gt.nii.gz", MNMS_STACK[:, :, :-1].astype(np.float64))
    msg = data_error("mnms", tmp_path)
    assert "001_SA_ES_gt.nii.gz" in msg and "shape (Z, Y, X) (3, 32, 28) vs (3, 32, 27)" in msg
    fractional = MNMS_STACK.astype(np.float64)
    fractional[0, 0, 0] = 2.5
    nii(tmp_path / "001_SA_ES_gt.nii.gz", fractional)
    assert "non-integer" in data_error("mnms", tmp_path)
    (tmp_path / "001_SA_ES_gt.nii.gz").unlink()
    assert "no label file 001_SA_ES_gt.nii.gz" in data_error("mnms", tmp_path)
    (tmp_path / "empty").mkdir()
    assert "no M&Ms files found" in data_error("mnms", tmp_path / "empty")


def test_mnms1_4d_cine_with_frames_from_csv(tmp_path: Path) -> None:
    cine = np.stack([mri(seed=t) for t in range(4)])
    gt = np.zeros((4,) + MNMS_STACK.shape, np.uint8)
    gt[0], gt[2] = MNMS_STACK, MNMS_STACK
    nii(tmp_path / "A0S9V9" / "A0S9V9_sa.nii.gz", cine)
    nii(tmp_path / "A0S9V9" / "A0S9V9_sa_gt.nii.gz", gt)
    assert "pass the challenge CSV as option info=PATH" in data_error("mnms", tmp_path)
    csv = tmp_path / "info.csv"
    csv.write_text("External code,VendorName,Vendor,Centre,ED,ES\nA0S9V9,Siemens,A,1,0,2\n")
    cases = read_all("mnms", tmp_path, info=str(csv))
    assert [c.case_id for c in cases] == ["mnms_A0S9V9_ED", "mnms_A0S9V9_ES"]
    assert cases[1].meta["frame"] == 2 and cases[1].meta["vendor"] == "A" and cases[1].dataset == "mnms"
    np.testing.assert_allclose(cases[1].image, cine[2])
    assert_canonical(cases[0].label)
    csv.write_text("External code,ED,ES\nA0S9V9,1,3\n")  # 1-based by mistake: frame 1 is unlabelled
    assert "0-based" in data_error("mnms", tmp_path, info=str(csv))


# --- cmrxmotion ---------------------------------------------------------------------------


def _cmrx(folder: Path, scan: str, labelled: bool = True) -> None:
    for phase in ("ED", "ES"):
        nii(folder / f"{scan}-{phase}.nii.gz", mri())
        if labelled:
            nii(folder / f"{scan}-{phase}-label.nii.gz", MNMS_STACK)


def test_cmrxmotion_levels_subjects_and_unlabelled(tmp_path: Path) -> None:
    _cmrx(tmp_path, "P001-1")
    _cmrx(tmp_path / "P001-2", "P001-2")
    _cmrx(tmp_path / "P002-1", "P002-1", labelled=False)
    levels = tmp_path / "IQA.csv"
    levels.write_text("Image,Label\nP001-1-ED.nii.gz,1\nP001-1-ES.nii.gz,1\nP001-2-ED,2\nP002-1,3\n")
    cases = {c.case_id: c for c in read_all("cmrxmotion", tmp_path, motion_levels=str(levels))}
    assert sorted(cases) == [f"cmrx_P00{s}_{p}" for s in ("1-1", "1-2", "2-1") for p in ("ED", "ES")]
    assert {c.subject_id for c in cases.values()} == {"cmrx_P001", "cmrx_P002"}
    assert cases["cmrx_P001-2_ES"].subject_id == "cmrx_P001"
    assert cases["cmrx_P001-1_ED"].motion_level == 1 and cases["cmrx_P001-2_ED"].motion_level == 2
    assert cases["cmrx_P001-2_ES"].motion_level == -1  # not in the table
    assert cases["cmrx_P002-1_ES"].motion_level == 3 and cases["cmrx_P002-1_ES"].label is None
    assert_canonical(cases["cmrx_P001-1_ED"].label)
    assert cases["cmrx_P001-1_ED"].meta["scan"] == "P001-1" and cases["cmrx_P001-1_ED"].dataset == "cmrxmotion"
    assert all(c.motion_level == -1 for c in read_all("cmrxmotion", tmp_path))


def test_cmrxmotion_bad_inputs(tmp_path: Path) -> None:
    _cmrx(tmp_path, "P001-1")
    levels = tmp_path / "IQA.csv"
    levels.write_text("Image,Label\nP001-1-ED,7\n")
    msg = data_error("cmrxmotion", tmp_path, motion_levels=str(levels))
    assert "IQA.csv" in msg and "line 2" in msg and "'7'" in msg
    levels.write_text("Image,Score\nP001-1-ED,x\n")
    assert "not an integer 0-3" in data_error("cmrxmotion", tmp_path, motion_levels=str(levels))
    levels.write_text("Picture,Label\nP001-1-ED,1\n")
    assert "no column named any of" in data_error("cmrxmotion", tmp_path, motion_levels=str(levels))
    (tmp_path / "P001-1-ED.nii.gz").unlink()
    msg = data_error("cmrxmotion", tmp_path)
    assert "P001-1-ED-label.nii.gz" in msg and "has no image" in msg


# --- ct_nifti -----------------------------------------------------------------------------


def _ct(shape=(3, 16, 16), seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape, dtype=np.float32) * 1400 - 1000).astype(np.int16)


def _mask(values: Sequence[int] = (0, 1, 2)) -> np.ndarray:
    mask = np.zeros((3, 16, 16), np.uint8)
    for i, v in enumerate(values):
        mask[1, i, :4] = v
    return mask


def test_ct_nifti_layouts_binary_and_multiclass(tmp_path: Path) -> None:
    nii(tmp_path / "images" / "lung2.nii.gz", _ct(seed=2))
    nii(tmp_path / "images" / "lung10.nii.gz", _ct(seed=10))
    nii(tmp_path / "images" / "lung3.nii.gz", _ct(seed=3))
    nii(tmp_path / "masks" / "lung2.nii.gz", _mask())
    nii(tmp_path / "images" / "lung10_seg.nii.gz", _mask((0, 2, 2)))
    cases = read_all("ct_nifti", tmp_path)
    assert [c.case_id for c in cases] == ["ct_lung2", "ct_lung3", "ct_lung10"]
    assert cases[0].modality == "CT" and cases[0].task == "lung_binary" and cases[0].image.dtype == np.float32
    assert cases[0].image.min() < -500, "HU must be kept"
    assert int(cases[0].label.sum()) == 8 and cases[0].label.max() == 1 and cases[1].label is None
    assert cases[2].meta["mask_path"].endswith("lung10_seg.nii.gz") and cases[0].subject_id == "ct_lung2"
    multi = read_all("ct_nifti", tmp_path, multiclass="true", dataset="medseg")
    assert multi[0].case_id == "medseg_lung2" and multi[0].task == "lung_multiclass" and multi[0].dataset == "medseg"
    assert sorted(np.unique(multi[0].label)) == [0, 1, 2]


def test_ct_nifti_flat_layout_and_bad_inputs(tmp_path: Path) -> None:
    nii(tmp_path / "a.nii.gz", _ct())
    nii(tmp_path / "a_mask.nii.gz", _mask((0, 3)))
    assert read_all("ct_nifti", tmp_path)[0].label.max() == 1  # binary: any non-zero is infection
    msg = data_error("ct_nifti", tmp_path, multiclass=True)
    assert "a_mask.nii.gz" in msg and "unknown label values [3]" in msg
    nii(tmp_path / "b_mask.nii.gz", _mask())
    assert "b_mask.nii.gz: mask has no matching image" in data_error("ct_nifti", tmp_path)
    (tmp_path / "b_mask.nii.gz").unlink()
    nii(tmp_path / "a_mask.nii.gz", _mask(), spacing=(1.5, 1.25, 5.0))
    assert "spacing" in data_error("ct_nifti", tmp_path)
    nii(tmp_path / "a.nii.gz", np.stack([_ct()] * 2))
    assert "a.nii.gz: is 4D with 2 volumes" in data_error("ct_nifti", tmp_path)


def test_ct_nifti_nan_is_caught_when_reading(tmp_path: Path) -> None:
    volume = _ct().astype(np.float32)
    volume[0, 0, 0] = np.nan
    nii(tmp_path / "n.nii.gz", volume)
    # ITK would hand back 0 for that voxel, so io catches it; validate_case never sees it.
    msg = data_error("ct_nifti", tmp_path)
    assert msg.startswith(str(tmp_path / "n.nii.gz")) and "contains 1 NaN or infinite voxel values" in msg


def test_constant_volume_is_caught_by_validate_case(tmp_path: Path) -> None:
    nii(tmp_path / "flat.nii.gz", np.full((3, 16, 16), -1000, np.int16))
    case = read_all("ct_nifti", tmp_path)[0]
    with pytest.raises(DataError, match=r"flat\.nii\.gz: image is constant"):
        validate_case(case)


# --- real data ----------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_mnms2_sample(shared_data: Callable[[str], Path]) -> None:
    cases = read_all("mnms", shared_data("mnms2_sample"))
    assert [c.case_id for c in cases] == ["mnms2_001_ED", "mnms2_001_ES"]
    for case in cases:
        case = validate_case(case)
        assert case.shape == (12, 256, 256) and case.spacing_known
        np.testing.assert_allclose(case.spacing, (1.484, 1.484, 10.0), atol=1e-3)
        assert set(np.unique(case.label)) == {0, 1, 2, 3}
        assert_lv_inside_myo(case.label, case.source_path)
    ed, es = ((c.label == LV).sum() for c in cases)
    assert ed > es, "LV must be larger at end-diastole"
