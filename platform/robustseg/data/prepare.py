"""`prepare`: sources -> validation -> folds -> preprocessing plan -> Parquet shards + manifest.

Order matters for the "nothing half-written" promise:

1. the store is checked first (an unreachable S3 endpoint fails before any work);
2. every case is read and validated before anything is written, so bad input (unreadable
   file, geometry mismatch, unknown labels, NaN, empty volume, duplicate ids) stops the run
   with no output at all;
3. shards are written one at a time, each atomically; a shard whose fingerprint (plan +
   case contents + folds) matches an existing one is skipped, so re-runs are cheap;
4. ``plan.json`` and ``manifest.json`` are written last: the manifest is the commit point.
   A run that fails in step 3 removes the shards it wrote and leaves the previous manifest
   (if any) untouched.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from robustseg.config import DataConfig
from robustseg.data.cases import Case, check_unique_ids, validate_case
from robustseg.data.labels import TASK_CLASS_NAMES
from robustseg.data.manifest import MANIFEST, PLAN, Manifest
from robustseg.data.preprocess import build_plan
from robustseg.data.shards import (
    FORMAT_VERSION,
    SliceLayout,
    build_table,
    case_rows,
    shard_metadata,
    table_to_parquet,
)
from robustseg.data.sources import read_source
from robustseg.data.splits import grouped_kfold, label_budget, subject_strata
from robustseg.data.storage import ObjectStore, open_store
from robustseg.data.volumes import volume_table
from robustseg.errors import ConfigError, DataError

ProgressFactory = Callable[..., Any]


@dataclass
class PrepareSummary:
    """What a prepare run did (printed by the CLI, returned to callers)."""

    uri: str
    cases: int
    subjects: int
    slices: int
    shards_written: int
    shards_skipped: int
    bytes: int
    seconds: float
    folds: List[Dict[str, Any]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def _no_progress(it: Iterable[Any], **_: Any) -> Iterable[Any]:
    return it


def read_cases(cfg: DataConfig, progress: ProgressFactory = _no_progress) -> List[Case]:
    """Read and validate every case of every configured source.

    Raises:
        DataError: the first bad input, naming the file; or no sources / no cases.
    """
    if not cfg.sources:
        raise DataError("data.sources", "no sources given (use --source NAME:PATH)")
    cases: List[Case] = []
    for spec in cfg.sources:
        it = read_source(spec.name, spec.path, **spec.options)
        for case in progress(it, desc=f"read {spec.name}", unit="case"):
            cases.append(validate_case(case))
    if not cases:
        raise DataError(", ".join(s.path or s.name for s in cfg.sources), "the sources produced no cases")
    check_unique_ids(cases)
    tasks = {c.task for c in cases}
    if len(tasks) > 1:
        raise DataError("data.sources", f"cases of different label sets cannot share shards: {sorted(tasks)}")
    return cases


def _content_hash(case: Case) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(case.image).tobytes())
    if case.label is not None:
        h.update(np.ascontiguousarray(case.label).tobytes())
    h.update(json.dumps(case.geometry(), sort_keys=True).encode())
    return h.hexdigest()


def _group_into_shards(cases: Sequence[Case], folds: Dict[str, int], per_shard: int) -> List[Tuple[int, List[Case]]]:
    """Whole cases per shard, one fold per shard, at most ``per_shard`` slices (unless a case alone is bigger)."""
    groups: List[Tuple[int, List[Case]]] = []
    for fold in sorted(set(folds.values())):
        members = sorted((c for c in cases if folds[c.subject_id] == fold), key=lambda c: (c.subject_id, c.case_id))
        current: List[Case] = []
        n = 0
        for c in members:
            z = c.image.shape[0]
            if current and n + z > per_shard:
                groups.append((fold, current))
                current, n = [], 0
            current.append(c)
            n += z
        if current:
            groups.append((fold, current))
    return groups


def prepare(cfg: DataConfig, progress: ProgressFactory = _no_progress) -> PrepareSummary:
    """Preprocess the configured sources into shards and a manifest at ``cfg.shards_uri``.

    Args:
        cfg: The data section of the experiment config.
        progress: A tqdm-like factory (``progress(iterable, desc=..., total=..., unit=...)``).

    Returns:
        A `PrepareSummary`.

    Raises:
        DataError: bad input (nothing is written).
        StorageError: the store is unreachable or a write failed (shards this run wrote are
            removed; an earlier manifest stays valid).
    """
    t0 = time.perf_counter()
    store = open_store(cfg.shards_uri, cfg.storage)
    store.check_reachable()
    plan = build_plan(cfg)
    cases = read_cases(cfg, progress)

    subjects = sorted({c.subject_id for c in cases})
    strata = subject_strata(cases, cfg.stratify)
    folds = grouped_kfold(subjects, cfg.folds, cfg.split_seed, strata)
    budget: Optional[set] = None
    if cfg.label_budget is not None:
        labelled_subjects = sorted({c.subject_id for c in cases if c.label is not None})
        budget = label_budget(labelled_subjects, cfg.label_budget, cfg.split_seed, strata)
        if cfg.budget_split == "holdout":
            # Validate on every labelled subject outside the budget; train on the budget and
            # on all unlabelled cases (semi-supervised and self-supervised regimes use them).
            labelled = set(labelled_subjects)
            folds = {s: 0 if s in labelled and s not in budget else 1 for s in subjects}
            if not any(f == 0 for f in folds.values()):
                raise ConfigError(f"data.budget_split=holdout: the label budget {cfg.label_budget} takes every "
                                  "labelled subject, leaving none to validate on")

    size = _plan_size(cfg)
    layout = SliceLayout(height=size[0], width=size[1], image_dtype=cfg.slice_dtype,
                         filter="delta2d" if cfg.slice_dtype == "uint8" else "none")
    plan_dict = plan.to_dict()
    groups = _group_into_shards(cases, folds, cfg.slices_per_shard)

    written: List[str] = []
    shard_entries: List[Dict[str, Any]] = []
    case_entries: List[Dict[str, Any]] = []
    warnings: List[str] = []
    skipped = 0
    total = sum(len(g) for _, g in groups)
    bar = progress(range(total), desc="preprocess+write", total=total, unit="case")
    bar_iter = iter(bar)
    try:
        for i, (fold, members) in enumerate(groups):
            rel = f"slices/fold-{fold}/part-{i:05d}.parquet"
            in_budget = {c.case_id: budget is None or c.subject_id in budget for c in members}
            fp = _fingerprint(plan_dict, layout, cfg, [(c, fold, in_budget[c.case_id]) for c in members])
            existing = shard_metadata(store, rel)
            if existing is not None and existing.get("fingerprint") == fp:
                records = existing["records"]
                skipped += 1
                for _ in members:
                    next(bar_iter, None)
            else:
                rows, records = [], {}
                for c in members:
                    pc, rec = plan.preprocess(c)
                    lost = int(rec.get("foreground_voxels_lost", 0) or 0)
                    if lost:
                        warnings.append(f"{c.case_id}: crop removed {lost} foreground voxels")
                    rows.append(case_rows(pc, fold, in_budget[c.case_id], layout))
                    records[c.case_id] = {"record": rec, "spacing": [float(s) for s in pc.spacing]}
                    next(bar_iter, None)
                table = build_table(rows, layout, {"fingerprint": fp, "records": records, "plan": plan_dict})
                store.write_bytes(rel, table_to_parquet(table, cfg.compression_level))
                written.append(rel)
                if cfg.store_volumes:
                    vrel = rel.replace("slices/", "volumes/", 1)
                    store.write_bytes(vrel, table_to_parquet(volume_table(table, layout), cfg.compression_level))
                    written.append(vrel)
            shard_entries.append({"path": rel, "kind": "slices", "fold": fold, "fingerprint": fp,
                                  "rows": sum(c.image.shape[0] for c in members), "bytes": store.size(rel),
                                  "cases": [c.case_id for c in members]})
            if cfg.store_volumes:
                vrel = rel.replace("slices/", "volumes/", 1)
                shard_entries.append({"path": vrel, "kind": "volumes", "fold": fold, "fingerprint": fp,
                                      "rows": len(members), "bytes": store.size(vrel),
                                      "cases": [c.case_id for c in members]})
            for c in members:
                case_entries.append(_case_entry(c, fold, in_budget[c.case_id], rel, records[c.case_id]))
        manifest = Manifest(
            uri=store.uri,
            layout=layout,
            plan=plan_dict,
            task=cases[0].task,
            class_names={str(k): v for k, v in TASK_CLASS_NAMES[cases[0].task].items()},
            folds={"k": cfg.folds, "seed": cfg.split_seed, "stratify": cfg.stratify,
                   "subjects": {s: folds[s] for s in subjects}},
            label_budget=None if budget is None else {"n": cfg.label_budget, "seed": cfg.split_seed,
                                                      "subjects": sorted(budget)},
            cases=case_entries,
            shards=shard_entries,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            data_config=_jsonable(cfg),
        )
        store.write_bytes(PLAN, json.dumps(plan_dict, indent=1).encode())
        store.write_bytes(MANIFEST, manifest.to_json().encode())
    except Exception:
        for rel in written:
            store.delete(rel)
        raise
    finally:
        close = getattr(bar, "close", None)
        if close:
            close()
    _remove_stale(store, manifest)
    return PrepareSummary(
        uri=store.uri, cases=len(cases), subjects=len(subjects), slices=manifest.n_slices,
        shards_written=len([w for w in written if w.startswith("slices/")]), shards_skipped=skipped,
        bytes=manifest.total_bytes, seconds=time.perf_counter() - t0, folds=manifest.fold_summary(),
        warnings=warnings,
    )


def _plan_size(cfg: DataConfig) -> Tuple[int, int]:
    section = {"cmr": cfg.cmr.crop_size, "ct": cfg.ct.crop_size, "slices2d": cfg.slices2d.size}[cfg.plan]
    return int(section[0]), int(section[1])


def _fingerprint(plan_dict: Dict[str, Any], layout: SliceLayout, cfg: DataConfig,
                 members: Sequence[Tuple[Case, int, bool]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": FORMAT_VERSION, "plan": plan_dict, "layout": layout.to_dict(),
                         "volumes": cfg.store_volumes, "zstd": cfg.compression_level}, sort_keys=True).encode())
    for c, fold, in_budget in members:
        h.update(json.dumps([c.case_id, c.subject_id, c.phase, c.motion_level, c.dataset, fold, in_budget],
                            sort_keys=True).encode())
        h.update(_content_hash(c).encode())
    return h.hexdigest()


def _case_entry(c: Case, fold: int, in_budget: bool, shard: str, rec: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "case_id": c.case_id, "subject_id": c.subject_id, "dataset": c.dataset, "phase": c.phase,
        "modality": c.modality, "motion_level": c.motion_level, "fold": fold,
        "n_slices": int(c.image.shape[0]), "has_label": c.label is not None,
        "train_labelled": c.label is not None and in_budget, "shard": shard,
        "source_path": c.source_path, "original_geometry": c.geometry(),
        "spacing": rec["spacing"], "record": rec["record"],
        "meta": _jsonable(c.meta),
    }


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON, turning dataclasses/numpy scalars into plain values."""
    import dataclasses

    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def _remove_stale(store: ObjectStore, manifest: Manifest) -> None:
    """Delete shards of earlier runs that the new manifest no longer references."""
    keep = {s["path"] for s in manifest.shards}
    for kind in ("slices", "volumes"):
        for rel in store.list(kind, suffix=".parquet"):
            if rel not in keep:
                store.delete(rel)
