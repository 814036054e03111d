"""Whole-volume shards (one row per case) for 3D models, derived from slice tables.

A volume row concatenates its slices' encoded bytes, so a 3D loader reads one row per case
instead of grouping slice rows; scale/offset stay per slice (lists). Only written when
``data.store_volumes`` is on: 2D slices always reassemble into volumes too
(`robustseg.data.manifest.load_case_volume`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import pyarrow as pa

from robustseg.data.shards import SliceLayout, _DTYPES, unfilter

_SCALARS = ("case_id", "subject_id", "dataset", "phase", "modality", "motion_level", "fold",
            "has_label", "train_labelled", "n_slices", "spacing_x", "spacing_y", "spacing_z")


def volume_table(slices: pa.Table, layout: SliceLayout) -> pa.Table:
    """Group a slice table (rows of one case contiguous, in slice order) into volume rows."""
    case_ids = slices.column("case_id").to_pylist()
    starts = [i for i, c in enumerate(case_ids) if i == 0 or c != case_ids[i - 1]]
    ends = starts[1:] + [len(case_ids)]
    cols: Dict[str, list] = {k: [] for k in _SCALARS + ("image", "image_scale", "image_offset", "label")}
    img_col = slices.column("image").to_pylist()
    lbl_col = slices.column("label").to_pylist()
    scale = slices.column("image_scale").to_numpy()
    offset = slices.column("image_offset").to_numpy()
    for s, e in zip(starts, ends):
        for k in _SCALARS:
            cols[k].append(slices.column(k)[s].as_py())
        cols["image"].append(b"".join(img_col[s:e]))
        cols["image_scale"].append(scale[s:e].tolist())
        cols["image_offset"].append(offset[s:e].tolist())
        cols["label"].append(b"".join(lbl_col[s:e]) if lbl_col[s] is not None else None)
    schema = pa.schema(
        [slices.schema.field(k) for k in _SCALARS]
        + [("image", pa.large_binary()), ("image_scale", pa.list_(pa.float32())),
           ("image_offset", pa.list_(pa.float32())), ("label", pa.large_binary())]
    ).with_metadata(slices.schema.metadata)
    return pa.table(cols, schema=schema)


def decode_volume(row: Dict[str, object], layout: SliceLayout) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Decode one volume row (as from ``table.to_pylist()``) to (image (Z,H,W) float32, label or None)."""
    z = int(row["n_slices"])  # type: ignore[arg-type]
    img = np.frombuffer(row["image"], dtype=_DTYPES[layout.image_dtype]).reshape(z, layout.height, layout.width)  # type: ignore[arg-type]
    scale = np.asarray(row["image_scale"], np.float32)[:, None, None]
    offset = np.asarray(row["image_offset"], np.float32)[:, None, None]
    image = unfilter(img, layout).astype(np.float32) * scale + offset
    label = None
    if row["label"] is not None:
        label = np.frombuffer(row["label"], dtype=np.uint8).reshape(z, layout.height, layout.width).copy()  # type: ignore[arg-type]
    return image, label
