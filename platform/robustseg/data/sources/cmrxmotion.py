"""`cmrxmotion` source: the CMRxMotion challenge (respiratory motion in cardiac MRI).

Files are named ``P<subject>-<scan>-<phase>``: ``P001-1-ED.nii.gz`` with labels
``P001-1-ED-label.nii.gz``, either flat in ``<root>`` or in per-scan folders
(``<root>/P001-1/P001-1-ED.nii.gz``). Every scan of a volunteer was acquired under a
different breath-hold instruction, so all of them share ``subject_id`` ``cmrx_P001``: folds
must never split them. Labels follow the CMRxMotion convention (1 LV, 2 MYO, 3 RV), which is
also the canonical one. Images without a ``-label`` file (the challenge leaves the worst
motion unlabelled) are yielded with ``label=None``.

Motion levels come from the challenge's image-quality table, given as option
``motion_levels``: a CSV mapping an image name (``P001-1-ED``, or a scan ``P001-1``) to a
level 1-3 (0 is accepted as "no motion"). Without the table, or for images it does not list,
the level is -1 (unknown).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from robustseg.data.cases import MOTION_UNKNOWN, Case
from robustseg.data.io import (
    find_column,
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

_NAME = re.compile(r"^(P\d+)-(\d+)-(ED|ES)$", re.IGNORECASE)
_NAME_COLUMNS = ("image", "name", "case", "file", "filename", "img")
_LEVEL_COLUMNS = ("label", "level", "motion_level", "quality", "score", "iqa")


@SOURCES.register("cmrxmotion", options=("motion_levels",))
def read(path: str, motion_levels: Optional[str] = None, **unknown: Any) -> Iterator[Case]:
    """Yield every CMRxMotion image under ``path``, labelled or not.

    Args:
        path: Folder with the images, flat or in per-scan folders.
        motion_levels: Optional CSV of image name -> motion level (the challenge's
            quality labels).
        **unknown: Rejected (listing the valid options).

    Returns:
        Iterator of cases ``cmrx_P001-1_ED`` with real geometry; ``label`` may be None.

    Raises:
        DataError: naming the file, for read errors, geometry mismatch, unknown label
            values, an orphan label file, or a malformed motion-level table.
        ConfigError: bad options.
    """
    reject_unknown("cmrxmotion", unknown, ["motion_levels"])
    levels = read_motion_levels(motion_levels) if motion_levels else {}
    root = require_dir(path)
    images = _find_images(root)
    if not images:
        raise DataError(root, "no CMRxMotion images found (expected names like P001-1-ED.nii.gz)")
    convention = get_convention("cmrxmotion")
    for (subject, scan, phase), (image_file, label_file) in sorted(images.items()):
        image, label = read_pair(image_file, label_file, convention)
        level = levels.get(f"{subject}-{scan}-{phase}", levels.get(f"{subject}-{scan}", MOTION_UNKNOWN))
        yield volume_case(
            image,
            label,
            case_id=f"cmrx_{subject}-{scan}_{phase}",
            subject_id=f"cmrx_{subject}",
            modality="MR",
            task="cardiac",
            phase=phase,
            motion_level=level,
            dataset="cmrxmotion",
            source_path=str(image_file),
            meta={
                "original_convention": "cmrxmotion",
                "scan": f"{subject}-{scan}",
                "motion_source": "table" if level != MOTION_UNKNOWN else "unknown",
            },
        )


def _find_images(root: Path) -> Dict[Tuple[str, str, str], Tuple[Path, Optional[Path]]]:
    images: Dict[Tuple[str, str, str], Path] = {}
    labels: Dict[Tuple[str, str, str], Path] = {}
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.iterdir()):
            stem, suffix = split_suffix(file.name, (".nii.gz", ".nii"))
            is_label = stem.lower().endswith("-label")
            match = _NAME.match(stem[: -len("-label")] if is_label else stem)
            if not suffix or match is None:
                continue
            key = (match.group(1).upper(), match.group(2), match.group(3).upper())
            target = labels if is_label else images
            if key in target:
                raise DataError(file, f"duplicate of {target[key]}")
            target[key] = file
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DataError(labels[orphans[0]], f"label file has no image ({len(orphans)} orphan label file(s))")
    return {key: (file, labels.get(key)) for key, file in images.items()}


def read_motion_levels(path: str) -> Dict[str, int]:
    """Read a CSV of image (or scan) name -> motion level.

    The name column is found by header (``Image``, ``Name``, ...), the level column by
    ``Label``/``Level``/``Quality``/...; names may carry a ``.nii.gz`` suffix or folders.

    Args:
        path: The CSV file.

    Returns:
        ``{"P001-1-ED": 2, ...}`` with upper-cased subject and phase.

    Raises:
        DataError: naming the CSV, for a missing column, a bad level, or a bad name.
    """
    header, rows = read_table(path)
    name_col = find_column(header, _NAME_COLUMNS, path)
    level_col = find_column(header, _LEVEL_COLUMNS, path)
    levels: Dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        raw_name = Path(row[name_col].replace("\\", "/")).name
        stem = split_suffix(raw_name, (".nii.gz", ".nii"))[0] or raw_name
        levels[_normalise(stem, path, number)] = _level(row[level_col], path, number)
    return levels


def _normalise(stem: str, where: str, line: int) -> str:
    parts: List[str] = stem.split("-")
    if len(parts) not in (2, 3) or not re.fullmatch(r"P\d+", parts[0], re.IGNORECASE):
        raise DataError(where, f"line {line}: {stem!r} is not an image name like P001-1-ED or a scan like P001-1")
    return "-".join(p.upper() for p in parts)


def _level(text: str, where: str, line: int) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value.is_integer() and 0 <= value <= 3):
        raise DataError(where, f"line {line}: motion level {text!r} is not an integer 0-3")
    return int(value)
