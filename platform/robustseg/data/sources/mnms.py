"""`mnms` source: the M&Ms-2 and M&Ms-1 cardiac MRI challenges, with real NIfTI geometry.

M&Ms-2 (dataset ``mnms2``): ``<root>/NNN/NNN_SA_ED.nii.gz`` with ``NNN_SA_ED_gt.nii.gz`` and
the same for ``ES`` (files directly in ``<root>`` are accepted too). Case ids are
``mnms2_NNN_ED``; with ``view="LA"`` the long-axis files are read and ids are
``mnms2_NNN_LA_ED``. The ``*_CINE`` 4D files are ignored.

M&Ms-1 (dataset ``mnms``): ``<root>/CODE/CODE_sa.nii.gz`` (4D cine) with
``CODE_sa_gt.nii.gz`` (4D, labelled at ED and ES only). The ED/ES frame indices (0-based, as
the challenge's information CSV gives them) come from the ``info`` CSV; without it M&Ms-1
subjects are an error. A label frame that turns out empty is reported, as it usually means
the indices are off by one.

Labels use the M&Ms convention (1 LV, 2 MYO, 3 RV), stored as float64 and cast through it.
With ``info`` every CSV column of the subject (vendor, centre, disease, ...) lands in meta.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from robustseg.data.cases import Case
from robustseg.data.io import (
    find_column,
    find_nifti,
    opt_choice,
    read_pair,
    read_table,
    reject_unknown,
    require_dir,
    split_suffix,
    volume_case,
)
from robustseg.data.labels import get_convention
from robustseg.errors import DataError
from robustseg.registry import SOURCES

_MNMS2 = re.compile(r"^(\d+)_(SA|LA)_(ED|ES)$")
_MNMS1 = re.compile(r"^([A-Za-z0-9]+)_sa$")
_ID_COLUMNS = ("SUBJECT_CODE", "External code", "subject", "id", "code")


@SOURCES.register("mnms", options=("view", "info"))
def read(path: str, view: str = "SA", info: Optional[str] = None, **unknown: Any) -> Iterator[Case]:
    """Yield ED and ES cases of every M&Ms-2 (and M&Ms-1) subject under ``path``.

    Args:
        path: Folder with subject folders, or with the subject files themselves.
        view: ``"SA"`` (short axis, default) or ``"LA"`` (long axis) for M&Ms-2.
        info: Optional CSV of subject information (M&Ms-2 ``dataset_information.csv`` or
            the M&Ms-1 CSV with ``External code``, ``ED``, ``ES`` columns).
        **unknown: Rejected (listing the valid options).

    Returns:
        Iterator of cases in canonical labels with real geometry.

    Raises:
        DataError: naming the file, for missing labels, read errors, geometry mismatch,
            unknown label values, or missing ED/ES indices for M&Ms-1.
        ConfigError: bad options.
    """
    reject_unknown("mnms", unknown, ["view", "info"])
    view = opt_choice(view, "mnms.view", ["SA", "LA"])
    table = _read_info(info) if info else {}
    root = require_dir(path)
    found = 0
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        for stem, image_file in _volumes(folder):
            match2, match1 = _MNMS2.match(stem), _MNMS1.match(stem)
            if match2 and match2.group(2) == view:
                found += 1
                yield _mnms2_case(image_file, stem, match2.groups(), table)
            elif match1:
                found += 1
                yield from _mnms1_cases(image_file, stem, match1.group(1), table, info)
    if not found:
        raise DataError(root, f"no M&Ms files found (expected NNN_{view}_ED.nii.gz or CODE_sa.nii.gz)")


def _volumes(folder: Path) -> List[Tuple[str, Path]]:
    out = []
    for file in sorted(folder.iterdir()):
        stem, suffix = split_suffix(file.name, (".nii.gz", ".nii"))
        if suffix and file.is_file() and not stem.endswith("_gt"):
            out.append((stem, file))
    return out


def _label_file(image_file: Path, stem: str) -> Path:
    label = find_nifti(image_file.parent, f"{stem}_gt")
    if label is None:
        raise DataError(image_file, f"no label file {stem}_gt.nii.gz beside the image")
    return label


def _norm_id(code: str) -> str:
    # M&Ms-2 CSVs write subject 1 where file names say 001.
    return str(int(code)) if code.isdigit() else code.upper()


def _read_info(info: str) -> Dict[str, Dict[str, str]]:
    header, rows = read_table(info)
    id_col = find_column(header, _ID_COLUMNS, info)
    return {_norm_id(row[id_col]): row for row in rows if row.get(id_col)}


def _meta_from(row: Dict[str, str]) -> Dict[str, str]:
    return {re.sub(r"\W+", "_", k.strip().lower()): v for k, v in row.items() if k}


def _mnms2_case(image_file: Path, stem: str, groups: Tuple[str, ...], table: Dict[str, Dict[str, str]]) -> Case:
    subject, view, phase = groups
    image, label = read_pair(image_file, _label_file(image_file, stem), get_convention("mnms"))
    view_part = "" if view == "SA" else f"{view}_"
    meta: Dict[str, Any] = {"original_convention": "mnms", "view": view}
    meta.update(_meta_from(table.get(_norm_id(subject), {})))
    return volume_case(
        image,
        label,
        case_id=f"mnms2_{subject}_{view_part}{phase}",
        subject_id=f"mnms2_{subject}",
        modality="MR",
        task="cardiac",
        phase=phase,
        dataset="mnms2",
        source_path=str(image_file),
        meta=meta,
    )


def _mnms1_cases(
    image_file: Path, stem: str, code: str, table: Dict[str, Dict[str, str]], info: Optional[str]
) -> Iterator[Case]:
    row = table.get(_norm_id(code))
    if row is None:
        hint = f"subject {code} is not in {info}" if info else "pass the challenge CSV as option info=PATH"
        raise DataError(image_file, f"M&Ms-1 4D cine needs ED/ES frame indices: {hint}")
    label_file = _label_file(image_file, stem)
    for phase in ("ED", "ES"):
        frame = _frame_index(row, phase, info)
        image, label = read_pair(image_file, label_file, get_convention("mnms"), frame=frame)
        if label is None or not np.any(label):
            raise DataError(label_file, f"{phase} frame {frame} has no labels (are the CSV's indices 0-based?)")
        meta: Dict[str, Any] = {"original_convention": "mnms", "view": "SA", "frame": frame}
        meta.update(_meta_from(row))
        yield volume_case(
            image,
            label,
            case_id=f"mnms_{code}_{phase}",
            subject_id=f"mnms_{code}",
            modality="MR",
            task="cardiac",
            phase=phase,
            dataset="mnms",
            source_path=str(image_file),
            meta=meta,
        )


def _frame_index(row: Dict[str, str], phase: str, info: Optional[str]) -> int:
    column = find_column(row.keys(), (phase,), info)
    try:
        return int(float(row[column]))
    except ValueError:
        raise DataError(info, f"column {phase!r} holds {row[column]!r}, not a frame index") from None
