"""`acdc_h5` source: ACDC volumes as repackaged by WSL4MIS, one HDF5 file per patient and phase.

Layout: ``<root>/patientNNN_frameFF.h5`` with datasets ``image`` (float32, Z x H x W, already
scaled to [0, 1]) and ``label`` (uint8, ACDC convention 1 RV / 2 MYO / 3 LV); a ``scribble``
dataset may be present and is ignored. Each patient has two files: the lower frame number is
end-diastole (ACDC's ED is frame 01), the higher one end-systole.

No voxel spacing is stored, so cases have spacing (1, 1, 1) and ``spacing_known=False``
(metrics in pixels, no resampling) unless the ``spacing`` option gives one for every file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import h5py
import numpy as np

from robustseg.data.cases import Case
from robustseg.data.io import opt_floats, reject_unknown, require_dir
from robustseg.data.labels import get_convention
from robustseg.errors import DataError
from robustseg.registry import SOURCES

_FILE = re.compile(r"^patient(\d{3})_frame(\d{2})\.h5$")
_KEYS = ("image", "label")


@SOURCES.register("acdc_h5", options=("spacing",))
def read(path: str, spacing: Any = None, **unknown: Any) -> Iterator[Case]:
    """Yield ED and ES cases of every patient in an ``acdc_h5`` folder.

    Args:
        path: Folder holding ``patientNNN_frameFF.h5`` files.
        spacing: Optional voxel size ``"x,y,z"`` in mm (e.g. ``"1.5,1.5,10"``) applied to
            every volume; marks spacing as known. Without it spacing is (1, 1, 1), unknown.
        **unknown: Rejected (listing the valid options).

    Returns:
        Iterator of cases ``acdc_patientNNN_ED`` / ``_ES`` in canonical labels.

    Raises:
        DataError: naming the file, for unreadable or truncated HDF5, missing keys, shape
            mismatch, unknown label values, or files that do not follow the layout.
        ConfigError: bad options.
    """
    reject_unknown("acdc_h5", unknown, ["spacing"])
    voxel = opt_floats(spacing, "acdc_h5.spacing")
    root = require_dir(path)
    patients = _group_by_patient(root)
    for patient in sorted(patients):
        for phase, frame, file in _phases(patients[patient]):
            yield _read_case(file, patient, phase, frame, voxel)


def _group_by_patient(root: Path) -> Dict[str, List[Tuple[int, Path]]]:
    patients: Dict[str, List[Tuple[int, Path]]] = {}
    for file in sorted(root.glob("*.h5")):
        match = _FILE.match(file.name)
        if match is None:
            # Fail rather than skip: a slice-level or renamed file means the wrong folder,
            # and silently dropping it would shrink the data set unnoticed.
            raise DataError(
                file, "name does not follow patientNNN_frameFF.h5 (point the acdc_h5 source at the volume folder)"
            )
        patients.setdefault(match.group(1), []).append((int(match.group(2)), file))
    if not patients:
        raise DataError(root, "no patientNNN_frameFF.h5 files found")
    return patients


def _phases(frames: List[Tuple[int, Path]]) -> List[Tuple[str, int, Path]]:
    """Label a patient's files ED (lower frame) and ES (higher frame)."""
    frames = sorted(frames)
    if len(frames) == 2:
        (ed, ed_file), (es, es_file) = frames
        return [("ED", ed, ed_file), ("ES", es, es_file)]
    if len(frames) == 1 and frames[0][0] == 1:
        # ACDC's ED is frame 01; a lone frame01 is unambiguous, a lone other frame is not.
        return [("ED", 1, frames[0][1])]
    names = ", ".join(f.name for _, f in frames)
    raise DataError(frames[0][1], f"cannot tell ED from ES: expected two frames per patient, found {names}")


def _read_arrays(file: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(file, "r") as fh:
            missing = [k for k in _KEYS if k not in fh]
            if missing:
                raise DataError(file, f"missing HDF5 key(s) {missing}; the file has {sorted(fh.keys())}")
            image, label = fh["image"][()], fh["label"][()]
    except OSError as exc:  # h5py reports truncated or non-HDF5 files as OSError
        raise DataError(file, f"cannot read HDF5 file (truncated or not HDF5?): {exc}") from None
    if image.ndim != 3:
        raise DataError(file, f"'image' must be 3D (Z, H, W), got shape {image.shape}")
    if label.shape != image.shape:
        raise DataError(file, f"'image' shape {image.shape} and 'label' shape {label.shape} differ")
    if not (np.issubdtype(image.dtype, np.number) and np.issubdtype(label.dtype, np.number)):
        raise DataError(file, f"non-numeric datasets (image {image.dtype}, label {label.dtype})")
    return image.astype(np.float32, copy=False), label


def _read_case(
    file: Path, patient: str, phase: str, frame: int, spacing: Optional[Tuple[float, ...]]
) -> Case:
    image, stored = _read_arrays(file)
    label = get_convention("acdc").to_canonical(stored, where=file)
    return Case(
        case_id=f"acdc_patient{patient}_{phase}",
        subject_id=f"acdc_patient{patient}",
        image=image,
        label=label,
        spacing=spacing or (1.0, 1.0, 1.0),
        spacing_known=spacing is not None,
        modality="MR",
        task="cardiac",
        phase=phase,
        dataset="acdc",
        source_path=str(file),
        meta={
            "original_convention": "acdc",
            "frame": frame,
            "spacing_source": "option" if spacing is not None else "unknown",
        },
    )
