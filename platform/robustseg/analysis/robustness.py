"""Robustness to respiratory motion: Dice and HD95 per structure against the CMRxMotion level.

The experiment the source paper reports (§3, CMRxMotion): segmentation quality as breathing
gets worse. Here the motion is simulated, so every model is scored on the *same* corrupted
images, at every level, against the *same* motion-free label:

* **Grid.** Each evaluation case is corrupted on its original acquisition grid, where motion
  physically happens (`robustseg.data.motion`, one phase-encoding line at a time). The
  corrupted volume then goes through each model's own pipeline (its preprocessing plan,
  sliding window, TTA, inversion to the input grid), exactly as `robustseg predict` would
  treat a real motion-corrupted scan, and the label map is compared with the original
  label on the original grid (HD95 in mm with the real spacing).
* **Levels.** Level ``k`` is CMRxMotion's grade: a respiratory trace with peak-to-peak
  excursion `motion_amplitude` (0, 2, 5, 9 pixels of the original grid; the rows also carry
  the excursion in mm along the phase-encoding axis) plus irregularity and jitter growing
  with the level. Level 0 is the clean image itself: the baseline every drop is measured from.
* **Determinism.** The corruption of a case at a level depends only on ``(seed, case_id,
  level)`` (`case_rng`): reruns, other models, or another selection of cases see the same
  image.

Rows (one per model, level and case) come from `robustseg.engine.metrics.evaluate_case`;
`summarise` averages them per model and level, `plot_dice_vs_level` draws one line per model,
`log_to_mlflow` records a ``robustseg.role=robustness`` run.

**Nothing lost.** With a `RowJournal`, every (model, level, batch of cases) is appended to a
JSON-lines file as soon as it is scored; a re-run with the same settings reads it back and
segments only what is missing. Cases are still corrupted and segmented in the same batches
as an uninterrupted run, so the final table is the same.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from robustseg.analysis.outputs import jsonable, pyplot, save_figure
from robustseg.data.cases import Case
from robustseg.data.labels import TASK_CLASS_NAMES
from robustseg.data.motion import MOTION_LEVELS, motion_amplitude, simulate_respiratory_motion
from robustseg.engine.metrics import aggregate, evaluate_case, to_csv
from robustseg.errors import DataError

#: A segmenter maps cases (original grid) to uint8 label maps on the same grids.
Segmenter = Callable[[Sequence[Case]], List[np.ndarray]]
ROLE = "robustness"
JOURNAL = "cases.partial.jsonl"
_META = ("case_id", "subject_id", "dataset", "phase")


def _plain(v: Any) -> Any:
    """numpy scalars as Python numbers (NaN and inf kept), so fresh and journaled rows are alike."""
    return v.item() if isinstance(v, np.generic) else v


class RowJournal:
    """Scored rows appended to a JSON-lines file as they come, and read back by a re-run.

    The first line records the settings that decide a row's value (models and their URIs,
    seed, phase axis, ...); a journal written with other settings is discarded, never mixed
    in. Each batch is flushed and fsynced before the next one starts, so a kill loses at most
    the batch in flight; a torn last line is ignored.

    Args:
        path: The journal file (conventionally ``<out>/cases.partial.jsonl``).
        settings: JSON-serialisable settings the rows depend on.
        restart: Discard an existing journal even if its settings match.
    """

    def __init__(self, path: Union[str, Path], settings: Mapping[str, Any], restart: bool = False) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings), default=str))
        self.rows: Dict[Tuple[str, int, str], Dict[str, Any]] = {}
        self.discarded = False  # an earlier journal existed but did not match (or restart)
        if self.path.is_file():
            self._read(restart)
        if not self.rows:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"robustness_journal": 1, "settings": self.settings}) + "\n")

    def _read(self, restart: bool) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except ValueError:
            header = {}
        if restart or header.get("settings") != self.settings:
            self.discarded = True
            return
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except ValueError:  # the line being written when the run was killed
                continue
            self.rows[self.key(row["model"], row["motion_level"], row["case_id"])] = row

    @staticmethod
    def key(model: str, level: int, case_id: str) -> Tuple[str, int, str]:
        """The identity of a row."""
        return str(model), int(level), str(case_id)

    def get(self, model: str, level: int, case_id: str) -> Optional[Dict[str, Any]]:
        """The journaled row, or None."""
        return self.rows.get(self.key(model, level, case_id))

    def add(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append rows and make them durable before returning."""
        text = "".join(json.dumps(dict(r)) + "\n" for r in rows)
        with self.path.open("a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[self.key(r["model"], r["motion_level"], r["case_id"])] = dict(r)

    def remove(self) -> None:
        """Delete the journal (the run finished and its outputs are written)."""
        self.path.unlink(missing_ok=True)


def check_levels(levels: Sequence[int]) -> List[int]:
    """Levels as a list of distinct ints in `MOTION_LEVELS`, in the given order.

    Raises:
        ValueError: an empty list or a level outside 0-3.
    """
    out: List[int] = []
    for v in levels:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) not in MOTION_LEVELS:
            raise ValueError(f"motion levels must be a non-empty subset of {MOTION_LEVELS}, got {list(levels)}")
        if int(v) not in out:
            out.append(int(v))
    if not out:
        raise ValueError(f"motion levels must be a non-empty subset of {MOTION_LEVELS}, got {list(levels)}")
    return out


def case_rng(seed: int, case_id: str, level: int) -> np.random.Generator:
    """The random stream of one case at one level (a stable hash: no Python ``hash`` salt)."""
    key = int.from_bytes(hashlib.blake2b(case_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed), int(level), key])


def corrupt_case(case: Case, level: int, seed: int, phase_axis: int = -2) -> Case:
    """The case with simulated respiratory motion of ``level`` on its original grid.

    Images with negative values (already normalised) are shifted to be non-negative for
    the magnitude step and shifted back, as in `robustseg.augment.motion`.

    Args:
        case: A case on its acquisition grid.
        level: CMRxMotion level 0-3; 0 returns ``case`` itself.
        seed: Experiment seed; with the case id and level it fixes the corruption.
        phase_axis: Phase-encoding axis of the ``(Z, Y, X)`` image: -2 (Y) or -1 (X).

    Returns:
        A new case with the corrupted image, the unchanged (motion-free) label and geometry,
        ``motion_level`` set, and the simulation recorded in ``meta["simulated_motion"]``.
    """
    level = check_levels([level])[0]
    if level == 0:
        return case
    image = np.asarray(case.image, dtype=np.float32)
    lo = min(float(image.min()), 0.0)
    moved = simulate_respiratory_motion(image - lo, level, case_rng(seed, case.case_id, level), phase_axis=phase_axis)
    meta = {**case.meta, "simulated_motion": {"level": level, "seed": int(seed), "phase_axis": phase_axis}}
    return case.with_arrays((moved + lo).astype(np.float32), case.label, motion_level=level, meta=meta)


def _amplitude_mm(case: Case, level: int, phase_axis: int) -> float:
    if not case.spacing_known:
        return float("nan")
    spacing_along = case.spacing[1] if phase_axis == -2 else case.spacing[0]  # spacing is (x, y, z)
    return motion_amplitude(level) * float(spacing_along)


def evaluate_robustness(models: Mapping[str, Segmenter], cases: Sequence[Case], levels: Sequence[int], seed: int = 0,
                        *, phase_axis: int = -2, batch_cases: int = 4,
                        progress: Optional[Callable[..., Any]] = None,
                        journal: Optional[RowJournal] = None) -> List[Dict[str, Any]]:
    """Segment every case at every motion level with every model and score it.

    Args:
        models: ``{name: segmenter}``; a segmenter maps a list of cases to label maps on
            their grids (``Ensemble.predict_cases``, or `predict_case` over a list).
        cases: Labelled cases on their original grids, one task.
        levels: Motion levels to evaluate (include 0 for the clean baseline).
        seed: Corruption seed (`corrupt_case`).
        phase_axis: Phase-encoding axis, -2 (Y) or -1 (X).
        batch_cases: Cases corrupted and segmented together (an ensemble batches their slices).
        progress: tqdm-like factory over (level, batch) steps.
        journal: Rows already scored (skipped) and where new ones are saved as they come.

    Returns:
        One row per (model, level, case): ``model``, ``motion_level``, ``motion_amplitude_px``,
        ``motion_amplitude_mm``, the case columns, then `evaluate_case`'s Dice/HD95 columns.

    Raises:
        DataError: an unlabelled case, mixed tasks, or a prediction off the case's grid.
        ValueError: no models or cases, or bad levels.
    """
    levels = check_levels(levels)
    if not models or not cases:
        raise ValueError(f"need at least one model and one case, got {len(models)} models and {len(cases)} cases")
    for c in cases:
        if c.label is None:
            raise DataError(c.source_path or c.case_id, "no label: robustness needs labelled cases")
    tasks = {c.task for c in cases}
    if len(tasks) != 1:
        raise DataError("cases", f"cases of different label sets cannot be scored together: {sorted(tasks)}")
    names = TASK_CLASS_NAMES[tasks.pop()]
    chunks = [list(cases[i:i + max(1, batch_cases)]) for i in range(0, len(cases), max(1, batch_cases))]
    steps = [(lv, ch) for lv in levels for ch in chunks]
    rows: List[Dict[str, Any]] = []
    for level, chunk in (progress(steps, desc="robustness", unit="batch") if progress else steps):
        corrupted: Optional[List[Case]] = None  # made only when some model still has to see this batch
        for model, segment in models.items():
            done = [journal.get(model, level, c.case_id) for c in chunk] if journal else []
            if done and all(r is not None for r in done):
                rows += done  # type: ignore[arg-type]
                continue
            # The whole batch again (not only its missing cases): the same batches as an uninterrupted run.
            corrupted = corrupted or [corrupt_case(c, level, seed, phase_axis) for c in chunk]
            scored = _score_batch(model, segment, corrupted, level, phase_axis, names)
            if journal is not None:
                journal.add(scored)
            rows += scored
    return rows


def _score_batch(model: str, segment: Segmenter, corrupted: Sequence[Case], level: int, phase_axis: int,
                 names: Mapping[int, str]) -> List[Dict[str, Any]]:
    """Segment one batch of corrupted cases with one model and score each against its label."""
    preds = segment(corrupted)
    if len(preds) != len(corrupted):
        raise DataError(model, f"returned {len(preds)} label maps for {len(corrupted)} cases")
    rows = []
    for c, pred in zip(corrupted, preds):
        if np.shape(pred) != c.label.shape:  # type: ignore[union-attr]
            raise DataError(c.case_id, f"{model} predicted shape {np.shape(pred)}, label is {c.label.shape}")
        meta = {"model": model, "motion_level": level, "motion_amplitude_px": motion_amplitude(level),
                "motion_amplitude_mm": _amplitude_mm(c, level, phase_axis), **{k: getattr(c, k) for k in _META}}
        row = evaluate_case(pred, c.label, c.spacing, c.spacing_known, names, meta)  # type: ignore[arg-type]
        rows.append({k: _plain(v) for k, v in row.items()})
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Mean Dice/HD95 per model and level, with the Dice drop from the model's level 0.

    Returns:
        One row per (model, level), models in first-seen order, levels ascending: ``model``,
        ``motion_level``, ``n``, the metric means and ``dice_mean_drop`` (level-0 mean Dice
        minus this level's; NaN without a level-0 row).
    """
    out: List[Dict[str, Any]] = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        by_level = aggregate(mine, by=("motion_level",))["motion_level"]
        base = by_level.get(0, {}).get("dice_mean", float("nan"))
        for level in sorted(by_level):
            stats = {k: v for k, v in by_level[level].items() if k != "motion_level"}
            out.append({"model": model, "motion_level": level, **stats,
                        "dice_mean_drop": float(base) - float(stats.get("dice_mean", float("nan")))})
    return out


def structures(summary: Sequence[Mapping[str, Any]]) -> List[str]:
    """Structure names with Dice columns in ``summary`` (``dice_LV`` -> ``LV``), without the mean."""
    keys = [k for r in summary for k in r if k.startswith("dice_") and k not in ("dice_mean", "dice_mean_drop")]
    return [k[len("dice_"):] for k in dict.fromkeys(keys)]


def plot_dice_vs_level(summary: Sequence[Mapping[str, Any]], path: Union[str, Path]) -> Path:
    """Dice against motion level, one subplot per structure plus the mean, one line per model."""
    plt = pyplot()
    panels = structures(summary) + ["mean"]
    models = list(dict.fromkeys(r["model"] for r in summary))
    levels = sorted({int(r["motion_level"]) for r in summary})
    fig, axes = plt.subplots(1, len(panels), figsize=(2.9 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for model in models:
            pts = sorted((int(r["motion_level"]), float(r.get(f"dice_{panel}", np.nan)))
                         for r in summary if r["model"] == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=model)
        ax.set_title(panel, fontsize=9)
        ax.set_xticks(levels, [f"{lv}\n{motion_amplitude(lv):g} px" for lv in levels], fontsize=8)
        ax.set_xlabel("motion level (peak-to-peak excursion)", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Segmentation vs simulated respiratory motion (CMRxMotion levels)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_outputs(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]], out_dir: Union[str, Path],
                  info: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """Write ``cases.csv``, ``summary.csv``, ``summary.json`` and ``dice_vs_motion.png``.

    Args:
        rows: Case rows (`evaluate_robustness`).
        summary: `summarise` rows.
        out_dir: Folder (created).
        info: Extra JSON fields (models, levels, seed, data ...).

    Returns:
        ``{"cases", "summary_csv", "summary_json", "plot"}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**dict(info or {}), "amplitude_px": {str(k): motion_amplitude(k) for k in MOTION_LEVELS},
           "summary": list(summary)}
    (out / "summary.json").write_text(json.dumps(jsonable(doc), indent=1))
    return {"cases": to_csv(rows, out / "cases.csv"), "summary_csv": to_csv(summary, out / "summary.csv"),
            "summary_json": out / "summary.json", "plot": plot_dice_vs_level(summary, out / "dice_vs_motion.png")}


def metric_name(model: str) -> str:
    """An MLflow-safe model key: ``models:/cmr@champion`` -> ``models-cmr-champion``."""
    safe = "".join(ch if ch.isalnum() or ch in "_-." else "-" for ch in model).strip("-")
    return "-".join(p for p in safe.split("-") if p) or "model"


def log_to_mlflow(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]], *, tracking_uri: str,
                  experiment: str = "robustseg", run_name: str = "robustness",
                  params: Optional[Mapping[str, Any]] = None, workdir: Optional[str] = None,
                  files: Optional[Mapping[str, Path]] = None) -> str:
    """Record a robustness evaluation as one MLflow run (``robustseg.role=robustness``).

    Metrics: ``dice_<structure>_level<k>``, ``dice_mean_level<k>``, ``hd95_mean_level<k>`` and
    ``dice_mean_drop_level<k>``, suffixed ``_<model>`` (MLflow-safe `metric_name`) when more
    than one model is compared; non-finite values (an HD95 of a missed structure) are left
    out. Artifacts under ``robustness/``: the per-case CSV, the summary CSV/JSON and the plot
    (``files`` if given, else written here). A failure marks the run FAILED.

    Args:
        rows: Case rows.
        summary: `summarise` rows.
        tracking_uri: MLflow tracking URI.
        experiment: Experiment name (created if missing).
        run_name: Run name.
        params: Run parameters (model URIs, levels, seed, data ...).
        workdir: Where a new local experiment keeps artifacts (default: beside a SQLite
            database, else the config default).
        files: Outputs of `write_outputs` to upload.

    Returns:
        The run id.
    """
    from robustseg.tracking_runs import analysis_run, log_metrics_batched

    models = list(dict.fromkeys(r["model"] for r in summary))
    with analysis_run(tracking_uri, experiment, run_name, ROLE, tags={"robustseg.models": ",".join(models)[:5000]},
                      params=params, workdir=workdir) as (client, run_id):
        suffix = {m: (f"_{metric_name(m)}" if len(models) > 1 else "") for m in models}
        wanted = [f"dice_{s}" for s in structures(summary)] + ["dice_mean", "hd95_mean", "dice_mean_drop"]
        log_metrics_batched(client, run_id, [(f"{k}_level{r['motion_level']}{suffix[r['model']]}", float(r[k]), 0)
                                             for r in summary for k in wanted if k in r and math.isfinite(float(r[k]))])
        with tempfile.TemporaryDirectory() as tmp:
            paths = dict(files) if files else write_outputs(rows, summary, tmp)
            for p in paths.values():
                client.log_artifact(run_id, str(p), "robustness")
    return run_id


__all__ = ["JOURNAL", "ROLE", "RowJournal", "Segmenter", "case_rng", "check_levels", "corrupt_case", "evaluate_robustness", "log_to_mlflow",
           "metric_name", "plot_dice_vs_level", "structures", "summarise", "write_outputs"]
