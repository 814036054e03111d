"""The shard manifest: the one file that makes a prepared dataset visible, and its readers.

``manifest.json`` is the commit of a snapshot (`robustseg.data.snapshot`): written last and
atomically, it names every shard of the snapshot (path, fold, rows, bytes, SHA-256, layout,
fingerprint), every case (subject, fold, slices, labels, original geometry and the
preprocessing record that inverts predictions back to it) and the fold design.

Readers verify before they decode: `read_shard` refuses a shard whose size, checksum or
layout disagrees with the manifest, naming both, so a store changed outside robustseg (or
by an older, non-snapshot writer) fails loudly instead of training on scrambled slices.
Shards are immutable once named, so a shard verified once stays valid while it exists.

Readers here use pyarrow alone, so the engine can stream shards on a machine without Ray.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from robustseg.data.shards import META_KEY, SliceLayout, decode_images, decode_labels
from robustseg.data.storage import ObjectStore, open_store
from robustseg.errors import DataError, StorageError

MANIFEST = "manifest.json"
PLAN = "plan.json"

#: Manifest format: 1 = shards rewritten in place, no checksums; 2 = immutable snapshots.
MANIFEST_VERSION = 2


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
        shards: One dict per shard: path, kind, fold, rows, bytes, sha256, layout, cases,
            fingerprint.
        created: ISO timestamp.
        data_config: The resolved `DataConfig` as a dict.
        version: Manifest format version (`MANIFEST_VERSION`).
        generation: Snapshot number, 1 for the first commit to a store.
        snapshot: Id of the run that committed it (part of its new shards' names).
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
    version: int = MANIFEST_VERSION
    generation: int = 0
    snapshot: str = ""

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
            m = cls(**d)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(where, f"not a valid robustseg manifest ({e})") from None
        if m.version > MANIFEST_VERSION:
            raise DataError(where, f"manifest format {m.version} is newer than this robustseg reads "
                            f"({MANIFEST_VERSION}): upgrade robustseg")
        return m

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
    """Read the slice rows of some folds as one Arrow table (pyarrow only), each shard verified."""
    paths = manifest.shard_paths("slices", folds, exclude_folds)
    if not paths:
        return pa.Table.from_batches([], schema=_schema_subset(manifest.layout, columns))
    return pa.concat_tables([read_shard(store, manifest, p, columns) for p in paths])


def _schema_subset(layout: SliceLayout, columns: Optional[Sequence[str]]) -> pa.Schema:
    from robustseg.data.shards import slice_schema

    schema = slice_schema(layout)
    if not columns:
        return schema
    return pa.schema([schema.field(c) for c in columns])


def load_case_volume(store: ObjectStore, manifest: Manifest, case_id: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Reassemble one preprocessed case from its slices (its shard verified first).

    Returns:
        (image float32 (Z, H, W), label uint8 (Z, H, W) or None).
    """
    entry = manifest.case(case_id)
    table = read_shard(store, manifest, entry["shard"], filters=[("case_id", "=", case_id)])
    order = np.argsort(table.column("slice_index").to_numpy())
    table = table.take(pa.array(order))
    image = decode_images(table, manifest.layout)
    label = decode_labels(table, manifest.layout) if entry["has_label"] else None
    return image, label


# ------------------------------------------------------------------------------ verification
#: The last few verified shards (by URI and checksum): evaluating a store case by case reads
#: the same shard once per case, and shards are immutable, so one read and hash suffice.
_VERIFIED: "OrderedDict[Tuple[str, str], bytes]" = OrderedDict()
_VERIFIED_MAX = 4


def shard_entry(manifest: Manifest, rel: str) -> Dict[str, Any]:
    """The manifest's entry for the shard at ``rel``."""
    for s in manifest.shards:
        if s["path"] == rel:
            return s
    raise KeyError(f"shard {rel!r} is not in the manifest of {manifest.uri}")


def verified_bytes(store: ObjectStore, manifest: Manifest, rel: str, *, cached: bool = True) -> bytes:
    """The bytes of shard ``rel``, after checking size, SHA-256 and layout against the manifest.

    Args:
        cached: Serve a shard verified earlier in this process from memory (False: read it
            again, as ``inspect --verify`` must).

    Raises:
        StorageError: the shard is missing, or its size, checksum or layout disagrees with
            the manifest; the message names the shard and the manifest.
    """
    entry = shard_entry(manifest, rel)
    key = (store.uri_of(rel), str(entry.get("sha256")))
    if cached and entry.get("sha256") and key in _VERIFIED:
        _VERIFIED.move_to_end(key)
        return _VERIFIED[key]
    if not store.exists(rel):
        raise StorageError(store.uri_of(rel), f"shard missing: {_where(store)} lists it")
    data = store.read_bytes(rel)
    problem = _shard_problem(data, entry, manifest.layout)
    if problem:
        raise StorageError(store.uri_of(rel), f"{problem}; {_where(store)} promises otherwise. The store was "
                           "changed outside robustseg or by an interrupted older writer: re-run "
                           "`robustseg prepare --force` or restore the store")
    if entry.get("sha256"):
        _VERIFIED[key] = data
    while len(_VERIFIED) > _VERIFIED_MAX:
        _VERIFIED.popitem(last=False)
    return data


def read_shard(store: ObjectStore, manifest: Manifest, rel: str, columns: Optional[Sequence[str]] = None,
               filters: Optional[Any] = None) -> pa.Table:
    """Read one verified shard (optionally a column subset and a row filter)."""
    data = verified_bytes(store, manifest, rel)
    try:
        return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None, filters=filters)
    except (OSError, pa.ArrowInvalid) as e:
        raise StorageError(store.uri_of(rel), "shard unreadable", e) from e


def verify_store(store: ObjectStore, manifest: Manifest, checksums: bool = True) -> List[str]:
    """Problems of a store against its manifest (empty: healthy).

    Args:
        checksums: Read and hash every shard (`robustseg inspect --verify`); otherwise only
            presence and size, which costs one listing.
    """
    problems = []
    for s in manifest.shards:
        rel = s["path"]
        try:
            if checksums:
                verified_bytes(store, manifest, rel, cached=False)
            elif not store.exists(rel):
                problems.append(f"{store.uri_of(rel)}: shard missing")
            elif store.size(rel) != int(s["bytes"]):
                problems.append(f"{store.uri_of(rel)}: {store.size(rel)} bytes, the manifest says {s['bytes']}")
        except StorageError as e:
            problems.append(str(e))
    if manifest.version < 2:
        problems.append(f"{_where(store)}: format {manifest.version} records no checksums; "
                        "re-run `robustseg prepare` to rewrite it as a verified snapshot")
    return problems


def _where(store: ObjectStore) -> str:
    return store.uri_of(MANIFEST)


def _shard_problem(data: bytes, entry: Dict[str, Any], layout: SliceLayout) -> Optional[str]:
    if len(data) != int(entry["bytes"]):
        return f"size {len(data)} bytes, not {entry['bytes']}"
    want = entry.get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        return f"SHA-256 {hashlib.sha256(data).hexdigest()[:16]}..., not {want[:16]}..."
    try:
        md = json.loads((pq.read_schema(pa.BufferReader(data)).metadata or {}).get(META_KEY, b"{}"))
    except (OSError, pa.ArrowInvalid, ValueError) as e:
        return f"not a readable shard ({e})"
    if md.get("layout") != layout.to_dict():
        return f"layout {md.get('layout')}, not the manifest's {layout.to_dict()}"
    return None
