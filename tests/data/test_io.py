"""Shared image IO: geometry round trips, dimensionality, truncation, option coercion."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from robustseg.data.cases import Case
from robustseg.data.io import (
    Volume,
    check_same_geometry,
    count_volumes,
    files_by_stem,
    opt_bool,
    opt_choice,
    opt_floats,
    opt_int,
    read_image,
    read_label,
    read_pair,
    read_picture,
    read_table,
    write_image,
    write_with_geometry,
)
from data.oblique_nifti import write_oblique_scanner_nifti
from robustseg.data.labels import get_convention
from robustseg.data.io import write_label_like
from robustseg.errors import ConfigError, DataError

SPACING = (1.25, 0.75, 8.0)
ORIGIN = (-10.5, 20.0, 3.25)
# A rotation about z by 30 degrees: direction must survive the round trip, not just identity.
C, S = float(np.cos(np.pi / 6)), float(np.sin(np.pi / 6))
DIRECTION = (C, -S, 0.0, S, C, 0.0, 0.0, 0.0, 1.0)


def _volume(shape=(4, 6, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_write_read_round_trip_keeps_geometry(tmp_path: Path) -> None:
    arr = _volume()
    write_image(arr, tmp_path / "sub" / "a.nii.gz", SPACING, ORIGIN, DIRECTION)
    vol = read_image(tmp_path / "sub" / "a.nii.gz")
    array, spacing, origin, direction = vol  # unpacks as the documented 4-tuple
    np.testing.assert_allclose(array, arr)
    assert array.dtype == np.float32 and array.shape == (4, 6, 5)
    np.testing.assert_allclose(spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(origin, ORIGIN, atol=1e-5)
    np.testing.assert_allclose(direction, DIRECTION, atol=1e-6)
    assert not list((tmp_path / "sub").glob(".tmp*")), "temporary file left behind"


def test_read_label_keeps_stored_dtype_and_image_casts(tmp_path: Path) -> None:
    lab = np.zeros((3, 4, 5), np.float64)
    lab[1, 1:3, 1:3] = 2.0
    write_image(lab, tmp_path / "l.nii.gz")
    assert read_label(tmp_path / "l.nii.gz").array.dtype == np.float64
    assert read_image(tmp_path / "l.nii.gz").array.dtype == np.float32


def test_write_with_geometry_from_case_and_shape_check(tmp_path: Path) -> None:
    case = Case("c", "s", _volume(), spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    mask = (case.image > 0).astype(bool)
    write_with_geometry(mask, tmp_path / "m.nii.gz", case.geometry())
    back = read_label(tmp_path / "m.nii.gz")
    assert back.array.dtype == np.uint8
    check_same_geometry(case, back, "m.nii.gz")
    with pytest.raises(DataError, match="differs from the geometry"):
        write_with_geometry(np.zeros((1, 2, 3)), tmp_path / "bad.nii.gz", case)


def test_write_rejects_non_3d(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"x\.nii\.gz: can only write 3D"):
        write_image(np.zeros((2, 3)), tmp_path / "x.nii.gz")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.nii\.gz: file not found"):
        read_image(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("keep", [0.5, 0.05, 0.999])
def test_truncated_nii_gz_is_a_data_error(tmp_path: Path, keep: float) -> None:
    write_image(_volume((8, 32, 32)), tmp_path / "full.nii.gz")
    data = (tmp_path / "full.nii.gz").read_bytes()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[: int(len(data) * keep)])
    # ITK alone returns zero-filled voxels for such a file; io must refuse it.
    with pytest.raises(DataError) as err:
        read_image(bad)
    assert "cut.nii.gz" in str(err.value) and "truncated" in str(err.value)


def test_truncated_uncompressed_nii_is_a_data_error(tmp_path: Path) -> None:
    write_image(_volume((8, 32, 32)), tmp_path / "full.nii")
    data = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.nii: truncated NIfTI file"):
        read_image(tmp_path / "cut.nii")


def test_gzip_of_truncated_nifti_is_caught_by_header_size(tmp_path: Path) -> None:
    write_image(_volume((8, 32, 32)), tmp_path / "full.nii")
    data = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(data[: len(data) - 100]))
    with pytest.raises(DataError, match=r"short\.nii\.gz: truncated NIfTI file"):
        read_image(tmp_path / "short.nii.gz")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_inf_voxels_are_refused(tmp_path: Path, suffix: str, dtype: type) -> None:
    # ITK silently reads NaN/inf NIfTI voxels as 0, which would hide the problem from
    # validate_case; io must count them and refuse the file.
    arr = _volume((8, 32, 40)).astype(dtype)
    arr[0, 0, 0], arr[7, 31, 39], arr[3, 3, 3] = np.nan, np.inf, -np.inf
    write_image(arr, tmp_path / f"bad{suffix}")
    with pytest.raises(DataError, match=rf"bad{suffix}: contains 3 NaN or infinite voxel values"):
        read_image(tmp_path / f"bad{suffix}")
    arr[~np.isfinite(arr)] = 0
    write_image(arr, tmp_path / f"ok{suffix}")
    np.testing.assert_array_equal(read_image(tmp_path / f"ok{suffix}").array, arr.astype(np.float32))


def test_not_an_image_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "junk.mha").write_text("hello")
    with pytest.raises(DataError, match=r"junk\.mha: cannot read image"):
        read_image(tmp_path / "junk.mha")


def _write_4d(path: Path, n: int) -> list:
    frames = [_volume((3, 4, 5), seed=i) for i in range(n)]
    image = sitk.JoinSeries([sitk.GetImageFromArray(f) for f in frames])
    sitk.WriteImage(image, str(path))
    return frames


def test_4d_where_3d_expected_says_how_many_volumes(tmp_path: Path) -> None:
    _write_4d(tmp_path / "cine.nii.gz", 7)
    with pytest.raises(DataError, match=r"cine\.nii\.gz: is 4D with 7 volumes"):
        read_image(tmp_path / "cine.nii.gz")
    assert count_volumes(tmp_path / "cine.nii.gz") == 7


def test_4d_frame_selection_and_range(tmp_path: Path) -> None:
    frames = _write_4d(tmp_path / "cine.nii.gz", 3)
    vol = read_image(tmp_path / "cine.nii.gz", frame=2)
    np.testing.assert_allclose(vol.array, frames[2])
    assert len(vol.spacing) == 3 and len(vol.direction) == 9
    with pytest.raises(DataError, match="frame 3 is out of range: the 4D file has 3 volumes"):
        read_image(tmp_path / "cine.nii.gz", frame=3)
    write_image(frames[0], tmp_path / "three_d.nii.gz")
    with pytest.raises(DataError, match="not a 4D cine"):
        read_image(tmp_path / "three_d.nii.gz", frame=0)


def test_2d_image_only_promoted_when_allowed(tmp_path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(_volume((6, 5))), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match=r"flat\.nii\.gz: is a 2D image"):
        read_image(tmp_path / "flat.nii.gz")
    vol = read_image(tmp_path / "flat.nii.gz", allow_2d=True)
    assert vol.array.shape == (1, 6, 5)
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.direction == (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_vector_image_rejected(tmp_path: Path) -> None:
    rgb = sitk.GetImageFromArray(np.zeros((2, 3, 4, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nii.gz"))
    with pytest.raises(DataError, match="3 components per voxel"):
        read_image(tmp_path / "rgb.nii.gz")


def _geom(**changes) -> dict:
    geom = Volume(np.zeros((2, 3, 4)), SPACING, ORIGIN, DIRECTION).geometry()
    geom.update(changes)
    return geom


def test_check_same_geometry_tolerances() -> None:
    check_same_geometry(_geom(), _geom(spacing=[s * (1 + 5e-6) for s in SPACING]), "x")
    check_same_geometry(_geom(), _geom(origin=[o + 1e-4 for o in ORIGIN]), "x")


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"shape_zyx": [2, 3, 5]}, "shape"),
        ({"spacing": [1.25, 0.75, 10.0]}, "spacing"),
        ({"origin": [-10.5, 20.0, 3.5]}, "origin"),
        ({"direction": [1.0, 0, 0, 0, 1, 0, 0, 0, 1]}, "direction"),
    ],
)
def test_check_same_geometry_mismatch(changes: dict, word: str) -> None:
    with pytest.raises(DataError) as err:
        check_same_geometry(_geom(), _geom(**changes), "lab.nii.gz")
    assert str(err.value).startswith("lab.nii.gz: ") and word in str(err.value)


def test_read_pair_geometry_mismatch_names_both_files(tmp_path: Path) -> None:
    write_image(_volume(), tmp_path / "img.nii.gz", SPACING, ORIGIN)
    write_image(np.zeros((4, 6, 5), np.uint8), tmp_path / "lab.nii.gz", (1.25, 0.75, 5.0), ORIGIN)
    with pytest.raises(DataError) as err:
        read_pair(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", get_convention("mnms"))
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "lab.nii.gz")) and "img.nii.gz" in msg and "spacing" in msg


def test_read_pair_binary_maps_nonzero_to_one(tmp_path: Path) -> None:
    write_image(_volume(), tmp_path / "img.nii.gz")
    lab = np.zeros((4, 6, 5), np.int16)
    lab[0, 0, :3] = [1, 2, 3]
    write_image(lab, tmp_path / "lab.nii.gz")
    _, out = read_pair(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", get_convention("lung_binary"), binary=True)
    assert out is not None and out.dtype == np.uint8 and out.sum() == 3 and out.max() == 1


def test_read_picture_truncated_and_missing(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: cannot read picture"):
        read_picture(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match="file not found"):
        read_picture(tmp_path / "none.png")


def test_files_by_stem_rejects_duplicates(tmp_path: Path) -> None:
    (tmp_path / "1.jpg").write_bytes(b"")
    (tmp_path / "1.png").write_bytes(b"")
    with pytest.raises(DataError, match="two files named '1'"):
        files_by_stem(tmp_path, (".png", ".jpg"))


def test_read_table_semicolons_and_empty(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("A;B\n1;2\n")
    header, rows = read_table(tmp_path / "t.csv")
    assert header == ["A", "B"] and rows == [{"A": "1", "B": "2"}]
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"e\.csv: table is empty"):
        read_table(tmp_path / "e.csv")


def test_option_coercion_from_cli_strings() -> None:
    assert opt_bool("True", "x") is True and opt_bool("0", "x") is False and opt_bool(True, "x")
    assert opt_int("20", "x") == 20 and opt_int(None, "x") is None
    assert opt_floats("1.5,1.5,10", "x") == (1.5, 1.5, 10.0)
    assert opt_floats([1, 2, 3], "x") == (1.0, 2.0, 3.0)
    assert opt_choice("mr", "x", ["CT", "MR"]) == "MR"
    for call in (
        lambda: opt_bool("maybe", "s.flag"),
        lambda: opt_int("two", "s.limit"),
        lambda: opt_int("0", "s.limit", minimum=1),
        lambda: opt_floats("1,2", "s.spacing"),
        lambda: opt_floats("1,-2,3", "s.spacing"),
        lambda: opt_choice("PET", "s.modality", ["CT", "MR"]),
    ):
        with pytest.raises(ConfigError, match=r"source option s\."):
            call()


def test_label_map_occupies_the_scans_exact_physical_space(tmp_path: Path) -> None:
    scan = tmp_path / "oblique.nii.gz"
    write_oblique_scanner_nifti(scan, _volume((5, 12, 10)))
    image = sitk.ReadImage(str(scan))
    reference = sitk.Cast(image > 0, sitk.sitkUInt8)  # a label image derived from the scan
    vol = read_image(scan)
    write_label_like((vol.array > 0).astype(np.uint8), tmp_path / "mask.nii.gz", scan, vol.geometry())
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    assert mask.GetPixelID() == sitk.sitkUInt8
    overlap = sitk.LabelOverlapMeasuresImageFilter()  # default tolerance: refuses ~1e-5 offsets
    overlap.Execute(reference, mask)
    assert overlap.GetDiceCoefficient() == 1.0
    assert mask.GetDirection() == image.GetDirection() and mask.GetOrigin() == image.GetOrigin()
    assert read_label(tmp_path / "mask.nii.gz").array.dtype == np.uint8


def test_label_like_falls_back_and_checks(tmp_path: Path) -> None:
    write_image(_volume(), tmp_path / "scan.mha", SPACING, ORIGIN, DIRECTION)
    vol = read_image(tmp_path / "scan.mha")
    write_label_like(np.ones((4, 6, 5), np.uint8), tmp_path / "m.nii.gz", tmp_path / "scan.mha", vol.geometry())
    check_same_geometry(read_label(tmp_path / "m.nii.gz"), vol, "m")  # not NIfTI: written from the geometry
    write_image(_volume(), tmp_path / "scan.nii.gz", SPACING, ORIGIN, DIRECTION)
    with pytest.raises(DataError, match="array shape"):  # wrong grid: no header copy, shape checked
        write_label_like(np.ones((4, 6, 6), np.uint8), tmp_path / "w.nii.gz", tmp_path / "scan.nii.gz", vol.geometry())
    with pytest.raises(DataError, match="do not fit a uint8"):
        write_label_like(np.full((4, 6, 5), 300), tmp_path / "x.nii.gz", tmp_path / "scan.nii.gz", vol.geometry())


@pytest.mark.realdata
def test_label_map_on_the_real_mnms_scan_combines_with_it(shared_data, tmp_path: Path) -> None:
    scan = shared_data("mnms2_sample/001_SA_ED.nii.gz")
    image = sitk.ReadImage(str(scan))
    vol = read_image(scan)
    write_label_like((vol.array > 100).astype(np.uint8), tmp_path / "m.nii.gz", scan, vol.geometry())
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(sitk.Cast(image > 100, sitk.sitkUInt8), sitk.ReadImage(str(tmp_path / "m.nii.gz")))
    assert overlap.GetDiceCoefficient() == 1.0
