"""Subject-grouped, optionally stratified K-fold splits and label-budget splits.

A subject's every case (ED and ES, every motion level, every scan) lands in one fold, so
validation never sees a heart the model trained on. Assignments are deterministic for a
given seed and do not depend on the order cases were read in.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set

import numpy as np

from robustseg.data.cases import Case
from robustseg.errors import ConfigError


def grouped_kfold(
    subjects: Iterable[str],
    k: int,
    seed: int = 0,
    strata: Optional[Mapping[str, object]] = None,
) -> Dict[str, int]:
    """Assign each subject to one of ``k`` folds.

    Subjects are shuffled with ``seed`` within each stratum, then dealt round-robin with
    the deal continuing across strata, so every fold gets a near-equal share of each
    stratum and fold sizes differ by at most one.

    Args:
        subjects: Subject ids (duplicates are ignored).
        k: Number of folds (>= 2).
        seed: Shuffle seed.
        strata: Optional subject -> stratum (e.g. dataset, motion grade, ACDC group).

    Returns:
        subject -> fold index in ``[0, k)``.

    Raises:
        ConfigError: ``k < 2`` or fewer subjects than folds.
    """
    uniq = sorted(set(subjects))
    if k < 2:
        raise ConfigError(f"folds must be >= 2, got {k}")
    if len(uniq) < k:
        raise ConfigError(f"cannot make {k} subject-grouped folds from {len(uniq)} subjects")
    rng = np.random.default_rng(seed)
    groups: Dict[str, List[str]] = defaultdict(list)
    for s in uniq:
        groups[str(strata.get(s, "")) if strata else ""].append(s)
    assignment: Dict[str, int] = {}
    counts = np.zeros(k, dtype=np.int64)
    for stratum in sorted(groups):
        members = list(groups[stratum])
        rng.shuffle(members)
        for s in members:
            # Smallest fold first (ties broken by a seeded permutation) keeps folds balanced
            # overall while each stratum is spread evenly.
            order = rng.permutation(k)
            fold = int(order[np.argmin(counts[order])])
            assignment[s] = fold
            counts[fold] += 1
    return assignment


def label_budget(
    subjects: Iterable[str],
    n_labelled: int,
    seed: int = 0,
    strata: Optional[Mapping[str, object]] = None,
) -> Set[str]:
    """Choose the subjects whose labels training may use (e.g. 10 labelled / 40 held).

    Stratified like `grouped_kfold`: subjects are taken round-robin across strata.

    Args:
        subjects: Labelled subject ids available.
        n_labelled: How many keep their labels for training.
        seed: Selection seed.
        strata: Optional subject -> stratum.

    Raises:
        ConfigError: more labelled subjects asked for than exist.
    """
    uniq = sorted(set(subjects))
    if n_labelled > len(uniq):
        raise ConfigError(f"label budget {n_labelled} exceeds the {len(uniq)} labelled subjects")
    rng = np.random.default_rng(seed + 7919)  # distinct stream from the fold shuffle
    groups: Dict[str, List[str]] = defaultdict(list)
    for s in uniq:
        groups[str(strata.get(s, "")) if strata else ""].append(s)
    queues = []
    for stratum in sorted(groups):
        members = list(groups[stratum])
        rng.shuffle(members)
        queues.append(members)
    chosen: List[str] = []
    while len(chosen) < n_labelled:
        for q in queues:
            if q and len(chosen) < n_labelled:
                chosen.append(q.pop())
    return set(chosen)


def subject_strata(cases: Sequence[Case], stratify: Optional[str]) -> Optional[Dict[str, object]]:
    """Per-subject stratum from a case field or meta key.

    ``"auto"`` uses the dataset when cases come from several datasets, else an ACDC-style
    ``meta["group"]`` when present, else none. For ``motion_level`` a subject's stratum is
    its worst motion level.

    Raises:
        ConfigError: the field exists on neither `Case` nor its meta.
    """
    if not stratify:
        return None
    if stratify == "auto":
        if len({c.dataset for c in cases}) > 1:
            stratify = "dataset"
        elif any("group" in c.meta for c in cases):
            stratify = "group"
        else:
            return None
    out: Dict[str, object] = {}
    for c in cases:
        if hasattr(c, stratify) and stratify != "meta":
            value = getattr(c, stratify)
        elif stratify in c.meta:
            value = c.meta[stratify]
        else:
            raise ConfigError(f"data.stratify: cases have no field or meta key {stratify!r}")
        if stratify == "motion_level":
            value = max(int(value), int(out.get(c.subject_id, -1)))  # type: ignore[arg-type]
        out[c.subject_id] = value
    return out
