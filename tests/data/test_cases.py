"""`validate_case`, `check_unique_ids` and label conventions: each bad input names its file."""
import h5py
import numpy as np
import pytest

from anatomy import ring_slice
from robustseg.config import DataConfig, SourceSpec
from robustseg.data.cases import Case, check_unique_ids, validate_case
from robustseg.data.labels import get_convention, label_values, num_classes
from robustseg.data.prepare import prepare
from robustseg.errors import DataError, UnknownNameError


def _case(**kw):
    base = dict(case_id="c", subject_id="s", image=np.random.default_rng(0).random((3, 8, 8)),
                label=np.zeros((3, 8, 8), np.uint8), source_path="/data/c.nii.gz")
    base.update(kw)
    return Case(**base)


def test_valid_case_is_cast():
    c = validate_case(_case(image=np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8)))
    assert c.image.dtype == np.float32 and c.label.dtype == np.uint8


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"image": np.zeros((8, 8)) + np.eye(8)}, "image must be 3D (Z, Y, X) after reading, got 2D"),
        ({"image": np.zeros((0, 8, 8)), "label": None}, "image is empty (shape (0, 8, 8))"),
        ({"image": np.full((3, 8, 8), np.nan)}, "image contains 192 NaN or infinite values"),
        ({"image": np.where(np.eye(8)[None] > 0, np.inf, 1.0).repeat(3, 0)}, "NaN or infinite"),
        ({"image": np.zeros((3, 8, 8))}, "image is constant (every voxel = 0.0): empty volume"),
        ({"label": np.zeros((3, 8, 7), np.uint8)}, "image shape (3, 8, 8) and label shape (3, 8, 7) differ"),
        ({"label": np.full((3, 8, 8), 5, np.uint8)}, "label values [5] are not canonical cardiac labels (0..3)"),
        ({"label": np.full((3, 8, 8), 0.5)}, "label must hold integers"),
        ({"spacing": (1.0, 0.0, 1.0)}, "invalid voxel spacing"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "invalid voxel spacing"),
        ({"task": "brain"}, "unknown task 'brain'"),
        ({"image": np.array([["a"]], dtype=object)[None]}, "non-numeric dtype"),
    ],
)
def test_bad_cases_name_file_and_problem(kw, message):
    with pytest.raises(DataError) as e:
        validate_case(_case(**kw))
    assert str(e.value).startswith("/data/c.nii.gz: ")
    assert message in str(e.value)


def test_duplicate_ids_name_both_sources():
    a, b = _case(source_path="/a.h5"), _case(source_path="/b.h5")
    with pytest.raises(DataError, match=r"/b.h5: duplicate case id 'c' \(also produced by /a.h5\)"):
        check_unique_ids([a, b])


def test_conventions_map_to_canonical():
    acdc = ring_slice()  # ACDC values: 1 RV, 2 MYO, 3 LV
    canon = get_convention("acdc").to_canonical(acdc, "f.h5")
    assert (canon[acdc == 3] == 1).all() and (canon[acdc == 1] == 3).all() and (canon[acdc == 2] == 2).all()
    mnms = get_convention("mnms").to_canonical(np.array([0.0, 1.0, 2.0, 3.0]), "m.nii.gz")  # float64 on disk
    assert mnms.tolist() == [0, 1, 2, 3] and mnms.dtype == np.uint8
    assert get_convention("lung_binary").to_canonical(np.array([0, 255, 1]), "x.png").tolist() == [0, 1, 1]
    assert num_classes("lung_multiclass") == 3


@pytest.mark.parametrize(
    "convention, label, message",
    [
        ("acdc", np.array([0, 4]), "x: unknown label values [4] for the 'acdc' convention (expected [0, 1, 2, 3])"),
        ("acdc", np.array([0, -1]), "unknown label values [-1]"),
        ("mnms", np.array([0.0, 1.5]), "x: label contains non-integer values"),
        ("mnms", np.array([0.0, np.nan]), "x: label contains NaN or infinite values"),
        ("lung_binary", np.array([0, 128]), "unknown label values [128]"),
    ],
)
def test_convention_errors(convention, label, message):
    with pytest.raises(DataError) as e:
        get_convention(convention).to_canonical(label, "x")
    assert message in str(e.value)


def test_unknown_convention_and_label_values():
    with pytest.raises(UnknownNameError, match="unknown label convention 'ukbb'; valid:"):
        get_convention("ukbb")
    assert label_values(np.array([3, 0, 3], np.uint8)).tolist() == [0, 3]
    assert label_values(np.array([-2, 5])).tolist() == [-2, 5]
    assert label_values(np.zeros((0,), np.uint8)).tolist() == []


def test_nan_volume_through_prepare_writes_nothing(tmp_path):
    src = tmp_path / "acdc"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["patient001_frame01", "patient001_frame12", "patient002_frame01", "patient002_frame10"]):
        img = rng.random((3, 32, 28), dtype=np.float32)
        if i == 3:
            img[1, 4, 4] = np.nan
        with h5py.File(src / f"{name}.h5", "w") as fh:
            fh["image"] = img
            fh["label"] = np.stack([ring_slice()] * 3)
    out = tmp_path / "out"
    cfg = DataConfig(sources=[SourceSpec(name="acdc_h5", path=str(src))], shards_uri=str(out), folds=2)
    cfg.cmr.crop_size = [32, 32]
    with pytest.raises(DataError, match=r"patient002_frame10.h5: image contains 1 NaN or infinite values"):
        prepare(cfg)
    assert not any(p.is_file() for p in out.rglob("*"))
