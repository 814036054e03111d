"""`acdc_h5` source: tiny HDF5 files written here, bad inputs, and the real 160 volumes."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Optional

import h5py
import numpy as np
import pytest

from robustseg.data.cases import validate_case
from robustseg.data.labels import LV, MYO, RV

from anatomy import assert_lv_inside_myo, ring_slice
from robustseg.data.sources import SOURCES, acdc_h5, read_source
from robustseg.errors import ConfigError, DataError




def write_h5(path: Path, z: int = 3, label: Optional[np.ndarray] = None, **extra: np.ndarray) -> None:
    rng = np.random.default_rng(len(path.name))
    lab = np.stack([ring_slice()] * z) if label is None else label
    data: Dict[str, np.ndarray] = {"image": rng.random(lab.shape, dtype=np.float32), "label": lab}
    data.update(extra)
    with h5py.File(path, "w") as fh:
        for key, value in data.items():
            fh[key] = value


@pytest.fixture
def acdc_dir(tmp_path: Path) -> Path:
    for name in ("patient001_frame01", "patient001_frame12", "patient010_frame01", "patient010_frame09"):
        write_h5(tmp_path / f"{name}.h5", scribble=np.full((3, 32, 28), 4, np.uint16))
    return tmp_path


def test_registered_with_options() -> None:
    assert SOURCES.get("acdc_h5") is acdc_h5.read
    assert SOURCES.meta("acdc_h5")["options"] == ("spacing",)


def test_reads_ed_es_ids_and_canonical_labels(acdc_dir: Path) -> None:
    cases = list(read_source("acdc_h5", str(acdc_dir)))
    assert [c.case_id for c in cases] == [
        "acdc_patient001_ED", "acdc_patient001_ES", "acdc_patient010_ED", "acdc_patient010_ES",
    ]
    es = cases[1]
    assert es.subject_id == "acdc_patient001" and es.phase == "ES" and es.meta["frame"] == 12
    assert cases[3].meta["frame"] == 9 and cases[0].meta["original_convention"] == "acdc"
    assert es.dataset == "acdc" and es.modality == "MR" and es.task == "cardiac" and es.motion_level == -1
    assert es.spacing == (1.0, 1.0, 1.0) and es.spacing_known is False
    assert es.image.dtype == np.float32 and es.label.dtype == np.uint8 and es.shape == (3, 32, 28)
    stored = ring_slice()
    # ACDC 3 (LV) -> canonical 1, 1 (RV) -> 3, MYO stays 2.
    assert np.array_equal(es.label[0] == LV, stored == 3) and np.array_equal(es.label[0] == RV, stored == 1)
    assert np.array_equal(es.label[0] == MYO, stored == 2)
    validate_case(es)


def test_spacing_option_from_cli_string(acdc_dir: Path) -> None:
    case = next(acdc_h5.read(str(acdc_dir), spacing="1.5,1.5,10"))
    assert case.spacing == (1.5, 1.5, 10.0) and case.spacing_known is True
    assert case.meta["spacing_source"] == "option"
    with pytest.raises(ConfigError, match="acdc_h5.spacing"):
        next(acdc_h5.read(str(acdc_dir), spacing="1.5,10"))
    with pytest.raises(ConfigError, match="unknown option"):
        next(acdc_h5.read(str(acdc_dir), spacng="1,1,1"))


def _only_error(folder: Path) -> str:
    with pytest.raises(DataError) as err:
        list(acdc_h5.read(str(folder)))
    return str(err.value)


def test_truncated_h5(tmp_path: Path) -> None:
    write_h5(tmp_path.parent / "full.h5")
    data = (tmp_path.parent / "full.h5").read_bytes()
    (tmp_path / "patient002_frame01.h5").write_bytes(data[: len(data) // 2])
    msg = _only_error(tmp_path)
    assert "patient002_frame01.h5" in msg and "cannot read HDF5" in msg and "truncated" in msg


def test_missing_label_key(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "patient002_frame01.h5", "w") as fh:
        fh["image"] = np.zeros((2, 4, 4), np.float32)
    msg = _only_error(tmp_path)
    assert "patient002_frame01.h5" in msg and "missing HDF5 key(s) ['label']" in msg


def test_shape_mismatch(tmp_path: Path) -> None:
    write_h5(tmp_path / "patient002_frame01.h5", label=np.zeros((2, 32, 27), np.uint8))
    with h5py.File(tmp_path / "patient002_frame01.h5", "r+") as fh:
        del fh["image"]
        fh["image"] = np.zeros((2, 32, 28), np.float32)
    msg = _only_error(tmp_path)
    assert "patient002_frame01.h5" in msg and "shape (2, 32, 28)" in msg and "(2, 32, 27) differ" in msg


def test_unknown_label_value(tmp_path: Path) -> None:
    lab = np.stack([ring_slice()] * 2)
    lab[0, 0, 0] = 5
    write_h5(tmp_path / "patient002_frame01.h5", label=lab)
    msg = _only_error(tmp_path)
    assert "patient002_frame01.h5" in msg and "unknown label values [5]" in msg and "'acdc'" in msg


def test_wrong_dimensionality(tmp_path: Path) -> None:
    write_h5(tmp_path / "patient002_frame01.h5", label=ring_slice())
    msg = _only_error(tmp_path)
    assert "patient002_frame01.h5" in msg and "must be 3D (Z, H, W)" in msg


def test_nan_image_is_caught_by_validate_case(tmp_path: Path) -> None:
    write_h5(tmp_path / "patient002_frame01.h5")
    with h5py.File(tmp_path / "patient002_frame01.h5", "r+") as fh:
        fh["image"][0, 0, 0] = np.nan
    case = next(acdc_h5.read(str(tmp_path)))  # the source reads it: NaN is validation's job
    with pytest.raises(DataError, match=r"patient002_frame01\.h5: image contains 1 NaN"):
        validate_case(case)


def test_layout_errors(tmp_path: Path) -> None:
    assert "no patientNNN_frameFF.h5 files" in _only_error(tmp_path)
    write_h5(tmp_path / "patient002_frame01_slice_1.h5")
    assert "does not follow patientNNN_frameFF.h5" in _only_error(tmp_path)
    (tmp_path / "patient002_frame01_slice_1.h5").unlink()
    write_h5(tmp_path / "patient002_frame07.h5")
    assert "cannot tell ED from ES" in _only_error(tmp_path)
    assert "folder not found" in _only_error(tmp_path / "absent")


def test_lone_frame01_is_ed(tmp_path: Path) -> None:
    write_h5(tmp_path / "patient002_frame01.h5")
    assert [c.case_id for c in acdc_h5.read(str(tmp_path))] == ["acdc_patient002_ED"]






def test_anatomy_check_catches_a_swapped_convention(acdc_dir: Path) -> None:
    case = next(acdc_h5.read(str(acdc_dir)))
    assert_lv_inside_myo(case.label, case.case_id)
    swapped = case.label.copy()
    swapped[case.label == LV], swapped[case.label == RV] = RV, LV
    with pytest.raises(AssertionError, match="LV"):
        assert_lv_inside_myo(swapped, case.case_id)
    # An LV inside the ring's box but with MYO on one side only is caught by the rim test.
    yy, xx = np.mgrid[:32, :28]
    r = np.hypot(yy - 16, xx - 16)
    half_ring = np.where(r < 5, LV, np.where((r < 8) & (yy <= 17), MYO, 0)).astype(np.uint8)
    with pytest.raises(AssertionError, match="convention swapped"):
        assert_lv_inside_myo(np.stack([half_ring] * 3), "half ring")


@pytest.mark.realdata
def test_real_acdc_h5_all_160_volumes(shared_data: Callable[[str], Path]) -> None:
    cases = list(read_source("acdc_h5", str(shared_data("acdc_h5"))))
    assert len(cases) == 160
    phases = Counter(c.phase for c in cases)
    assert phases == {"ED": 80, "ES": 80}
    assert len({c.subject_id for c in cases}) == 80 and len({c.case_id for c in cases}) == 160
    lv_volume: Dict[str, Dict[str, int]] = {}
    for case in cases:
        case = validate_case(case)  # also checks the labels are canonical 0..3
        assert 6 <= case.shape[0] <= 18 and case.spacing_known is False
        assert_lv_inside_myo(case.label, case.source_path)
        lv_volume.setdefault(case.subject_id, {})[case.phase] = int((case.label == LV).sum())
    # ED is the lower frame (frame01 for all but patient090, whose frames are 04 and 11):
    # the LV is fullest at end-diastole, which confirms the phase assignment per patient.
    for subject, volume in lv_volume.items():
        assert volume["ED"] > volume["ES"], f"{subject}: LV smaller at ED than at ES {volume}"
