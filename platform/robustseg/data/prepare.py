"""`prepare`: sources -> validation -> folds -> preprocessing plan -> Parquet shards + manifest.

Order matters for the "nothing lost, ever" promise:

1. the store is checked first (an unreachable S3 endpoint fails before any work);
2. every case is read and validated before anything is written, so bad input (unreadable
   file, geometry mismatch, unknown labels, NaN, empty volume, duplicate ids) stops the run
   with no output at all;
3. the store's current snapshot is read under the writer lock; a store that holds data
   prepared with other sources, plan or folds is refused unless ``overwrite`` (``--force``);
4. shards are written as a new snapshot (`robustseg.data.snapshot`): new files under names
   no run used before, each atomic; a shard whose fingerprint (plan + case contents + folds)
   matches one of the current snapshot is reused by reference, so re-runs are cheap and the
   same settings re-run is a no-op;
5. ``manifest.json`` is committed last in one atomic step; only then are files the new
   snapshot no longer names deleted. A run that fails before the commit deletes only what
   it wrote (no manifest names those files), so the previous snapshot stays whole; one
   stopped by Ctrl-C keeps its complete shards and the next run adopts them.
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
from robustseg.data.manifest import PLAN, Manifest
from robustseg.data.preprocess import build_plan
from robustseg.data.shards import FORMAT_VERSION, SliceLayout, build_table, case_rows, table_to_parquet
from robustseg.data.snapshot import SnapshotWriter, describe_diff
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
    committed: bool = True
    generation: int = 0
    removed: int = 0


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


@dataclass
class _Design:
    """Everything a prepare run decided before writing: folds, budget, layout, shard groups."""

    subjects: List[str]
    folds: Dict[str, int]
    budget: Optional[set]
    layout: SliceLayout
    plan: Dict[str, Any]
    groups: List[Tuple[int, List[Case]]]


def prepare(cfg: DataConfig, progress: ProgressFactory = _no_progress, *, overwrite: bool = False) -> PrepareSummary:
    """Preprocess the configured sources into a new snapshot of the store at ``cfg.shards_uri``.

    Args:
        cfg: The data section of the experiment config.
        progress: A tqdm-like factory (``progress(iterable, desc=..., total=..., unit=...)``).
        overwrite: Replace a dataset prepared with other sources, plan or folds (``--force``).

    Returns:
        A `PrepareSummary` (``committed`` is False when the store already held exactly this).

    Raises:
        DataError: bad input (nothing is written).
        ConfigError: the store holds a dataset prepared differently and ``overwrite`` is off.
        StorageError: the store is unreachable, locked by another prepare, a write failed, or
            (S3) another prepare committed first. The previous snapshot stays whole.
    """
    t0 = time.perf_counter()
    store = open_store(cfg.shards_uri, cfg.storage)
    store.check_reachable()
    plan = build_plan(cfg)
    cases = read_cases(cfg, progress)
    design = _design(cfg, cases, plan.to_dict())
    with store.writer_lock("prepare"):
        writer = SnapshotWriter.begin(store)
        if writer.current is not None and not overwrite:
            _refuse_other_data(store.uri, writer.current, cfg, design)
        try:
            manifest, written, skipped, warnings = _write_snapshot(writer, cfg, plan, cases, design, progress)
            committed = writer.current is None or not _same_snapshot(writer.current, manifest)
            if committed:
                writer.commit(manifest)
        except KeyboardInterrupt:
            raise  # complete shards stay for the next run to adopt; nothing was committed
        except BaseException:
            writer.abort()
            raise
        if not committed:
            manifest = writer.current
        _sync_plan_copy(store, manifest.plan)
        removed = writer.collect_garbage(manifest)
    return PrepareSummary(
        uri=store.uri, cases=len(cases), subjects=len(design.subjects), slices=manifest.n_slices,
        shards_written=written, shards_skipped=skipped, bytes=manifest.total_bytes,
        seconds=time.perf_counter() - t0, folds=manifest.fold_summary(), warnings=warnings,
        committed=committed, generation=manifest.generation, removed=len(removed),
    )


def _sync_plan_copy(store: ObjectStore, plan_dict: Dict[str, Any]) -> None:
    """Keep ``plan.json``, a convenience copy of the committed plan, in step with the manifest.

    Written after the commit (a kill in between leaves a stale copy that the next run fixes);
    readers that need the plan take it from the manifest.
    """
    text = json.dumps(plan_dict, indent=1).encode()
    if not store.exists(PLAN) or store.read_bytes(PLAN) != text:
        store.write_bytes(PLAN, text)


def _design(cfg: DataConfig, cases: Sequence[Case], plan_dict: Dict[str, Any]) -> _Design:
    """Folds, label budget, layout and shard grouping: everything decided before writing."""
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
    return _Design(subjects, folds, budget, layout, plan_dict, _group_into_shards(cases, folds, cfg.slices_per_shard))


def _write_snapshot(writer: SnapshotWriter, cfg: DataConfig, plan: Any, cases: Sequence[Case], design: _Design,
                    progress: ProgressFactory) -> Tuple[Manifest, int, int, List[str]]:
    """Write (or reuse) every shard of the new snapshot; returns (manifest, written, reused, warnings)."""
    shard_entries: List[Dict[str, Any]] = []
    case_entries: List[Dict[str, Any]] = []
    warnings: List[str] = []
    written = skipped = 0
    kinds = ("slices", "volumes") if cfg.store_volumes else ("slices",)
    total = sum(len(g) for _, g in design.groups)
    bar = progress(range(total), desc="preprocess+write", total=total, unit="case")
    bar_iter = iter(bar)
    try:
        for part, (fold, members) in enumerate(design.groups):
            in_budget = {c.case_id: design.budget is None or c.subject_id in design.budget for c in members}
            fp = _fingerprint(design.plan, design.layout, cfg, [(c, fold, in_budget[c.case_id]) for c in members])
            found = {k: writer.reusable(k, fp) or writer.stray(k, fp) for k in kinds}
            if all(found.values()):
                records = _records_of(writer, found["slices"]["path"], fp)
                skipped += 1
                for _ in members:
                    next(bar_iter, None)
            else:
                table, records = _preprocess_group(plan, members, fold, in_budget, design, fp, warnings, bar_iter)
                found["slices"] = writer.write(writer.shard_path("slices", fold, part),
                                               table_to_parquet(table, cfg.compression_level))
                if cfg.store_volumes:
                    found["volumes"] = writer.write(writer.shard_path("volumes", fold, part), table_to_parquet(
                        volume_table(table, design.layout), cfg.compression_level))
                written += 1
            for kind in kinds:
                shard_entries.append({**found[kind], "kind": kind, "fold": fold, "fingerprint": fp,
                                      "rows": sum(c.image.shape[0] for c in members) if kind == "slices" else len(members),
                                      "layout": design.layout.to_dict(), "cases": [c.case_id for c in members]})
            for c in members:
                case_entries.append(_case_entry(c, fold, in_budget[c.case_id], found["slices"]["path"],
                                                records[c.case_id]))
    finally:
        close = getattr(bar, "close", None)
        if close:
            close()
    return _manifest(writer, cfg, cases, design, case_entries, shard_entries), written, skipped, warnings


def _preprocess_group(plan: Any, members: Sequence[Case], fold: int, in_budget: Dict[str, bool], design: _Design,
                      fp: str, warnings: List[str], bar_iter: Any) -> Tuple[Any, Dict[str, Any]]:
    """Preprocess the cases of one shard into an Arrow table (+ their per-case records)."""
    rows, records = [], {}
    for c in members:
        pc, rec = plan.preprocess(c)
        lost = int(rec.get("foreground_voxels_lost", 0) or 0)
        if lost:
            warnings.append(f"{c.case_id}: crop removed {lost} foreground voxels")
        rows.append(case_rows(pc, fold, in_budget[c.case_id], design.layout))
        records[c.case_id] = {"record": rec, "spacing": [float(s) for s in pc.spacing]}
        next(bar_iter, None)
    return build_table(rows, design.layout, {"fingerprint": fp, "records": records, "plan": design.plan}), records


def _records_of(writer: SnapshotWriter, rel: str, fp: str) -> Dict[str, Any]:
    """Per-case preprocessing records of a reused shard: from the manifest, else its footer."""
    from robustseg.data.shards import shard_metadata

    cur = writer.current
    if cur is not None:
        recs = {c["case_id"]: {"record": c["record"], "spacing": c["spacing"]} for c in cur.cases if c["shard"] == rel}
        if recs:
            return recs
    md = shard_metadata(writer.store, rel) or {}
    if md.get("fingerprint") != fp:
        raise DataError(writer.store.uri_of(rel), "shard footer does not match its fingerprint")
    return md["records"]


def _manifest(writer: SnapshotWriter, cfg: DataConfig, cases: Sequence[Case], design: _Design,
              case_entries: List[Dict[str, Any]], shard_entries: List[Dict[str, Any]]) -> Manifest:
    task = cases[0].task
    return Manifest(
        uri=writer.store.uri, layout=design.layout, plan=design.plan, task=task,
        class_names={str(k): v for k, v in TASK_CLASS_NAMES[task].items()},
        folds={"k": cfg.folds, "seed": cfg.split_seed, "stratify": cfg.stratify,
               "subjects": {s: design.folds[s] for s in design.subjects}},
        label_budget=None if design.budget is None else {"n": cfg.label_budget, "seed": cfg.split_seed,
                                                         "subjects": sorted(design.budget)},
        cases=case_entries, shards=shard_entries,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data_config=_jsonable(cfg),
    )


def _settings(m_plan: Dict[str, Any], layout: Dict[str, Any], data_config: Dict[str, Any]) -> Dict[str, Any]:
    """What makes two prepared datasets "the same data": sources, plan and fold design."""
    dc = data_config
    return {
        "sources": [{k: s.get(k) for k in ("name", "path", "options")} for s in dc.get("sources", [])],
        "plan": {**m_plan, "layout": layout},
        "folds": {k: dc.get(k) for k in ("folds", "split_seed", "stratify", "label_budget", "budget_split")},
    }


def _refuse_other_data(uri: str, current: Manifest, cfg: DataConfig, design: _Design) -> None:
    """Raise `ConfigError` naming what differs when the store holds other data."""
    old = _settings(current.plan, current.layout.to_dict(), current.data_config)
    new = _settings(design.plan, design.layout.to_dict(), _jsonable(cfg))
    diffs = describe_diff(old, new)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; ... {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(f"{uri} already holds a dataset prepared with different settings ({shown}). "
                          "Pass --force (overwrite=True) to replace it: the current snapshot stays readable "
                          "until the new one commits. Or prepare into another --out.")


def _same_snapshot(old: Manifest, new: Manifest) -> bool:
    """Whether committing ``new`` would change nothing a reader sees."""
    keys = ("layout", "plan", "task", "class_names", "folds", "label_budget", "cases", "shards")
    return old.version == new.version and all(getattr(old, k) == getattr(new, k) for k in keys)


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
