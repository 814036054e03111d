"""`acdc_nifti` source: the original ACDC release layout, with real NIfTI geometry.

Layout::

    <root>/patientNNN/Info.cfg                 ED: 1, ES: 12, Group: DCM, Height, Weight, NbFrame
    <root>/patientNNN/patientNNN_frameFF.nii.gz      one 3D volume per phase
    <root>/patientNNN/patientNNN_frameFF_gt.nii.gz   its labels (ACDC: 1 RV, 2 MYO, 3 LV)
    <root>/patientNNN/patientNNN_4d.nii.gz           whole cine, ignored

``<root>`` may also be a single patient folder. Case ids match `acdc_h5`
(``acdc_patientNNN_ED``), so the two layouts of the same patients are interchangeable. The
pathology group is kept in ``meta["group"]`` for stratified folds.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List

from robustseg.data.cases import Case
from robustseg.data.io import find_nifti, read_pair, reject_unknown, require_dir, volume_case
from robustseg.data.labels import get_convention
from robustseg.errors import DataError
from robustseg.registry import SOURCES

_PATIENT = re.compile(r"^patient(\d{3})$")


@SOURCES.register("acdc_nifti", options=())
def read(path: str, **unknown: Any) -> Iterator[Case]:
    """Yield the ED and ES cases of every patient folder under ``path``.

    Args:
        path: ACDC ``training``/``testing`` folder, or one ``patientNNN`` folder.
        **unknown: Rejected (this source takes no options).

    Returns:
        Iterator of cases with real geometry, canonical labels, ``meta["group"]``.

    Raises:
        DataError: naming the file, for a missing or incomplete ``Info.cfg``, missing
            frame or label files, unreadable NIfTI, image/label geometry mismatch or
            unknown label values.
    """
    reject_unknown("acdc_nifti", unknown, [])
    for folder in _patient_folders(require_dir(path)):
        yield from _read_patient(folder)


def _patient_folders(root: Path) -> List[Path]:
    if (root / "Info.cfg").is_file():
        return [root]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _PATIENT.match(p.name))
    if not folders:
        raise DataError(root, "no patientNNN folders (with Info.cfg) found")
    return folders


def read_info(cfg: Path) -> Dict[str, str]:
    """Parse an ACDC ``Info.cfg`` (``Key: value`` lines) into a dict.

    Args:
        cfg: The file.

    Returns:
        Keys as written (``ED``, ``ES``, ``Group``, ...), values stripped.

    Raises:
        DataError: the file is missing or lacks integer ``ED``/``ES`` entries.
    """
    try:
        lines = cfg.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(cfg, f"cannot read patient info: {exc.strerror or exc}") from None
    info = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            raise DataError(cfg, f"missing or non-integer {key!r} frame entry (got {info.get(key)!r})")
    if int(info["ED"]) == int(info["ES"]):
        raise DataError(cfg, f"ED and ES are the same frame ({info['ED']})")
    return info


def _frame_file(folder: Path, stem: str) -> Path:
    found = find_nifti(folder, stem)
    if found is None:
        raise DataError(folder / (stem + ".nii.gz"), "file not found (named by Info.cfg)")
    return found


def _read_patient(folder: Path) -> Iterator[Case]:
    info = read_info(folder / "Info.cfg")
    # Info.cfg does not name the patient; the folder (or, for a lone folder, its files) does.
    patient = folder.name[len("patient"):] if _PATIENT.match(folder.name) else _patient_from_files(folder)
    convention = get_convention("acdc")
    for phase in ("ED", "ES"):
        frame = int(info[phase])
        stem = f"patient{patient}_frame{frame:02d}"
        image_file = _frame_file(folder, stem)
        image, label = read_pair(image_file, _frame_file(folder, stem + "_gt"), convention)
        yield volume_case(
            image,
            label,
            case_id=f"acdc_patient{patient}_{phase}",
            subject_id=f"acdc_patient{patient}",
            modality="MR",
            task="cardiac",
            phase=phase,
            dataset="acdc",
            source_path=str(image_file),
            meta={
                "original_convention": "acdc",
                "frame": frame,
                "group": info.get("Group", ""),
                "height_cm": _number(info.get("Height")),
                "weight_kg": _number(info.get("Weight")),
                "n_frames": _number(info.get("NbFrame")),
            },
        )


def _patient_from_files(folder: Path) -> str:
    numbers = {m.group(1) for m in (re.match(r"^patient(\d{3})_", p.name) for p in folder.iterdir()) if m}
    if len(numbers) != 1:
        raise DataError(folder, f"cannot tell the patient number from the file names (found {sorted(numbers)})")
    return numbers.pop()


def _number(text: Any) -> Any:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
