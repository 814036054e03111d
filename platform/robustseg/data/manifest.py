"""The shard manifest: the one file that makes a prepared dataset visible, and its readers.

``manifest.json`` is written last and atomically by `robustseg.data.prepare`: until it
exists, shards are invisible to readers. It lists every shard (path, fold, rows, bytes,
fingerprint), every case (subject, fold, slices, labels, original geometry and the
preprocessing record that inverts predictions back to it) and the fold design.

Readers here use pyarrow alone, so the engine can stream shards on a machine without Ray.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from robustseg.data.shards import SliceLayout, decode_images, decode_labels, read_table
from robustseg.data.storage import ObjectStore, open_store
from robustseg.errors import DataError, StorageError

MANIFEST = "manifest.json"
PLAN = "plan.json"


@dataclass
class Manifest:
    """What a prepared dataset holds.

    Attributes:
        uri: Store URI the manifest describes.
        layout: Slice layout (height, width, encoding).
        plan: The preprocessing plan (`Plan.to_dict()`).
        task: Canonical label set ("cardiac", "lung_binary", ...).
        class_names: Class index (as str, JSON keys) -> structure name.
        folds: ``{"k", "seed", "stratify", "subjects": {subject: fold}}``.
        label_budget: ``{"n", "seed", "subjects": [...]}`` or None.
        cases: One dict per case (see `robustseg.data.prepare`).
        shards: One dict per shard: path, kind, fold, rows, bytes, cases, fingerprint.
        created: ISO timestamp.
        data_config: The resolved `DataConfig` as a dict.
        version: Manifest format version.
    """

    uri: str
    layout: SliceLayout
    plan: Dict[str, Any]
    task: str
    class_names: Dict[str, str]
    folds: Dict[str, Any]
    label_budget: Optional[Dict[str, Any]]
    cases: List[Dict[str, Any]]
    shards: List[Dict[str, Any]]
    created: str
    data_config: Dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def to_json(self) -> str:
        """Serialise to JSON text."""
        d = asdict(self)
        d["layout"] = self.layout.to_dict()
        return json.dumps(d, indent=1, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
        """Parse JSON text, naming ``where`` on failure."""
        try:
            d = json.loads(text)
            d["layout"] = SliceLayout(**d["layout"])
            return cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(where, f"not a valid robustseg manifest ({e})") from None

    # ------------------------------------------------------------------ queries
    @property
    def n_slices(self) -> int:
        """Total 2D slices."""
        return sum(int(s["rows"]) for s in self.shards if s["kind"] == "slices")

    @property
    def total_bytes(self) -> int:
        """Total shard bytes."""
        return sum(int(s["bytes"]) for s in self.shards)

    def case(self, case_id: str) -> Dict[str, Any]:
        """The manifest entry of ``case_id``."""
        for c in self.cases:
            if c["case_id"] == case_id:
                return c
        raise KeyError(f"case {case_id!r} is not in {self.uri}")

    def case_ids(self, folds: Optional[Iterable[int]] = None, exclude_folds: Optional[Iterable[int]] = None) -> List[str]:
        """Case ids, optionally restricted to / excluding folds."""
        inc = set(folds) if folds is not None else None
        exc = set(exclude_folds or ())
        return [c["case_id"] for c in self.cases
                if (inc is None or c["fold"] in inc) and c["fold"] not in exc]

    def shard_paths(self, kind: str = "slices", folds: Optional[Iterable[int]] = None,
                    exclude_folds: Optional[Iterable[int]] = None) -> List[str]:
        """Relative shard paths of a kind, optionally by fold (shards never mix folds)."""
        inc = set(folds) if folds is not None else None
        exc = set(exclude_folds or ())
        return [s["path"] for s in self.shards
                if s["kind"] == kind and (inc is None or s["fold"] in inc) and s["fold"] not in exc]

    def fold_summary(self) -> List[Dict[str, Any]]:
        """Per fold: subjects, cases, slices (for CLI tables)."""
        out = []
        for f in range(int(self.folds["k"])):
            cs = [c for c in self.cases if c["fold"] == f]
            out.append({
                "fold": f,
                "subjects": len({c["subject_id"] for c in cs}),
                "cases": len(cs),
                "slices": sum(int(c["n_slices"]) for c in cs),
                "labelled": sum(1 for c in cs if c["has_label"]),
            })
        return out


def read_manifest(store: Union[str, ObjectStore]) -> Manifest:
    """Read ``manifest.json`` from a store or URI.

    Raises:
        StorageError: the store is unreachable or holds no manifest (nothing prepared there,
            or a prepare run that did not finish).
    """
    st = open_store(store) if isinstance(store, str) else store
    if not st.exists(MANIFEST):
        raise StorageError(st.uri_of(MANIFEST), "no manifest: run `robustseg prepare` to this URI first "
                           "(a prepare run that failed leaves no manifest)")
    return Manifest.from_json(st.read_bytes(MANIFEST).decode(), st.uri_of(MANIFEST))


def load_slices(store: ObjectStore, manifest: Manifest, folds: Optional[Iterable[int]] = None,
                exclude_folds: Optional[Iterable[int]] = None, columns: Optional[Sequence[str]] = None) -> pa.Table:
    """Read the slice rows of some folds as one Arrow table (pyarrow only)."""
    paths = manifest.shard_paths("slices", folds, exclude_folds)
    if not paths:
        return pa.Table.from_batches([], schema=_schema_subset(manifest.layout, columns))
    return pa.concat_tables([read_table(store, p, columns) for p in paths])


def _schema_subset(layout: SliceLayout, columns: Optional[Sequence[str]]) -> pa.Schema:
    from robustseg.data.shards import slice_schema

    schema = slice_schema(layout)
    if not columns:
        return schema
    return pa.schema([schema.field(c) for c in columns])


def load_case_volume(store: ObjectStore, manifest: Manifest, case_id: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Reassemble one preprocessed case from its slices.

    Returns:
        (image float32 (Z, H, W), label uint8 (Z, H, W) or None).
    """
    entry = manifest.case(case_id)
    table = read_table(store, entry["shard"], filters=[("case_id", "=", case_id)])
    order = np.argsort(table.column("slice_index").to_numpy())
    table = table.take(pa.array(order))
    image = decode_images(table, manifest.layout)
    label = decode_labels(table, manifest.layout) if entry["has_label"] else None
    return image, label
