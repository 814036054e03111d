"""`slices2d` source: folders of 2D CT slices with masks, as COVID-SemiSeg's ``labeled`` set.

Layout::

    <root>/images/N.jpg                 display-windowed slice (grey or RGB: RGB becomes grey)
    <root>/infection_masks/N.png        0 background, 255 (or 1) infection  -> lung_binary
    <root>/multiclass_masks/N.png       0 / 1 ground glass / 2 consolidation -> lung_multiclass

Option ``masks`` picks the mask folder (``"infection"``, the default, ``"multiclass"``, or
``"none"`` to read the images unlabelled). Images and masks are paired by file name without
suffix; a mask without an image, or an image without a mask, is an error rather than a
silently smaller data set.

Each slice becomes a `Case` with Z = 1, spacing (1, 1, 1) and ``spacing_known=False`` (the
8-bit pictures keep no HU and no spacing). No patient grouping survives in these files, so
every slice is its own subject (``subject_id == case_id``); neighbouring slices of one
patient can therefore land in different folds, which the published splits also accept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import numpy as np

from robustseg.data.cases import Case
from robustseg.data.io import (
    PICTURE_SUFFIXES,
    files_by_stem,
    opt_choice,
    picture_case,
    read_picture,
    reject_orphan_masks,
    reject_unknown,
    require_dir,
)
from robustseg.data.labels import LabelConvention, get_convention
from robustseg.errors import DataError
from robustseg.registry import SOURCES

_MASKS = {
    "infection": ("infection_masks", "lung_binary"),
    "multiclass": ("multiclass_masks", "lung_multiclass"),
}


@SOURCES.register("slices2d", options=("masks", "dataset"))
def read(path: str, masks: str = "infection", dataset: str = "covid_semiseg", **unknown: Any) -> Iterator[Case]:
    """Yield one Z = 1 case per slice in ``<path>/images``.

    Args:
        path: Folder holding ``images/`` and the mask folders.
        masks: ``"infection"`` (binary), ``"multiclass"`` or ``"none"``.
        dataset: Dataset name recorded in the cases and used as case-id prefix.
        **unknown: Rejected (listing the valid options).

    Returns:
        Iterator of CT slice cases, labelled unless ``masks="none"``.

    Raises:
        DataError: naming the files, for unpaired images/masks, size mismatch, unreadable
            pictures or mask values outside the convention.
        ConfigError: bad options.
    """
    reject_unknown("slices2d", unknown, ["masks", "dataset"])
    kind = opt_choice(masks, "slices2d.masks", ["infection", "multiclass", "none"])
    root = require_dir(path)
    images = files_by_stem(require_dir(root / "images"), PICTURE_SUFFIXES)
    if not images:
        raise DataError(root / "images", "no pictures found")
    task = _MASKS[kind][1] if kind != "none" else "lung_binary"
    mask_files = _paired_masks(root, kind, images)
    convention = get_convention(task)
    for stem, image_file in images.items():
        image = read_picture(image_file)
        mask_file = mask_files.get(stem)
        label = _read_mask(mask_file, image_file, tuple(image.shape), convention) if mask_file else None
        yield picture_case(
            image,
            label,
            case_id=f"{dataset}_{stem}",
            subject_id=f"{dataset}_{stem}",
            modality="CT",
            task=task,
            dataset=dataset,
            source_path=str(image_file),
            meta={"mask_path": str(mask_file) if mask_file else None, "masks": kind},
        )


def _paired_masks(root: Path, kind: str, images: Dict[str, Path]) -> Dict[str, Path]:
    if kind == "none":
        return {}
    masks = files_by_stem(require_dir(root / _MASKS[kind][0]), PICTURE_SUFFIXES)
    reject_orphan_masks(masks, images, root / "images")
    missing = [stem for stem in images if stem not in masks]
    if missing:
        where = images[missing[0]]
        problem = f"image has no {kind} mask in {root / _MASKS[kind][0]} ({len(missing)} unmasked image(s))"
        raise DataError(where, problem)
    return masks


def _read_mask(mask_file: Path, image_file: Path, shape: Tuple[int, ...], convention: LabelConvention) -> np.ndarray:
    raw = read_picture(mask_file, mask=True)
    if raw.shape != tuple(shape):
        raise DataError(
            mask_file,
            f"mask size {raw.shape[1]}x{raw.shape[0]} (W x H) differs from image {image_file} "
            f"size {shape[1]}x{shape[0]}",
        )
    return convention.to_canonical(raw, where=mask_file)
