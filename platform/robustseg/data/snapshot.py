"""Snapshot commits of a shard store, the way table formats (Delta Lake, Iceberg) do them.

A prepared store is a set of immutable Parquet shards plus one pointer, ``manifest.json``,
that names the shards of the current snapshot with their size and SHA-256. A change is:

1. `SnapshotWriter.begin`: read the current manifest (and, on S3, its ETag);
2. write every new shard under a name no earlier run used (``part-00003-g00007-1a2b3c4d``:
   part number, generation, random run id), reusing unchanged shards by reference;
3. `SnapshotWriter.commit`: write the new manifest in one atomic step (a rename locally,
   one conditional PUT on S3 that fails if another writer committed in between);
4. `SnapshotWriter.collect_garbage`: only now delete files the new manifest does not name.

A kill at any instant therefore leaves the old snapshot or the new one, whole: before step 3
the old manifest names only old files, which nothing touched; after it, the new manifest
names only complete files. A run that fails deletes only the files it wrote itself, which no
manifest references. Readers verify every shard against the manifest
(`robustseg.data.manifest.read_shard`), so a store changed behind robustseg's back is refused,
never decoded.

Concurrency: on a local store one writer holds `ObjectStore.writer_lock` (``flock``, released
by the kernel when the holder dies) for the whole change; a second prepare is refused at once,
naming the holder. On S3, writers run optimistically and the conditional commit picks one
winner; the loser removes its files and says so. Because concurrent S3 writers may have files
in flight, garbage collection on S3 deletes files of the replaced snapshot right away but
unreferenced strays (from killed runs) only once they are older than a grace period.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

import pyarrow.fs as pafs

from robustseg.data.manifest import MANIFEST, Manifest
from robustseg.data.shards import shard_metadata
from robustseg.data.storage import ObjectStore
from robustseg.errors import StorageError

#: Top-level folders that hold shards (everything else at the root is metadata).
SHARD_FOLDERS = ("slices", "volumes")

#: S3: unreferenced files younger than this may belong to a concurrent writer and are kept.
S3_STRAY_GRACE_S = 3600.0


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (what manifests record and readers check)."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class SnapshotWriter:
    """One writer's change to a store: new immutable files, then one commit.

    Attributes:
        store: The store being changed.
        current: The manifest that was current when the change began (None: empty store).
        version: Its S3 ETag (None locally or when absent), the condition of the commit.
        run_id: ``g<generation>-<random>``, part of every file name this change writes.
        written: Files this change wrote (removed by `abort`).
    """

    store: ObjectStore
    current: Optional[Manifest]
    version: Optional[str]
    run_id: str
    written: List[str] = field(default_factory=list)

    @classmethod
    def begin(cls, store: ObjectStore) -> "SnapshotWriter":
        """Read the current snapshot of ``store`` and start a change on top of it.

        Raises:
            DataError: the current manifest exists but cannot be parsed (it is left as is).
        """
        from robustseg.data.manifest import read_manifest

        version = store.version(MANIFEST)
        current = read_manifest(store) if store.exists(MANIFEST) else None
        generation = (current.generation if current else 0) + 1
        return cls(store, current, version, f"g{generation:05d}-{uuid.uuid4().hex[:8]}")

    @property
    def generation(self) -> int:
        """Generation number of the snapshot this change will commit."""
        return int(self.run_id[1:6])

    def shard_path(self, kind: str, fold: int, part: int) -> str:
        """A never-used relative path for a new shard of ``kind`` in ``fold``."""
        return f"{kind}/fold-{fold}/part-{part:05d}-{self.run_id}.parquet"

    def write(self, rel: str, data: bytes) -> Dict[str, Any]:
        """Write one new immutable file; returns its ``{"path", "bytes", "sha256"}``."""
        self.written.append(rel)  # before the write: a failed write may leave the object behind
        self.store.write_bytes(rel, data)
        return {"path": rel, "bytes": len(data), "sha256": sha256(data)}

    def reusable(self, kind: str, fingerprint: str) -> Optional[Dict[str, Any]]:
        """A shard of the current snapshot made from the same inputs, to reuse by reference."""
        for s in (self.current.shards if self.current else ()):
            if s["kind"] == kind and s.get("fingerprint") == fingerprint and s.get("sha256"):
                # A file deleted or truncated behind robustseg's back is rewritten, not referenced
                # again (readers check the checksum; a size check here costs one stat).
                if self.store.exists(s["path"]) and self.store.size(s["path"]) == int(s["bytes"]):
                    return {"path": s["path"], "bytes": int(s["bytes"]), "sha256": s["sha256"]}
        return None

    def stray(self, kind: str, fingerprint: str) -> Optional[Dict[str, Any]]:
        """A complete shard left by a killed run with the same inputs (local stores only).

        Files get their final name only once complete (write, fsync, rename), and the writer
        lock guarantees no other run is writing, so such a file can be adopted: this is how
        an interrupted prepare resumes without redoing finished shards.
        """
        if not self.store.is_local:
            return None
        for rel in self._unreferenced(kind):
            md = shard_metadata(self.store, rel)
            if md is not None and md.get("fingerprint") == fingerprint:
                data = self.store.read_bytes(rel)
                return {"path": rel, "bytes": len(data), "sha256": sha256(data)}
        return None

    def commit(self, manifest: Manifest) -> None:
        """Make ``manifest`` the current snapshot in one atomic step.

        Raises:
            CommitConflict: (S3) another writer committed since `begin`; nothing of this
                change is visible.
        """
        manifest.generation = self.generation
        manifest.snapshot = self.run_id
        self.store.put_if(MANIFEST, manifest.to_json().encode(), self.version, exists=self.current is not None)

    def abort(self) -> None:
        """Delete the files this change wrote (no manifest references them)."""
        for rel in self.written:
            self.store.delete(rel)
        self.written.clear()

    def collect_garbage(self, manifest: Manifest, grace_s: Optional[float] = None) -> List[str]:
        """After a commit: delete shard files that ``manifest`` does not reference.

        Args:
            manifest: The snapshot just committed.
            grace_s: Keep unreferenced strays younger than this (default: 0 on a locked local
                store, `S3_STRAY_GRACE_S` on S3). Files of the replaced snapshot always go.

        Returns:
            The relative paths deleted.
        """
        if grace_s is None:
            grace_s = 0.0 if self.store.is_local else S3_STRAY_GRACE_S
        keep = {s["path"] for s in manifest.shards}
        replaced = {s["path"] for s in self.current.shards} if self.current else set()
        now = time.time()
        deleted = []
        for rel, mtime in self._files(include_partial=True):
            if rel in keep:
                continue
            if rel in replaced or rel in self.written or now - mtime >= grace_s:
                self.store.delete(rel)
                deleted.append(rel)
        return deleted

    # ------------------------------------------------------------------ internals
    def _unreferenced(self, kind: str) -> List[str]:
        known: Set[str] = {s["path"] for s in self.current.shards} if self.current else set()
        return [rel for rel, _ in self._files() if rel.startswith(kind + "/") and rel not in known
                and rel.endswith(".parquet")]

    def _files(self, include_partial: bool = False) -> List[tuple]:
        """(relative path, mtime) of every file under the shard folders (and, with
        ``include_partial``, half-written temporaries of killed local writes anywhere)."""
        out = []
        base = self.store.root + "/"
        for folder in SHARD_FOLDERS + (("",) if include_partial and self.store.is_local else ()):
            sel = pafs.FileSelector(self.store.path(folder), recursive=bool(folder), allow_not_found=True)
            try:
                infos = self.store.fs.get_file_info(sel)
            except OSError as e:
                raise StorageError(self.store.uri_of(folder), "could not list", e) from e
            for i in infos:
                if i.type != pafs.FileType.File:
                    continue
                rel = i.path[len(base):] if i.path.startswith(base) else i.path
                partial = "/.tmp-" in "/" + rel
                if (partial and not include_partial) or (not folder and not partial):
                    continue
                mtime = i.mtime.timestamp() if i.mtime is not None else 0.0
                out.append((rel, mtime))
        return sorted(out)


def describe_diff(old: Any, new: Any, prefix: str = "") -> List[str]:
    """Human-readable differences between two JSON-like values (``"a.b: 1 -> 2"``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: List[str] = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (unset) -> {new[k]!r}")
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (unset)")
            else:
                out.extend(describe_diff(old[k], new[k], key))
        return out
    return [] if old == new else [f"{prefix or 'value'}: {old!r} -> {new!r}"]

