"""A sweep as one self-contained HTML page, read back from MLflow.

`write_report` finds a sweep (parent run id, or the run name `robustseg.tracking.sweep_parent`
gave it), walks its trial runs and their fold runs, and writes a single HTML file with inline
CSS and base64 PNG plots, so it opens from disk or an e-mail attachment without any server:

- leaderboard: trials ranked by cross-validated validation Dice (a trial's ``cv_val_dice``, or
  the mean best Dice of its folds once every fold run has FINISHED; a failed or incomplete
  trial has no objective and ranks last), the Dice of every fold, the per-structure best Dice
  (LV/MYO/RV) and HD95 averaged over folds when the fold runs have them (``best_val_dice_<S>``,
  ``best_val_hd95[_<S>]``), and the parameters that differ between trials, one column per
  config section (``model``: name, params; ``optim``: name, lr, ...) so it stays ~1,600 px wide;
- per-fold Dice of the best trials, learning curves (validation Dice and training loss per
  epoch, from the metric history of each fold run);
- Optuna history: objective per trial number with the running best;
- parameter importance, only with at least `MIN_IMPORTANCE_TRIALS` (8) completed trials (else
  the section says it was skipped and why): Optuna's own (fANOVA) when a study is passed in;
  otherwise a simple screen (`importance_screen`): |Spearman rho| between a numeric parameter
  and the objective, and the correlation ratio eta for a categorical one. Both lie in [0, 1];
  they rank parameters by monotone/group association with the objective, ignore interactions,
  and are noisy with few trials. Parameters that split the trials exactly alike (all those the
  backbone choice fixes: ``model.params.*``, ``optim.name`` ...) are one entry, and the
  optimiser's numbers (``optim.lr``, ``optim.weight_decay``, ``optim.momentum``) are ranked
  within each optimiser when the sweep mixes optimisers (their search ranges differ).

Expected layout (what `robustseg.tracking` writes): sweep run -> trial runs (``cv_val_dice``,
``val_dice_fold<k>``) -> fold runs (``val_dice`` per epoch, ``best_val_dice``). A sweep whose
children are fold runs directly (no trial level) is shown with one single-fold row per run.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from robustseg.errors import RobustsegError

IGNORED_PARAMS = ("name", "data.val_fold")  # differ by construction between trials/folds
MAX_PLOTTED_TRIALS = 8
#: Fewest completed trials for which the report ranks parameters at all.
MIN_IMPORTANCE_TRIALS = 8
#: Parameters whose scale depends on the optimiser: ranked within each optimiser of a mixed sweep.
PER_OPTIMISER = ("optim.lr", "optim.weight_decay", "optim.momentum")
OPTIMISER = "optim.name"
#: Per-structure columns of the leaderboard: fold-run metric prefix -> column label prefix.
STRUCTURE_METRICS = (("best_val_dice_", ""), ("best_val_hd95_", "HD95 "))
_STRUCTURE_ORDER = ("LV", "MYO", "RV")


class SweepNotFound(RobustsegError, LookupError):
    """No run with that id or sweep name in the tracking store."""


@dataclass
class Trial:
    """One trial of a sweep and its fold runs."""

    run_id: str
    name: str
    number: int
    status: str
    params: Dict[str, str]
    objective: float
    fold_dice: Dict[int, float] = field(default_factory=dict)
    fold_run_ids: Dict[int, str] = field(default_factory=dict)
    #: Per-structure best Dice and HD95 (``LV``, ``HD95 LV`` ...) averaged over the folds that have them.
    structures: Dict[str, float] = field(default_factory=dict)


@dataclass
class Sweep:
    """A sweep read back from MLflow: trials ranked best first."""

    run_id: str
    name: str
    experiment: str
    status: str
    trials: List[Trial]
    varying: List[str]


# --------------------------------------------------------------------------- reading MLflow
def _finite(x: Optional[float]) -> bool:
    # MLflow's SQL stores stand +/-inf in as +/-1.79e308.
    return x is not None and math.isfinite(x) and abs(x) < 1e300


def _all_runs(client: Any, experiment_id: str) -> List[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _find_sweep_run(client: Any, sweep: str) -> Any:
    try:
        return client.get_run(sweep)
    except Exception:  # not a run id: look it up by name
        pass
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    found, names = [], set()
    for i in range(0, len(exp_ids), 100):
        for r in client.search_runs(exp_ids[i:i + 100], filter_string="tags.`robustseg.role` = 'sweep'"):
            names.add(r.info.run_name)
            if sweep in (r.info.run_name, r.data.tags.get("robustseg.sweep")):
                found.append(r)
        if not found and "'" not in sweep:  # a sweep not made by sweep_parent: any run of that name
            found += client.search_runs(exp_ids[i:i + 100], filter_string=f"attributes.run_name = '{sweep}'")
    if not found:
        known = ", ".join(sorted(n for n in names if n)[:20]) or "none"
        raise SweepNotFound(f"{client.tracking_uri}: no sweep run with id or name {sweep!r} (sweeps: {known})")
    return max(found, key=lambda r: r.info.start_time or 0)


def _fold_of(run: Any, default: int) -> int:
    for raw in (run.data.tags.get("fold"), run.data.params.get("data.val_fold")):
        try:
            return int(raw)
        except (TypeError, ValueError):
            continue
    return default


def _best_dice(client: Any, run: Any) -> float:
    m = run.data.metrics
    if _finite(m.get("best_val_dice")):
        return float(m["best_val_dice"])
    hist = [h.value for h in client.get_metric_history(run.info.run_id, "val_dice") if _finite(h.value)]
    return max(hist) if hist else float("nan")


def _structure_means(fold_runs: Any) -> Dict[str, float]:
    """``{"LV": mean best Dice, "HD95 LV": mean HD95, ...}`` over the fold runs that logged them."""
    values: Dict[str, List[float]] = {}
    for run in fold_runs:
        for key, value in run.data.metrics.items():
            if not _finite(value):
                continue
            if key in ("best_val_hd95", "best_val_hd95_mean"):
                values.setdefault("HD95", []).append(float(value))
                continue
            for prefix, label in STRUCTURE_METRICS:
                if key.startswith(prefix):
                    values.setdefault(label + key[len(prefix):], []).append(float(value))
    return {k: float(np.mean(v)) for k, v in values.items()}


def load_sweep(tracking_uri: str, sweep: str) -> Sweep:
    """Read a sweep's trials, fold results and params from MLflow.

    Args:
        tracking_uri: MLflow tracking URI.
        sweep: The sweep's parent run id or its name.

    Raises:
        SweepNotFound: nothing matches ``sweep``.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = _find_sweep_run(client, sweep)
    exp = client.get_experiment(parent.info.experiment_id)
    children: Dict[str, List[Any]] = {}
    for r in _all_runs(client, parent.info.experiment_id):
        children.setdefault(r.data.tags.get("mlflow.parentRunId", ""), []).append(r)
    ordered = sorted(children.get(parent.info.run_id, []), key=lambda r: r.info.start_time or 0)
    trials = []
    for idx, run in enumerate(ordered):
        folds = sorted(children.get(run.info.run_id, []), key=lambda r: r.info.start_time or 0) or [run]
        fold_runs = {_fold_of(f, i): f for i, f in enumerate(folds)}
        fold_dice = {k: _best_dice(client, f) for k, f in sorted(fold_runs.items())}
        objective = run.data.metrics.get("cv_val_dice")
        complete = all(f.info.status == "FINISHED" and _finite(fold_dice[k]) for k, f in fold_runs.items())
        if not _finite(objective):
            # A mean over the folds that happened to finish would flatter a failed trial.
            objective = float(np.mean(list(fold_dice.values()))) if complete else float("nan")
        number = run.data.tags.get("robustseg.trial_number")
        trials.append(Trial(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id[:8],
                            number=int(number) if number and number.isdigit() else idx, status=run.info.status,
                            params=dict(run.data.params or folds[0].data.params), objective=float(objective),
                            fold_dice=fold_dice, fold_run_ids={k: f.info.run_id for k, f in fold_runs.items()},
                            structures=_structure_means(fold_runs.values())))
    trials.sort(key=lambda t: (not _finite(t.objective), -t.objective if _finite(t.objective) else 0, t.number))
    keys = sorted({k for t in trials for k in t.params})
    varying = [k for k in keys if k not in IGNORED_PARAMS and not k.startswith("tracking.")
               and len({t.params.get(k) for t in trials}) > 1]
    return Sweep(run_id=parent.info.run_id, name=parent.info.run_name or parent.info.run_id, experiment=exp.name,
                 status=parent.info.status, trials=trials, varying=varying)


# --------------------------------------------------------------------------- importance
def _as_float(v: Optional[str]) -> Optional[float]:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def param_importance(trials: Sequence[Trial], keys: Sequence[str]) -> Dict[str, float]:
    """Simple importance of each parameter for the objective (no Optuna study needed).

    Numeric parameters: |Spearman rank correlation| with the objective. Categorical ones:
    correlation ratio eta = sqrt(between-group / total sum of squares of the objective).

    Args:
        trials: Trials; those without a finite objective are ignored.
        keys: Parameter names to score.

    Returns:
        ``{param: importance in [0, 1]}``, highest first; constant parameters are left out.
    """
    from scipy.stats import spearmanr

    done = [t for t in trials if _finite(t.objective)]
    y = np.array([t.objective for t in done], dtype=float)
    out: Dict[str, float] = {}
    if len(done) < 3 or np.ptp(y) == 0:
        return out
    for key in keys:
        raw = [t.params.get(key) for t in done]
        nums = [_as_float(v) for v in raw]
        if all(v is not None for v in nums):
            if len(set(nums)) > 1:
                rho = spearmanr(np.array(nums, dtype=float), y).statistic
                if _finite(rho):
                    out[key] = abs(float(rho))
        elif len(set(raw)) > 1:
            groups = [y[[r == level for r in raw]] for level in set(raw)]
            between = sum(len(g) * (g.mean() - y.mean()) ** 2 for g in groups)
            out[key] = float(math.sqrt(between / ((y - y.mean()) ** 2).sum()))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass
class Importance:
    """What the report's parameter-importance section shows.

    Attributes:
        values: ``{entry: importance in [0, 1]}``, highest first; an entry is a parameter, or
            ``"<param> (<optimiser>)"`` for a parameter ranked within one optimiser.
        same_as: ``{entry: [parameters]}`` that split the trials exactly as the entry does
            (scored once, under the entry).
        notes: Caveats (parameters ranked within each optimiser, groups too small to rank).
        skipped: Why nothing is ranked (too few completed trials), or None.
        completed: Completed trials (finite objective).
    """

    values: Dict[str, float]
    same_as: Dict[str, List[str]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    skipped: Optional[str] = None
    completed: int = 0


def _grouping(trials: Sequence[Trial], key: str) -> tuple:
    """How a parameter splits the trials: its values relabelled in order of first appearance."""
    seen: Dict[Optional[str], int] = {}
    return tuple(seen.setdefault(t.params.get(key), len(seen)) for t in trials)


def _merge_alike(trials: Sequence[Trial], keys: Sequence[str]) -> Dict[str, List[str]]:
    """``{representative: [parameters splitting the trials exactly alike]}`` over ``keys``.

    Only parameters with repeated values merge (a continuous parameter gives every trial its
    own level, and so would every other one). ``model.name`` then ``optim.name`` represent their
    group when in it: the backbone choice is what fixes its params and optimiser.
    """
    groups: Dict[tuple, List[str]] = {}
    for key in keys:
        split = _grouping(trials, key)
        groups.setdefault(split if len(set(split)) < len(trials) else (key,), []).append(key)
    out = {}
    for members in groups.values():
        rep = next((k for k in ("model.name", OPTIMISER) if k in members), sorted(members)[0])
        out[rep] = [k for k in sorted(members) if k != rep]
    return out


def importance_screen(trials: Sequence[Trial], keys: Sequence[str],
                      min_trials: int = MIN_IMPORTANCE_TRIALS) -> Importance:
    """`param_importance` made readable: enough trials, alike parameters merged, optimisers apart.

    Args:
        trials: Trials; those without a finite objective are ignored.
        keys: Parameters that vary between trials.
        min_trials: Fewest completed trials to rank anything (default 8): with fewer, a rank
            correlation over a handful of points ranks noise.
    """
    done = [t for t in trials if _finite(t.objective)]
    if len(done) < min_trials:
        return Importance({}, skipped=f"skipped: {len(done)} completed trials, need >= {min_trials}",
                          completed=len(done))
    optimisers = sorted({t.params[OPTIMISER] for t in done if t.params.get(OPTIMISER)})
    by_opt = {o: [t for t in done if t.params.get(OPTIMISER) == o] for o in optimisers}
    # Split only what varies within an optimiser; one value per optimiser is just the optimiser.
    within = [k for k in keys if k in PER_OPTIMISER and len(optimisers) > 1
              and any(len({t.params.get(k) for t in group}) > 1 for group in by_opt.values())]
    merged = _merge_alike(done, [k for k in keys if k not in within])
    values = param_importance(done, list(merged))
    notes = []
    for key in within:
        ranges = []
        for opt in optimisers:
            group = [t for t in by_opt[opt] if _as_float(t.params.get(key)) is not None]
            nums = [_as_float(t.params[key]) for t in group]
            if nums:
                ranges.append(f"{opt} {min(nums):.3g}..{max(nums):.3g}")
            score = param_importance(group, [key]).get(key)
            if score is None:
                notes.append(f"{key} ({opt}): {len(group)} trials, too few or too alike to rank (need >= 3)")
            else:
                values[f"{key} ({opt})"] = score
        notes.insert(0, f"{key} ranked within each optimiser (ranges differ: {'; '.join(ranges)})")
    values = dict(sorted(values.items(), key=lambda kv: -kv[1]))
    same_as = {k: v for k, v in merged.items() if v and k in values}
    return Importance(values, same_as, notes, None, len(done))


# --------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fold_plot(trials: Sequence[Trial]) -> str:
    plt = _pyplot()
    shown = trials[:20]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(shown) + 2), 3.6))
    folds = sorted({k for t in shown for k in t.fold_dice})
    for j, k in enumerate(folds):
        xs = [i + (j - (len(folds) - 1) / 2) * 0.08 for i, t in enumerate(shown) if _finite(t.fold_dice.get(k))]
        ys = [t.fold_dice[k] for t in shown if _finite(t.fold_dice.get(k))]
        ax.scatter(xs, ys, s=22, label=f"fold {k}")
    means = [(i, t.objective) for i, t in enumerate(shown) if _finite(t.objective)]
    if means:
        ax.scatter(*zip(*means), marker="_", s=400, c="k", label="mean")
    ax.set_xticks(range(len(shown)), [t.name for t in shown], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("best validation Dice"), ax.set_title("Dice per fold (best trials first)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _png(fig)


def _curves_plot(client: Any, trials: Sequence[Trial]) -> str:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    for i, t in enumerate(trials[:MAX_PLOTTED_TRIALS]):
        for j, (fold, rid) in enumerate(sorted(t.fold_run_ids.items())):
            for ax, key in ((ax1, "val_dice"), (ax2, "loss")):
                hist = sorted((m.step, m.value) for m in client.get_metric_history(rid, key) if _finite(m.value))
                if hist:
                    ax.plot(*zip(*hist), color=colors(i % 10), ls=styles[j % 4], lw=1.2,
                            label=f"{t.name} fold {fold}" if key == "val_dice" else None)
    ax1.set_title("validation Dice"), ax1.set_xlabel("epoch"), ax1.set_ylim(0, 1)
    ax2.set_title("training loss"), ax2.set_xlabel("epoch")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if ax1.lines:
        ax1.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _png(fig)


def _history_plot(trials: Sequence[Trial]) -> Optional[str]:
    done = sorted((t.number, t.objective) for t in trials if _finite(t.objective))
    if not done:
        return None
    plt = _pyplot()
    xs, ys = zip(*done)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.scatter(xs, ys, s=20, label="trial")
    ax.step(xs, np.maximum.accumulate(ys), where="post", c="C3", label="best so far")
    ax.set_xlabel("trial number"), ax.set_ylabel("cross-validated Dice"), ax.set_title("Optimisation history")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _importance_plot(importance: Dict[str, float], title: str) -> Optional[str]:
    if not importance:
        return None
    plt = _pyplot()
    names = list(importance)[:20][::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(names) + 1.2))
    ax.barh(names, [importance[n] for n in names], color="C2")
    ax.set_xlim(0, 1), ax.set_title(title, fontsize=9), ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- HTML
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1600px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.best{background:#eaf6ea}.muted{color:#777;font-size:.85em}
td.p{text-align:left;white-space:normal;max-width:18em}td.p b{font-weight:600}
img{max-width:100%;display:block;margin:.5em 0}code{background:#f5f5f5;padding:0 .2em}"""
#: How the leaderboard abbreviates run states.
_STATUS = {"FINISHED": "done", "FAILED": "failed", "KILLED": "killed", "RUNNING": "running", "SCHEDULED": "queued"}


def _fmt(x: Optional[float]) -> str:
    return f"{x:.4f}" if _finite(x) else "&mdash;"


def _img(b64: Optional[str], alt: str) -> str:
    if b64 is None:
        return f'<p class="muted">{html.escape(alt)}: not enough finished trials to plot.</p>'
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _short(value: Optional[str]) -> str:
    """A parameter value for a table cell: numbers to 3 significant digits (``0.00276``), text as is."""
    x = _as_float(value)
    if x is None or value is None or value.strip().lower() in ("nan", "inf", "-inf", "true", "false"):
        return "-" if value is None else value
    return str(int(x)) if x.is_integer() and abs(x) < 1e6 else f"{x:.3g}"


def param_columns(varying: Sequence[str]) -> Dict[str, List[str]]:
    """The leaderboard's parameter columns: ``{config section: its varying keys}``.

    One column per section (``model``, ``optim``, ...) instead of one per key keeps the table
    narrow; ``model`` and ``optim`` come first, their ``name`` first within them.
    """
    cols: Dict[str, List[str]] = {}
    for key in varying:
        cols.setdefault(key.split(".", 1)[0], []).append(key)
    order = sorted(cols, key=lambda c: ({"model": 0, "optim": 1}.get(c, 2), c))
    return {c: sorted(cols[c], key=lambda k: (k != f"{c}.name", k)) for c in order}


def _param_cell(params: Mapping[str, str], section: str, keys: Sequence[str]) -> str:
    """``<b>unet</b> base=8, depth=3``: the section's name in bold, then its other values (missing ones left out)."""
    e = html.escape
    parts = []
    for key in keys:
        if params.get(key) is None:
            continue
        short = key[len(section) + 1:]
        short = short[len("params."):] if short.startswith("params.") else short
        parts.append(f"<b>{e(_short(params[key]))}</b>" if short == "name" else f"{e(short)}={e(_short(params[key]))}")
    return " ".join(parts[:1]) + (" " + ", ".join(parts[1:]) if parts[1:] else "") if parts else "-"


def structure_columns(trials: Sequence[Trial]) -> List[str]:
    """Per-structure leaderboard columns present in any trial: Dice (``LV``...) first, then HD95."""
    keys = {k for t in trials for k in t.structures}

    def order(k: str) -> tuple:
        name = k.split(" ", 1)[-1] if k.startswith("HD95") else k
        return (k.startswith("HD95"), k != "HD95", _STRUCTURE_ORDER.index(name) if name in _STRUCTURE_ORDER else 9, k)

    return sorted(keys, key=order)


def _leaderboard(sweep: Sweep) -> str:
    e = html.escape
    folds = sorted({k for t in sweep.trials for k in t.fold_dice})
    structures = structure_columns(sweep.trials)
    params = param_columns(sweep.varying)
    # (header, css class) per column: names and parameter values read better left-aligned.
    cols = ([("#", ""), ("trial", "l"), ("status", "l"), ("CV Dice", "")] + [(f"fold {k}", "") for k in folds]
            + [(k, "") for k in structures] + [(c, "p") for c in params])

    def cell(tag: str, text: str, css: str) -> str:
        return f'<{tag} class="{css}">{text}</{tag}>' if css else f"<{tag}>{text}</{tag}>"

    rows = ["<tr>" + "".join(cell("th", e(h), "l" if css else "") for h, css in cols) + "</tr>"]
    for rank, t in enumerate(sweep.trials, 1):
        name = e(t.name) if str(t.number) in t.name else f"{e(t.name)} <span class=\"muted\">#{t.number}</span>"
        values = ([str(rank), name, e(_STATUS.get(t.status, t.status.lower())), _fmt(t.objective)]
                  + [_fmt(t.fold_dice.get(k)) for k in folds]
                  + [(f"{t.structures[k]:.1f}" if k.startswith("HD95") else _fmt(t.structures[k]))
                     if _finite(t.structures.get(k)) else "&mdash;" for k in structures]
                  + [_param_cell(t.params, c, keys) for c, keys in params.items()])
        css = ' class="best"' if rank == 1 and _finite(t.objective) else ""
        rows.append(f"<tr{css}>" + "".join(cell("td", v, c) for v, (_, c) in zip(values, cols)) + "</tr>")
    note = ""
    if structures:
        note = ('<p class="muted">LV/MYO/RV: best validation Dice per structure, HD95: its 95th-percentile '
                "Hausdorff distance, each the mean over the trial's folds.</p>")
    return "<table>" + "".join(rows) + "</table>" + note


def _importance_html(data: Sweep, study: Any) -> str:
    """The parameter-importance section: the ranking and how it was made, or why it was skipped."""
    e = html.escape
    rule = f"Shown with at least {MIN_IMPORTANCE_TRIALS} completed trials."
    if study is not None:
        import optuna

        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        method = "Optuna fANOVA importance (share of objective variance)"
        if done < MIN_IMPORTANCE_TRIALS:
            imp = Importance({}, skipped=f"skipped: {done} completed trials, need >= {MIN_IMPORTANCE_TRIALS}",
                             completed=done)
        else:
            imp = Importance(dict(optuna.importance.get_param_importances(study)), completed=done)
    else:
        method = "|Spearman rho| (numeric) / correlation ratio eta (categorical) with the CV Dice"
        imp = importance_screen(data.trials, data.varying)
    head = f'<p class="muted">{e(method)}. {e(rule)}</p>'
    if imp.skipped:
        return head + f'<p class="skipped">Parameter importance {e(imp.skipped)}.</p>'
    if not imp.values:
        return head + '<p class="skipped">Parameter importance: no parameter varies with the CV Dice.</p>'
    rows = "".join(f'<tr><td class="l"><code>{e(k)}</code></td><td>{v:.3f}</td><td class="l">'
                   f'{e(", ".join(imp.same_as.get(k, [])))}</td></tr>' for k, v in imp.values.items())
    notes = "".join(f'<p class="muted">{e(n)}.</p>' for n in imp.notes)
    labelled = {(f"{k} (+{len(imp.same_as[k])} alike)" if imp.same_as.get(k) else k): v for k, v in imp.values.items()}
    return (head + notes + _img(_importance_plot(labelled, method), "parameter importance")
            + '<table class="importance"><tr><th class="l">parameter</th><th>importance</th>'
            + f'<th class="l">same split of the trials as</th></tr>{rows}</table>')


def write_report(tracking_uri: str, sweep: str, out_path: Union[str, Path], *, study: Any = None) -> Path:
    """Write the sweep's HTML report (no external resources; images inline).

    Args:
        tracking_uri: MLflow tracking URI.
        sweep: The sweep's parent run id or name.
        out_path: HTML file to write (parent folders are created).
        study: Optional `optuna.Study` of the sweep: its fANOVA importances replace the
            correlation screen.

    Returns:
        ``out_path``.

    Raises:
        SweepNotFound: no such sweep.
    """
    from mlflow import MlflowClient

    data = load_sweep(tracking_uri, sweep)
    client = MlflowClient(tracking_uri=tracking_uri)
    e = html.escape
    best = next((t for t in data.trials if _finite(t.objective)), None)
    failed = sum(t.status in ("FAILED", "KILLED") for t in data.trials)
    best_html = "<p>No finished trial yet.</p>" if best is None else (
        f"<p>Best trial <b>{e(best.name)}</b>: cross-validated Dice <b>{_fmt(best.objective)}</b> "
        f"over {len(best.fold_dice)} folds.</p><table>" + "".join(
            f'<tr><td class="l"><code>{e(k)}</code></td><td class="l">{e(best.params[k])}</td></tr>'
            for k in data.varying if best.params.get(k) is not None) + "</table>")
    body = [
        f"<h1>Sweep {e(data.name)}</h1>",
        f'<p class="muted">MLflow run <code>{e(data.run_id)}</code> in experiment <code>{e(data.experiment)}</code> '
        f"({e(data.status)}); tracking store <code>{e(tracking_uri)}</code>. {len(data.trials)} trials, "
        f"{failed} failed or killed.</p>",
        "<h2>Best configuration</h2>", best_html,
        "<h2>Leaderboard</h2>", _leaderboard(data),
        "<h2>Dice per fold</h2>", _img(_fold_plot(data.trials) if data.trials else None, "Dice per fold"),
        "<h2>Learning curves</h2>",
        f'<p class="muted">Best {min(len(data.trials), MAX_PLOTTED_TRIALS)} trials; line style = fold.</p>',
        _img(_curves_plot(client, data.trials) if data.trials else None, "learning curves"),
        "<h2>Optimisation history</h2>", _img(_history_plot(data.trials), "optimisation history"),
        "<h2>Parameter importance</h2>", _importance_html(data, study),
    ]
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Sweep {e(data.name)}</title>'
           f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
