"""Is a lever's change bigger than the test set's noise? Paired per-case comparison of benchmark runs.

`accuracy_budget.py` writes every test volume's Dice at every motion level to
``robustseg_work/accuracy_budget/<run>/<side>/per_case.json``. This compares a baseline run
with a lever run volume by volume, the way a lever should be judged on 32 test volumes:

* the level means exactly as the benchmark computes them (per structure over volumes, then
  over structures) and their difference, plus the difference of the motion drop (clean minus
  the most severe level);
* a 95 % paired bootstrap interval of each difference, resampling **patients** (a patient's
  ED and ES volumes move together, so they are not two independent draws);
* how many volumes went up and down, the median change, and the volumes that moved most.

Several ``--pair BASE LEVER`` (e.g. one per training seed) are pooled: each resample draws
the same patients for every pair and averages the pairs' differences, so the interval covers
test-set sampling *and* the seeds given. It does not cover seeds not run: one seed's interval
says whether the change is bigger than what the choice of test patients alone would cause.

    python benchmarks/per_case_diff.py \\
        --pair robustseg_work/accuracy_budget/e24_i40_b16-xeon/robustseg/per_case.json \\
               robustseg_work/accuracy_budget/e24_i40_b16-rest1k3/robustseg/per_case.json \\
        --pair .../e24_i40_b16_s1-xeon/robustseg/per_case.json .../e24_i40_b16_s1-rest1k3/robustseg/per_case.json

Prints a table; ``--out`` also writes it as JSON. Needs numpy only.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

PerCase = Dict[str, Dict[str, Dict[str, Dict[str, float]]]]  # case -> "l<k>" -> {"dice": {structure: x}}


def read_per_case(path: Path) -> PerCase:
    """One run's ``per_case.json``.

    Raises:
        ValueError: unreadable file or not the benchmark's per-case layout, naming the file.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read per-case scores ({e})") from None
    if not isinstance(doc, dict) or not doc or not all(
            isinstance(v, dict) and all(isinstance(s, dict) and "dice" in s for s in v.values()) for v in doc.values()):
        raise ValueError(f"{path}: not a per_case.json of benchmarks/accuracy_budget.py "
                         "({case: {'l0': {'dice': {...}}, ...}})")
    return doc


def patient_of(case_id: str) -> str:
    """The patient a volume belongs to (``acdc_patient020_ES`` -> ``acdc_patient020``)."""
    return re.sub(r"_(ED|ES|frame\d+)$", "", case_id)


def _matrix(doc: PerCase, cases: Sequence[str], level: str, structures: Sequence[str]) -> np.ndarray:
    """(cases, structures) Dice; NaN where a structure is absent from both masks."""
    return np.array([[doc[c][level]["dice"].get(s, np.nan) for s in structures] for c in cases], dtype=np.float64)


def level_mean(dice: np.ndarray) -> float:
    """The benchmark's level mean: per structure over volumes (NaN skipped), then over structures."""
    with np.errstate(all="ignore"):
        return float(np.nanmean(np.nanmean(dice, axis=0)))


def _check_pair(base: PerCase, lever: PerCase, names: Tuple[str, str]) -> List[str]:
    if set(base) != set(lever):
        only = sorted(set(base) ^ set(lever))
        raise ValueError(f"{names[0]} and {names[1]} score different volumes (e.g. {', '.join(only[:3])}): "
                         "compare runs on the same test fold")
    return sorted(base)


def compare(pairs: Sequence[Tuple[PerCase, PerCase]], levels: Sequence[int], n_boot: int = 2000, seed: int = 0,
            names: Optional[Sequence[Tuple[str, str]]] = None, top: int = 5) -> Dict[str, object]:
    """Pooled paired comparison of lever runs against their baselines.

    Args:
        pairs: ``(baseline, lever)`` per-case documents, e.g. one pair per training seed.
        levels: Motion levels to report; the drop is ``levels[0]`` minus ``levels[-1]``.
        n_boot: Bootstrap resamples of the test patients (0: no intervals).
        seed: Seed of the resampling.
        names: Labels of each pair's files, for messages.
        top: How many of the most-moved volumes to list per level.

    Returns:
        ``{"cases", "patients", "pairs", "levels": {"l<k>": {...}}, "drop": {...}}``; each
        entry has ``base``, ``lever``, ``diff`` (lever - base, averaged over pairs) and, with
        resamples, ``ci95``.

    Raises:
        ValueError: no pairs, runs that scored different volumes, or a level a run lacks.
    """
    if not pairs:
        raise ValueError("no runs to compare: give at least one --pair BASE LEVER")
    names = list(names) if names else [(f"base{i}", f"lever{i}") for i in range(len(pairs))]
    cases = _check_pair(pairs[0][0], pairs[0][1], names[0])
    for (b, v), n in zip(pairs[1:], names[1:]):
        if _check_pair(b, v, n) != cases:
            raise ValueError(f"{n[0]} scores other volumes than {names[0][0]}: every pair must use the same test fold")
    keys = [f"l{k}" for k in levels]
    for (b, v), n in zip(pairs, names):
        for doc, name in ((b, n[0]), (v, n[1])):
            missing = [k for k in keys if k not in doc[cases[0]]]
            if missing:
                raise ValueError(f"{name}: no scores at {', '.join(missing)}")
    structures = sorted(pairs[0][0][cases[0]][keys[0]]["dice"])
    # mats[pair][side][level]: (cases, structures)
    mats = [[{k: _matrix(doc, cases, k, structures) for k in keys} for doc in pair] for pair in pairs]
    patients = sorted({patient_of(c) for c in cases})
    rows_of = [np.array([i for i, c in enumerate(cases) if patient_of(c) == p]) for p in patients]

    def stats(rows: np.ndarray) -> Dict[str, Tuple[float, float]]:
        """(base, lever) pair-averaged level means and drop on the volumes ``rows``."""
        out = {k: tuple(float(np.mean([level_mean(m[side][k][rows]) for m in mats])) for side in (0, 1))
               for k in keys}
        out["drop"] = tuple(out[keys[0]][s] - out[keys[-1]][s] for s in (0, 1))
        return out

    point = stats(np.arange(len(cases)))
    boot: Dict[str, List[float]] = {k: [] for k in point}
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        pick = rng.integers(0, len(patients), len(patients))
        s = stats(np.concatenate([rows_of[i] for i in pick]))
        for k, (b, v) in s.items():
            boot[k].append(v - b)

    def entry(k: str) -> Dict[str, object]:
        b, v = point[k]
        e: Dict[str, object] = {"base": b, "lever": v, "diff": v - b}
        if n_boot:
            e["ci95"] = [float(np.percentile(boot[k], 2.5)), float(np.percentile(boot[k], 97.5))]
        return e

    report: Dict[str, object] = {"cases": len(cases), "patients": len(patients), "pairs": [list(n) for n in names],
                                 "bootstrap": {"resamples": n_boot, "unit": "patient", "seed": seed},
                                 "levels": {}, "drop": entry("drop")}
    for k in keys:
        with np.errstate(all="ignore"):  # a volume's mean over the structures it has
            per_vol = np.mean([np.nanmean(m[1][k], axis=1) - np.nanmean(m[0][k], axis=1) for m in mats], axis=0)
        order = np.argsort(-np.abs(np.nan_to_num(per_vol)))[:top]
        report["levels"][k] = {**entry(k), "up": int(np.sum(per_vol > 0)), "down": int(np.sum(per_vol < 0)),
                               "median_volume_diff": float(np.nanmedian(per_vol)),
                               "most_moved": [{"case": cases[i], "diff": float(per_vol[i])} for i in order]}
    return report


def print_report(rep: Dict[str, object]) -> None:
    """The comparison as a table."""
    def ci(e: Dict[str, object]) -> str:
        return "" if "ci95" not in e else "  [{:+.3f}, {:+.3f}]".format(*e["ci95"])

    print(f"{rep['cases']} volumes of {rep['patients']} patients, {len(rep['pairs'])} pair(s); "
          f"95 % intervals from {rep['bootstrap']['resamples']} patient resamples")
    print(f"{'':6s} {'base':>7s} {'lever':>7s} {'diff':>7s}  95 % interval     up down  median")
    for k, e in rep["levels"].items():
        print(f"{k:6s} {e['base']:7.3f} {e['lever']:7.3f} {e['diff']:+7.3f}{ci(e):18s} {e['up']:4d} {e['down']:4d} "
              f"{e['median_volume_diff']:+7.3f}")
    d = rep["drop"]
    print(f"{'drop':6s} {d['base']:7.3f} {d['lever']:7.3f} {d['diff']:+7.3f}{ci(d)}")
    for k, e in rep["levels"].items():
        print(f"most moved at {k}: " + ", ".join(f"{m['case']} {m['diff']:+.3f}" for m in e["most_moved"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=2, action="append", metavar=("BASE", "LEVER"), required=True,
                    help="a baseline run's per_case.json and the lever run's (repeat, e.g. once per seed)")
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3], help="motion levels (default 0 1 2 3)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000; 0: none)")
    ap.add_argument("--seed", type=int, default=0, help="resampling seed")
    ap.add_argument("--out", type=Path, help="also write the comparison as JSON here")
    args = ap.parse_args(argv)
    try:
        pairs = [(read_per_case(Path(b)), read_per_case(Path(v))) for b, v in args.pair]
        rep = compare(pairs, args.levels, args.boot, args.seed, names=[tuple(p) for p in args.pair])
    except ValueError as e:
        print(f"per_case_diff: {e}", file=sys.stderr)
        return 2
    print_report(rep)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rep, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
