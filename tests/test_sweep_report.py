"""The sweep report renders from a tiny sweep written straight into a SQLite MLflow store."""
from __future__ import annotations

import base64
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple
from urllib.parse import urlsplit

import pytest

from robustseg.sweep_report import (MIN_IMPORTANCE_TRIALS, SweepNotFound, Trial, importance_screen, load_sweep,
                                    param_importance, write_report)

PNG_IMG = '<img src="data:image/png;base64,'
# (name, params, per-fold val_dice curves; None = the fold run failed before validating)
TRIALS = [
    ("trial-a", {"optim.lr": "0.01", "model.name": "unet2d"}, {0: [0.3, 0.6, 0.7], 1: [0.2, 0.5, 0.6]}),
    ("trial-b", {"optim.lr": "0.001", "model.name": "dynunet"}, {0: [0.4, 0.7, 0.8], 1: [0.3, 0.7, 0.75]}),
    ("trial-c", {"optim.lr": "0.1", "model.name": "unet2d"}, {0: [0.1, 0.9, 0.95], 1: None}),
    ("trial-d", {"optim.lr": "0.0001", "model.name": "dynunet"}, {0: [0.5, 0.6, 0.65], 1: [0.4, 0.55, 0.6]}),
]


def _make_sweep(uri: str) -> Dict[str, Any]:
    """A 4-trial x 2-fold sweep in the layout robustseg.tracking writes (sweep -> trial -> fold)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("report-test", artifact_location=Path(uri[len("sqlite:///"):]).parent.as_uri())
    client.create_experiment("other")  # the sweep lookup must search every experiment
    sweep = client.create_run(exp, run_name="sweep-demo", tags={"robustseg.role": "sweep", "robustseg.sweep": "sweep-demo"})
    sid = sweep.info.run_id
    now = int(time.time() * 1000)
    for number, (name, params, folds) in enumerate(TRIALS):
        common = {**params, "optim.epochs": "3", "name": f"exp-{name}"}
        trial = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": sid, "robustseg.role": "trial",
                                                             "robustseg.trial_number": str(number)})
        tid = trial.info.run_id
        client.log_batch(tid, params=[Param(k, v) for k, v in common.items()])
        best = {}
        for k, curve in folds.items():
            run = client.create_run(exp, run_name=f"{name}-fold{k}", tags={"mlflow.parentRunId": tid, "fold": str(k),
                                                                           "robustseg.role": "fold"})
            rid = run.info.run_id
            client.log_batch(rid, params=[Param(p, v) for p, v in {**common, "data.val_fold": str(k)}.items()])
            if curve is None:
                client.set_terminated(rid, "FAILED")
                continue
            metrics = [Metric("val_dice", v, now, e + 1) for e, v in enumerate(curve)]
            metrics += [Metric("loss", 1.0 / (e + 1), now, e + 1) for e in range(len(curve))]
            # trial-b fold 1 lacks best_val_dice: the report falls back to the history's maximum.
            if (name, k) != ("trial-b", 1):
                metrics.append(Metric("best_val_dice", max(curve), now, len(curve)))
            client.log_batch(rid, metrics=metrics)
            client.set_terminated(rid, "FINISHED")
            best[k] = max(curve)
        if len(best) == len(folds):
            mean = sum(best.values()) / len(best)
            client.log_batch(tid, metrics=[Metric("cv_val_dice", mean, now, 0)])
            client.set_terminated(tid, "FINISHED")
        else:
            client.set_terminated(tid, "FAILED")
    client.set_terminated(sid, "FINISHED")
    return {"sweep_id": sid}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """One SQLite store per module (schema creation costs seconds)."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return {"uri": uri, "root": root, **_make_sweep(uri)}


@pytest.fixture(scope="module")
def report_html(store: Dict[str, Any]) -> str:
    out = write_report(store["uri"], "sweep-demo", store["root"] / "out" / "report.html")
    assert out.is_file()
    return out.read_text()


def test_load_sweep_ranks_trials(store: Dict[str, Any]) -> None:
    sweep = load_sweep(store["uri"], "sweep-demo")
    assert sweep.run_id == store["sweep_id"] and sweep.experiment == "report-test"
    # trial-c's one finished fold beats everything, but a failed trial has no objective: last.
    assert [t.name for t in sweep.trials] == ["trial-b", "trial-a", "trial-d", "trial-c"]
    b, a, d, c = sweep.trials
    assert b.objective == pytest.approx(0.775) and b.fold_dice == {0: pytest.approx(0.8), 1: pytest.approx(0.75)}
    assert a.objective == pytest.approx(0.65) and a.number == 0 and d.number == 3
    assert c.status == "FAILED" and math.isnan(c.objective) and c.fold_dice[0] == pytest.approx(0.95)
    assert math.isnan(c.fold_dice[1])  # the failed fold never validated
    assert sweep.varying == ["model.name", "optim.lr"]  # not optim.epochs (constant) nor name (ignored)


def test_report_is_self_contained_html(report_html: str) -> None:
    html = report_html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<style>" in html
    assert not re.search(r"https?://|<script|<link|@import|url\(", html), "report must not load anything external"
    images = re.findall(re.escape(PNG_IMG) + r"([A-Za-z0-9+/=]+)\"", html)
    assert len(images) == 3  # per-fold Dice, learning curves, optimisation history (importance: too few trials)
    assert all(base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" for b64 in images)


def test_report_leaderboard(report_html: str) -> None:
    table = report_html[report_html.index("<h2>Leaderboard</h2>"):]
    table = table[: table.index("</table>")]
    for header in ("CV Dice", "fold 0", "fold 1", "model", "optim"):  # one column per config section
        assert f">{header}</th>" in table
    assert "optim.epochs" not in table and ">optim.lr</th>" not in table and "number</th>" not in table
    assert table.index("trial-b") < table.index("trial-a") < table.index("trial-d") < table.index("trial-c")
    assert "0.7750" in table and "0.8000" in table and ">failed</td>" in table
    assert '<td class="p"><b>dynunet</b></td>' in table and '<td class="p">lr=0.001</td>' in table
    assert ">LV</th>" not in table and "HD95" not in table  # these fold runs logged no per-structure metrics
    assert "Best trial <b>trial-b</b>" in report_html
    assert "Spearman" in report_html  # the documented fallback importance


def test_importance_is_skipped_with_few_trials_and_says_why(report_html: str) -> None:
    section = report_html[report_html.index("<h2>Parameter importance</h2>"):]
    assert f"at least {MIN_IMPORTANCE_TRIALS} completed trials" in section
    assert '<p class="skipped">Parameter importance skipped: 3 completed trials, need &gt;= 8.</p>' in section
    assert PNG_IMG not in section and '<table class="importance">' not in section


def test_report_by_run_id_matches_by_name(store: Dict[str, Any], report_html: str, tmp_path: Path) -> None:
    by_id = write_report(store["uri"], store["sweep_id"], tmp_path / "by_id.html").read_text()
    strip = re.compile(re.escape(PNG_IMG) + r"[^\"]*")  # PNG bytes may differ in metadata
    assert strip.sub("", by_id) == strip.sub("", report_html)


def test_unknown_sweep_names_the_known_ones(store: Dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(SweepNotFound, match="sweep-demo"):
        write_report(store["uri"], "no-such-sweep", tmp_path / "x.html")


def test_param_importance_fallback() -> None:
    def trial(i: int, lr: str, opt: str, const: str, objective: float) -> Trial:
        return Trial(run_id=str(i), name=str(i), number=i, status="FINISHED", objective=objective,
                     params={"lr": lr, "opt": opt, "const": const})

    trials = [trial(0, "0.1", "sgd", "1", 0.2), trial(1, "0.01", "sgd", "1", 0.5), trial(2, "0.001", "adam", "1", 0.9),
              trial(3, "0.0001", "adam", "1", 0.95), trial(4, "0.5", "sgd", "1", float("nan"))]
    imp = param_importance(trials, ["lr", "opt", "const"])
    assert imp["lr"] == pytest.approx(1.0)  # perfectly monotone (decreasing) -> |rho| = 1
    assert 0.8 < imp["opt"] <= 1.0 and "const" not in imp
    assert list(imp) == ["lr", "opt"]
    assert param_importance(trials[:2], ["lr"]) == {}  # too few trials to say anything


def test_report_uses_an_optuna_study_when_given(store: Dict[str, Any], tmp_path: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: -((t.suggest_float("optim/lr", 1e-4, 1e-1, log=True) - 0.01) ** 2)
                   + 0 * t.suggest_int("model/params/depth", 2, 5), n_trials=8)
    html = write_report(store["uri"], "sweep-demo", tmp_path / "r.html", study=study).read_text()
    assert "fANOVA" in html and "Spearman" not in html
    assert html.count(PNG_IMG) == 4


# --------------------------------------------------------------------------- a sweep big enough to rank
def _big_trials() -> list:
    """10 trials of the tiny space's shape: the backbone fixes its params and optimiser; lr ranges differ.

    Within SGD the Dice rises with lr, within Adam it falls: pooled, lr would mix the two.
    """
    out = []
    for i in range(5):
        lr = 3e-3 * 1.7 ** i
        out.append(({"model.name": "unet2d", "model.params.filters_base": "8", "model.params.filters_max": "32",
                     "model.params.max_stages": "4", "optim.name": "sgd_nesterov", "optim.momentum": "0.99", "optim.lr": repr(lr)}, 0.70 + 0.02 * i))
        lr = 3e-4 * 1.7 ** i
        out.append(({"model.name": "unet", "model.params.base": "8", "model.params.depth": "3",
                     "optim.name": "adam", "optim.momentum": "0.9", "optim.lr": repr(lr)}, 0.80 - 0.03 * i))
    return out


@pytest.fixture(scope="module")
def big(store: Dict[str, Any]) -> Dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=store["uri"])
    exp = client.create_experiment("report-big")
    sid = client.create_run(exp, run_name="sweep-big", tags={"robustseg.role": "sweep",
                                                             "robustseg.sweep": "sweep-big"}).info.run_id
    now = int(time.time() * 1000)
    for n, (params, dice) in enumerate(_big_trials()):
        name = f"trial_{n:03d}_{n:08x}"
        tid = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": sid, "robustseg.role": "trial",
                                                          "robustseg.trial_number": str(n)}).info.run_id
        client.log_batch(tid, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric("cv_val_dice", dice, now, 0)])
        rid = client.create_run(exp, run_name=f"fold0 · {name}", tags={"mlflow.parentRunId": tid, "fold": "0",
                                                                       "robustseg.role": "fold"}).info.run_id
        per = {"best_val_dice": dice, "best_val_dice_LV": dice + 0.1, "best_val_dice_MYO": dice - 0.1,
               "best_val_dice_RV": dice, "best_val_hd95_LV": 4.25}
        client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in per.items()])
        for run_id in (rid, tid):
            client.set_terminated(run_id, "FINISHED")
    client.set_terminated(sid, "FINISHED")
    html_text = write_report(store["uri"], "sweep-big", store["root"] / "out" / "big.html").read_text()
    return {"uri": store["uri"], "html": html_text}


def test_importance_merges_backbone_bound_params_and_ranks_lr_within_each_optimiser(big: Dict[str, Any]) -> None:
    sweep = load_sweep(big["uri"], "sweep-big")
    imp = importance_screen(sweep.trials, sweep.varying)
    assert imp.skipped is None and imp.completed == 10
    # Within each optimiser lr orders the trials perfectly; pooled it would not (and is not shown).
    assert imp.values["optim.lr (adam)"] == pytest.approx(1.0)
    assert imp.values["optim.lr (sgd_nesterov)"] == pytest.approx(1.0)
    assert "optim.lr" not in imp.values
    # Everything the backbone fixes is one entry, not one bar per parameter at the same value.
    assert set(imp.values) == {"model.name", "optim.lr (adam)", "optim.lr (sgd_nesterov)"}
    assert set(imp.same_as["model.name"]) == {"model.params.base", "model.params.depth", "model.params.filters_base",
                                              "model.params.filters_max", "model.params.max_stages", "optim.momentum",
                                              "optim.name"}
    assert any(n.startswith("optim.lr ranked within each optimiser (ranges differ: adam 0.0003..") for n in imp.notes)
    # The same rule cut at 10 trials skips, saying how many it had.
    assert importance_screen(sweep.trials, sweep.varying, min_trials=11).skipped == \
        "skipped: 10 completed trials, need >= 11"


def test_report_importance_section_lists_what_it_ranked(big: Dict[str, Any]) -> None:
    section = big["html"][big["html"].index("<h2>Parameter importance</h2>"):]
    assert "skipped" not in section and section.count(PNG_IMG) == 1
    rows = re.findall(r"<tr><td class=\"l\"><code>([^<]+)</code></td><td>([0-9.]+)</td>", section)
    assert sorted(name for name, _ in rows) == ["model.name", "optim.lr (adam)", "optim.lr (sgd_nesterov)"]
    assert "optim.lr ranked within each optimiser" in section


def _column_widths(table: str) -> list:
    """Rough rendered width per column: longest text (wrapping cells capped at 18em) x 7 px + padding."""
    rows = [re.findall(r"<t[hd]( class=\"(\w+)\")?>(.*?)</t[hd]>", r) for r in re.findall(r"<tr[^>]*>(.*?)</tr>", table)]
    widths = [0] * len(rows[0])
    for row in rows:
        for j, (_, css, text) in enumerate(row):
            chars = len(html_unescape(re.sub(r"<[^>]+>", "", text)))
            widths[j] = max(widths[j], min(chars * 7, 210) if css == "p" else chars * 7)
    return [w + 16 for w in widths]


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_leaderboard_fits_and_shows_per_structure_metrics(big: Dict[str, Any]) -> None:
    page = big["html"]
    table = page[page.index("<h2>Leaderboard</h2>"):]
    table = table[: table.index("</table>")]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert headers == ["#", "trial", "status", "CV Dice", "fold 0", "LV", "MYO", "RV", "HD95 LV", "model", "optim"]
    first = re.findall(r"<tr class=\"best\">(.*?)</tr>", table)[0]
    assert "trial_001_00000001" in first and "<td>0.9000</td><td>0.7000</td><td>0.8000</td><td>4.2</td>" in first
    assert '<td class="p"><b>unet</b> base=8, depth=3</td>' in first
    assert '<td class="p"><b>adam</b> lr=0.0003, momentum=0.9</td>' in first
    assert sum(_column_widths(table)) <= 1600, _column_widths(table)
    assert "max-width:1600px" in page


def _chromium() -> str:
    import os
    import shutil

    for name in (os.environ.get("ROBUSTSEG_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable", "headless_shell"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return ""


def _requests_through_refusing_proxy(browser: str, page: Path, profile: Path) -> Tuple[Any, List[str]]:
    """Render ``page`` headless with every request sent to a local proxy that logs and refuses it.

    Returns the browser's completed process (``--dump-dom``: stdout is the rendered DOM) and
    the requests the proxy saw (``METHOD target``). Loopback bypasses the proxy.
    """
    import http.server
    import socketserver
    import subprocess
    import threading

    seen: List[str] = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_error(403)

        do_GET = do_POST = do_HEAD = do_CONNECT = _refuse

        def log_message(self, *args: Any) -> None:  # quiet: the list is the log
            pass

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Refuse) as proxy:
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-pings",
             "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate",
             f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{proxy.server_address[1]}",
             "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
        proxy.shutdown()
    return dom, seen


def _host(request: str) -> str:
    """``CONNECT host:443`` or ``GET http://host/path`` -> ``host``."""
    target = request.split(" ", 1)[1]
    return (urlsplit(target).hostname if "://" in target else target.rsplit(":", 1)[0]) or target


def test_report_in_a_real_browser_loads_nothing_from_outside(store: Dict[str, Any], report_html: str,
                                                              tmp_path: Path) -> None:
    """Optional (skipped without Chromium): the page renders its sections offline.

    Every request the browser makes goes through a local proxy that records it and refuses it
    (`_requests_through_refusing_proxy`): a report that fetched a script, a font or a tracker
    would show up in the proxy's log. Chromium also calls Google services on its own at start
    (network time, sign-in, a search preconnect; Chromium 156 does so even with the flags that
    switch most of them off), so the same browser first renders a blank local page, and the
    report may reach no host beyond that baseline's (which must be Google's own).
    """
    browser = _chromium()
    if not browser:
        pytest.skip("no Chromium on PATH (chromium, chromium-browser, google-chrome or $ROBUSTSEG_CHROMIUM)")
    blank = tmp_path / "blank.html"
    blank.write_text("<!doctype html><title>blank</title><p>blank</p>")
    base, own = _requests_through_refusing_proxy(browser, blank, tmp_path / "profile-blank")
    assert base.returncode == 0 and "blank" in base.stdout, base.stderr[-2000:]
    own_hosts = {_host(r) for r in own}
    assert all(h == "google.com" or h.endswith(".google.com") for h in own_hosts), own
    dom, seen = _requests_through_refusing_proxy(browser, store["root"] / "out" / "report.html",
                                                 tmp_path / "profile-report")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h2>Leaderboard</h2>" in dom.stdout and "parameter importance" in dom.stdout.lower()
    outside = [r for r in seen if _host(r) not in own_hosts]
    assert outside == [], f"the report made requests off the machine: {outside}"
