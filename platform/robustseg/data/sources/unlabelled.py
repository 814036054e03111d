"""`unlabelled` source: a folder of images without labels, for semi-supervised regimes.

Reads 2D pictures (``.jpg``, ``.png``, ...; e.g. COVID-SemiSeg's ``unlabeled/images``) as
Z = 1 cases with unknown spacing, and volumes (``.nii.gz``, ``.mha``, ...) with their real
geometry; 2D NIfTI files are promoted to Z = 1. Every case has ``label=None``.

Options: ``modality`` ("CT" default, or "MR"); ``task``, the canonical label set the images
belong to (default ``lung_binary`` for CT, ``cardiac`` for MR), which decides the model
they can feed; ``limit`` to read only the first N files in natural name order (quick runs);
``dataset`` (default ``unlabelled``), used in case ids ``<dataset>_unl_<name>``. Each file is
its own subject: a folder of loose files carries no grouping.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

from robustseg.data.cases import Case
from robustseg.data.io import (
    PICTURE_SUFFIXES,
    VOLUME_SUFFIXES,
    files_by_stem,
    opt_choice,
    opt_int,
    picture_case,
    read_image,
    read_picture,
    reject_unknown,
    require_dir,
    split_suffix,
    volume_case,
)
from robustseg.data.labels import TASK_CLASS_NAMES
from robustseg.errors import DataError
from robustseg.registry import SOURCES

_DEFAULT_TASK = {"CT": "lung_binary", "MR": "cardiac"}


@SOURCES.register("unlabelled", options=("modality", "task", "limit", "dataset"))
def read(
    path: str,
    modality: str = "CT",
    task: Optional[str] = None,
    limit: Any = None,
    dataset: str = "unlabelled",
    **unknown: Any,
) -> Iterator[Case]:
    """Yield every picture or volume in ``path`` as an unlabelled case.

    Args:
        path: Folder of images (not searched recursively).
        modality: "CT" or "MR".
        task: Canonical label set of the data; default from the modality.
        limit: Read at most this many files (int or numeric string); None reads all.
        dataset: Dataset name recorded in the cases and used as case-id prefix.
        **unknown: Rejected (listing the valid options).

    Returns:
        Iterator of cases with ``label=None``.

    Raises:
        DataError: naming the file, for unreadable or truncated files, 4D volumes, or an
            empty folder.
        ConfigError: bad options.
    """
    reject_unknown("unlabelled", unknown, ["modality", "task", "limit", "dataset"])
    modality = opt_choice(modality, "unlabelled.modality", ["CT", "MR"])
    task = opt_choice(task or _DEFAULT_TASK[modality], "unlabelled.task", sorted(TASK_CLASS_NAMES))
    max_files = opt_int(limit, "unlabelled.limit", minimum=1)
    root = require_dir(path)
    files = list(files_by_stem(root, PICTURE_SUFFIXES + VOLUME_SUFFIXES).items())
    if not files:
        raise DataError(root, "no images found (pictures or volumes)")
    for stem, file in files[:max_files]:
        fields = dict(
            case_id=f"{dataset}_unl_{stem}",
            subject_id=f"{dataset}_unl_{stem}",
            modality=modality,
            task=task,
            dataset=dataset,
            source_path=str(file),
            meta={"unlabelled": True},
        )
        if split_suffix(file.name, PICTURE_SUFFIXES)[1]:
            yield picture_case(read_picture(file), None, **fields)
        else:
            yield volume_case(read_image(file, allow_2d=True), None, **fields)
