"""Every Grafana dashboard parses and queries only metrics the installed Ray exports.

The allowed names are collected at test time from the installed Ray source, so a Ray upgrade
that renames a metric fails here rather than leaving an empty panel:

- names passed to ``Gauge``/``Counter``/``Histogram``/``Sum`` in Ray's Python code (f-string
  placeholders such as ``serve_{protocol_name}_request_latency_ms`` match any word);
- Ray Data operator metrics (``metric_field``/``metric_property`` names of ``OpRuntimeMetrics``),
  exported as ``data_<name>``;
- every ``ray_*`` name in the Grafana dashboards Ray ships (covers metrics defined in C++,
  such as ``ray_tasks`` and ``ray_object_store_memory``).

Ray prefixes everything with ``ray_``; histograms add ``_bucket``/``_sum``/``_count`` and
counters ``_total``. The only exceptions are robustseg's own metrics, documented in
``dashboards/README.md``.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "dashboards").glob("*.json"))
CUSTOM = ("ray_robustseg_",)  # robustseg's own metrics (dashboards/README.md)
SUFFIXES = ("", "_bucket", "_sum", "_count", "_total")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan", "le"}
METRIC_CALL = re.compile(r"\b(?:Gauge|Counter|Histogram|Sum)\(\s*(?:name\s*=\s*)?f?([\"'])([A-Za-z0-9_{}.]+)\1")


def _ray_root() -> Path:
    spec = importlib.util.find_spec("ray")  # the installed package, without importing (and starting) it
    assert spec is not None and spec.submodule_search_locations, "ray is not installed"
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def ray_metric_patterns() -> Tuple[re.Pattern, ...]:
    """Regexes of every metric name found in the installed Ray source (with the ``ray_`` prefix)."""
    root = _ray_root()
    bases: Set[str] = set()
    for py in root.rglob("*.py"):
        if "tests" in py.relative_to(root).parts:
            continue
        text = py.read_text(errors="ignore")
        if "Gauge(" in text or "Counter(" in text or "Histogram(" in text or "Sum(" in text:
            bases.update(m.group(2) for m in METRIC_CALL.finditer(text))
    op_metrics = root / "data/_internal/execution/interfaces/op_runtime_metrics.py"
    if op_metrics.exists():
        bases.update(f"data_{n}" for n in _op_runtime_metric_names(op_metrics.read_text()))
    dashboards = root / "dashboard/modules/metrics/dashboards"
    shipped = {m for f in dashboards.glob("*") if f.suffix in (".py", ".json")
               for m in re.findall(r"\bray_[a-z0-9_]+", f.read_text())}
    patterns = [re.escape(m) for m in shipped]
    for b in bases:
        # An f-string placeholder stands for one word (serve_{protocol_name}_... -> http, grpc); names
        # that are mostly placeholders (f"{prefix}_{name}") would match anything and are skipped.
        if len(re.sub(r"\{[^}]*\}|_", "", b)) >= 6:
            patterns.append(re.sub(r"\\\{[^}]*\\\}", "[a-z0-9]+", re.escape(f"ray_{b}")))
    assert len(patterns) > 200, f"too few Ray metric names found under {root}: {len(patterns)}"
    return tuple(re.compile(p) for p in patterns)


def _op_runtime_metric_names(source: str) -> Iterator[str]:
    """Field and property names of ``OpRuntimeMetrics`` that Ray Data exports as metrics."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(node.value, ast.Call):
            func = node.value.func
            if getattr(func, "id", getattr(func, "attr", "")) == "metric_field":
                yield node.target.id
        elif isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if getattr(target, "id", getattr(target, "attr", "")) == "metric_property":
                    yield node.name


def is_ray_metric(name: str) -> bool:
    return any(p.fullmatch(name[: len(name) - len(s)]) for p in ray_metric_patterns() for s in SUFFIXES
               if name.endswith(s))


def promql_metrics(expr: str) -> Set[str]:
    """Metric names in a PromQL expression (functions, keywords, labels and durations removed)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals (label values, regexes)
    e = re.sub(r"\{[^{}]*\}", "", e)  # label matchers
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors, including $__rate_interval
    e = re.sub(r"\$\w+", "", e)  # Grafana variables outside selectors
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def _walk_panels(panels: List[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels", []))


def dashboard_exprs(board: dict) -> List[Tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query."""
    out = [(f"panel {p.get('title')!r}", t["expr"]) for p in _walk_panels(board["panels"]) for t in p.get("targets", [])]
    for v in board.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", q)
            out.append((f"variable {v['name']!r}", m.group(1) if m else q))
    return out


def test_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARDS} >= {"grafana_training.json", "grafana_serve.json"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_a_valid_grafana_model(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 27
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_walk_panels(board["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"{path.name}: panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), f"{path.name}: unbalanced {t['expr']}"
        used = {v for t in p["targets"] for v in re.findall(r"\$(\w+)", t["expr"]) if not v.startswith("__")}
        assert used <= set(variables), f"{path.name}: panel {p['title']!r} uses undefined variables {used - set(variables)}"


def test_promql_extraction() -> None:
    expr = ('histogram_quantile(0.9, sum by (application, le) (rate(ray_serve_http_request_latency_ms_bucket'
            '{route!~"/-/.*", application=~"$App"}[$__rate_interval]))) / on() sum(ray_node_cpu_count) * 100')
    assert promql_metrics(expr) == {"ray_serve_http_request_latency_ms_bucket", "ray_node_cpu_count"}


def test_collected_names_come_from_ray() -> None:
    for name in ("ray_node_gpus_utilization", "ray_serve_http_request_latency_ms_bucket", "ray_tasks",
                 "ray_data_task_submission_backpressure_time", "ray_serve_actual_batch_size_count"):
        assert is_ray_metric(name), name
    assert not is_ray_metric("ray_node_gpu_utilisation")  # a plausible typo must fail
    assert not is_ray_metric("robustseg_train_slices_per_second")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_metrics_exist_in_ray(path: Path) -> None:
    board = json.loads(path.read_text())
    unknown, custom = [], set()
    for where, expr in dashboard_exprs(board):
        names = promql_metrics(expr)
        assert names, f"{path.name} {where}: no metric in {expr!r}"
        for name in names:
            if name.startswith(CUSTOM):
                custom.add(name)
            elif not is_ray_metric(name):
                unknown.append(f"{where}: {name}")
    assert not unknown, f"{path.name} queries metrics the installed Ray does not export: {unknown}"
    readme = (REPO / "dashboards" / "README.md").read_text()
    for name in custom:
        assert name in readme, f"custom metric {name} is not documented in dashboards/README.md"
