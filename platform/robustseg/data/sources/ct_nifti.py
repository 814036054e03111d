"""`ct_nifti` source: a folder of lung CT volumes (NIfTI, MetaImage, NRRD) with optional masks.

Layouts, checked in this order for each image ``NAME``:

- ``<root>/images/NAME.nii.gz`` with ``<root>/masks/NAME.nii.gz``;
- ``NAME_mask.nii.gz`` or ``NAME_seg.nii.gz`` beside the image (in ``images/`` or, when
  there is no ``images/`` folder, in ``<root>`` itself).

An image with no mask is yielded unlabelled (``label=None``); a mask with no image is an
error. Intensities stay in Hounsfield units as float32 (windowing is the plan's job).

Tasks: with ``multiclass=False`` (default) the task is ``lung_binary`` and any non-zero mask
value is infection (so a ground-glass/consolidation mask becomes a binary infection mask);
with ``multiclass=True`` the mask must hold 0/1/2 (``lung_multiclass``: ground glass,
consolidation) and any other value is an error. Each volume is taken to be its own subject
(``subject_id == case_id``): the layout carries no patient grouping.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

from robustseg.data.cases import Case
from robustseg.data.io import (
    VOLUME_SUFFIXES,
    files_by_stem,
    opt_bool,
    read_pair,
    reject_orphan_masks,
    reject_unknown,
    require_dir,
    volume_case,
)
from robustseg.data.labels import get_convention
from robustseg.errors import DataError
from robustseg.registry import SOURCES

_MASK_TAILS = ("_mask", "_seg")


@SOURCES.register("ct_nifti", options=("multiclass", "dataset"))
def read(path: str, multiclass: Any = False, dataset: str = "ct", **unknown: Any) -> Iterator[Case]:
    """Yield every CT volume under ``path`` with its mask when there is one.

    Args:
        path: Root folder (see the module docstring for layouts).
        multiclass: True for ``lung_multiclass`` masks (0/1/2), False for ``lung_binary``
            (any non-zero value is infection). Strings "true"/"false" are accepted.
        dataset: Dataset name recorded in the cases and used as case-id prefix.
        **unknown: Rejected (listing the valid options).

    Returns:
        Iterator of CT cases with real geometry, HU intensities and canonical labels.

    Raises:
        DataError: naming the file, for orphan masks, read errors, image/mask geometry
            mismatch, or (multiclass) unknown mask values.
        ConfigError: bad options.
    """
    reject_unknown("ct_nifti", unknown, ["multiclass", "dataset"])
    multi = opt_bool(multiclass, "ct_nifti.multiclass")
    task = "lung_multiclass" if multi else "lung_binary"
    convention = get_convention(task)
    pairs = _pairs(require_dir(path))
    for name, (image_file, mask_file) in pairs:
        image, label = read_pair(image_file, mask_file, convention, binary=not multi)
        yield volume_case(
            image,
            label,
            case_id=f"{dataset}_{name}",
            subject_id=f"{dataset}_{name}",
            modality="CT",
            task=task,
            dataset=dataset,
            source_path=str(image_file),
            meta={
                "original_convention": task if multi else "nonzero_is_infection",
                "mask_path": str(mask_file) if mask_file else None,
            },
        )


def _pairs(root: Path) -> List[Tuple[str, Tuple[Path, Optional[Path]]]]:
    image_dir = root / "images" if (root / "images").is_dir() else root
    files = files_by_stem(image_dir, VOLUME_SUFFIXES)
    beside = {stem: p for stem, p in files.items() if stem.endswith(_MASK_TAILS)}
    images = {stem: p for stem, p in files.items() if stem not in beside}
    masks = files_by_stem(root / "masks", VOLUME_SUFFIXES) if (root / "masks").is_dir() else {}
    for stem, file in beside.items():
        owner = stem.rsplit("_", 1)[0]
        if owner in masks:
            raise DataError(file, f"two masks for image {owner}: this one and {masks[owner]}")
        masks[owner] = file
    reject_orphan_masks(masks, images, image_dir)
    if not images:
        raise DataError(root, f"no CT volumes found (looked for {', '.join(VOLUME_SUFFIXES)} in {image_dir})")
    return [(stem, (images[stem], masks.get(stem))) for stem in images]  # natural order
