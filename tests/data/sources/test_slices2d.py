"""`slices2d` and `unlabelled` sources on tiny PNG/JPEG files, and the real COVID-SemiSeg set."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from robustseg.data.cases import validate_case
from robustseg.data.sources import read_source
from robustseg.errors import ConfigError, DataError


def _picture(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _slice(h: int = 24, w: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w), dtype=np.uint8)


def _masks(h: int = 24, w: int = 20) -> tuple:
    infection = np.zeros((h, w), np.uint8)
    infection[2:6, 3:9] = 255
    multi = np.zeros((h, w), np.uint8)
    multi[2:6, 3:6], multi[2:6, 6:9] = 1, 2
    return infection, multi


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    infection, multi = _masks()
    (tmp_path / "multiclass_masks").mkdir()
    for n in (2, 10, 1):
        _picture(tmp_path / "images" / f"{n}.jpg", _slice(seed=n))
        _picture(tmp_path / "infection_masks" / f"{n}.png", infection)
        # Palette PNG like the real multi-class masks: the indices are the labels.
        palette = Image.frombytes("P", (multi.shape[1], multi.shape[0]), multi.tobytes())
        palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        palette.save(tmp_path / "multiclass_masks" / f"{n}.png")
    return tmp_path


def _read(name: str, path: Path, **options) -> list:
    return list(read_source(name, str(path), **options))


def _error(name: str, path: Path, **options) -> str:
    with pytest.raises(DataError) as err:
        _read(name, path, **options)
    return str(err.value)


def test_slices_infection_masks(labelled: Path) -> None:
    cases = _read("slices2d", labelled)
    assert [c.case_id for c in cases] == ["covid_semiseg_1", "covid_semiseg_2", "covid_semiseg_10"]
    case = cases[0]
    assert case.shape == (1, 24, 20) and case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.subject_id == case.case_id and case.dataset == "covid_semiseg" and case.modality == "CT"
    assert case.task == "lung_binary" and case.spacing == (1.0, 1.0, 1.0) and case.spacing_known is False
    assert case.meta["original_size"] == [24, 20] and case.meta["mask_path"].endswith("infection_masks/1.png")
    assert set(np.unique(case.label)) == {0, 1} and int(case.label.sum()) == 24
    validate_case(case)


def test_slices_multiclass_palette_and_none(labelled: Path) -> None:
    cases = _read("slices2d", labelled, masks="multiclass")
    assert cases[0].task == "lung_multiclass"
    assert np.array_equal(cases[0].label[0], _masks()[1])  # palette indices, not colours
    unlabelled = _read("slices2d", labelled, masks="none", dataset="x")
    assert unlabelled[0].label is None and unlabelled[0].case_id == "x_1"
    with pytest.raises(ConfigError, match="slices2d.masks"):
        _read("slices2d", labelled, masks="lobes")


def test_rgb_jpeg_becomes_grey(tmp_path: Path) -> None:
    grey = _slice()
    _picture(tmp_path / "images" / "0.png", np.stack([grey] * 3, axis=-1))
    _picture(tmp_path / "infection_masks" / "0.png", _masks()[0])
    case = _read("slices2d", tmp_path)[0]
    assert case.shape == (1, 24, 20)
    np.testing.assert_allclose(case.image[0], grey, atol=1)


def test_size_mismatch_names_both_files(labelled: Path) -> None:
    _picture(labelled / "infection_masks" / "10.png", np.zeros((24, 21), np.uint8))
    msg = _error("slices2d", labelled)
    assert msg.startswith(str(labelled / "infection_masks" / "10.png"))
    assert "mask size 21x24" in msg and str(labelled / "images" / "10.jpg") in msg and "20x24" in msg


def test_unpaired_files(labelled: Path) -> None:
    _picture(labelled / "infection_masks" / "7.png", _masks()[0])
    msg = _error("slices2d", labelled)
    assert "7.png: mask has no matching image" in msg
    (labelled / "infection_masks" / "7.png").unlink()
    (labelled / "infection_masks" / "2.png").unlink()
    msg = _error("slices2d", labelled)
    assert "2.jpg: image has no infection mask" in msg


def test_bad_mask_values_and_colour_masks(labelled: Path) -> None:
    bad = _masks()[0]
    bad[0, 0] = 128  # e.g. a mask saved as JPEG
    _picture(labelled / "infection_masks" / "1.png", bad)
    msg = _error("slices2d", labelled)
    assert "infection_masks/1.png" in msg and "unknown label values [128]" in msg
    colour = np.zeros((24, 20, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    _picture(labelled / "infection_masks" / "1.png", colour)
    assert "mask is a colour (RGB) picture" in _error("slices2d", labelled)


def test_truncated_jpeg(labelled: Path) -> None:
    image = labelled / "images" / "2.jpg"
    image.write_bytes(image.read_bytes()[:200])
    msg = _error("slices2d", labelled)
    assert "2.jpg: cannot read picture" in msg


def test_unlabelled_pictures_and_volumes(tmp_path: Path) -> None:
    for n in range(5):
        _picture(tmp_path / f"s{n}.png", _slice(seed=n))
    volume = sitk.GetImageFromArray(np.random.default_rng(0).random((3, 8, 9), dtype=np.float32))
    volume.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(volume, str(tmp_path / "vol.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(_slice().astype(np.float32)), str(tmp_path / "flat.nii.gz"))
    cases = _read("unlabelled", tmp_path, modality="mr")
    assert [c.case_id for c in cases][:2] == ["unlabelled_unl_flat", "unlabelled_unl_s0"]
    assert all(c.label is None and c.modality == "MR" and c.task == "cardiac" for c in cases)
    by_id = {c.case_id: c for c in cases}
    vol = by_id["unlabelled_unl_vol"]
    assert vol.spacing == pytest.approx((0.7, 0.7, 2.5)) and vol.spacing_known
    assert by_id["unlabelled_unl_flat"].shape == (1, 24, 20)
    assert by_id["unlabelled_unl_s3"].spacing_known is False and by_id["unlabelled_unl_s3"].shape == (1, 24, 20)
    limited = _read("unlabelled", tmp_path, limit="2", task="lung_multiclass", dataset="covid")
    assert [c.case_id for c in limited] == ["covid_unl_flat", "covid_unl_s0"] and limited[0].task == "lung_multiclass"
    for bad in ({"limit": "0"}, {"modality": "PET"}, {"task": "brain"}, {"limt": 3}):
        with pytest.raises(ConfigError):
            _read("unlabelled", tmp_path, **bad)


def test_unlabelled_bad_files(tmp_path: Path) -> None:
    assert "no images found" in _error("unlabelled", tmp_path)
    cine = sitk.JoinSeries([sitk.GetImageFromArray(np.ones((2, 3, 4), np.float32))] * 3)
    sitk.WriteImage(cine, str(tmp_path / "cine.nii.gz"))
    assert "cine.nii.gz: is 4D with 3 volumes" in _error("unlabelled", tmp_path)


@pytest.mark.realdata
def test_real_covid_semiseg_labelled(shared_data: Callable[[str], Path]) -> None:
    root = shared_data("covid_semiseg/labeled")
    cases = _read("slices2d", root)
    assert len(cases) == 50 and len({c.case_id for c in cases}) == 50
    for case in cases:
        case = validate_case(case)
        assert case.shape[0] == 1 and 100 <= min(case.shape[1:]) and max(case.shape[1:]) <= 600
        assert case.label is not None and set(np.unique(case.label)) <= {0, 1}
    assert sum(int(c.label.any()) for c in cases) > 40, "most labelled slices show infection"
    multi = _read("slices2d", root, masks="multiclass")
    assert all(set(np.unique(c.label)) <= {0, 1, 2} for c in multi)
    # Every multi-class lesion voxel is infection in the binary mask, and vice versa.
    assert all(np.array_equal(m.label > 0, b.label > 0) for m, b in zip(multi, cases))


@pytest.mark.realdata
def test_real_covid_semiseg_unlabelled(shared_data: Callable[[str], Path]) -> None:
    cases = _read("unlabelled", shared_data("covid_semiseg/unlabeled/images"), limit=20, dataset="covid_semiseg")
    assert len(cases) == 20
    for case in cases:
        case = validate_case(case)
        assert case.label is None and case.shape[0] == 1 and case.task == "lung_binary" and case.modality == "CT"
