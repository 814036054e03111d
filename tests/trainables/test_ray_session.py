"""`init_ray`: what it asks of a local Ray before starting it (ray.init is replaced: no cluster)."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest
import ray

from trainables import ray_session


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> List[Dict[str, Any]]:
    seen: List[Dict[str, Any]] = []

    def fake_init(*args: Any, **kwargs: Any) -> None:
        seen.append({"kwargs": kwargs, "footer_actors": os.environ.get(ray_session.FOOTER_ACTORS_ENV),
                     "preemption_watcher": os.environ.get(ray_session.PREEMPTION_WATCHER_ENV),
                     "health_check_s": os.environ.get(ray_session.HEALTH_CHECK_INTERVAL_ENV)})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in ray_session.LOCAL_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    return seen


def test_local_ray_trims_its_per_run_processes_and_polls_faster(calls: List[Dict[str, Any]]) -> None:
    ray_session.init_ray(num_cpus=3)
    assert calls == [{"kwargs": {"address": "local", "num_cpus": 3, "include_dashboard": False,
                                 "log_to_driver": False},
                      "footer_actors": "1", "preemption_watcher": "0", "health_check_s": "0.5"}]


def test_an_explicit_footer_setting_wins(calls: List[Dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ray_session.FOOTER_ACTORS_ENV, "4")
    monkeypatch.setenv(ray_session.HEALTH_CHECK_INTERVAL_ENV, "2")
    ray_session.init_ray()
    assert calls[0]["footer_actors"] == "4" and calls[0]["kwargs"]["num_cpus"] >= 4
    assert calls[0]["health_check_s"] == "2" and calls[0]["preemption_watcher"] == "0"


def test_joining_a_cluster_leaves_its_settings_alone(calls: List[Dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_session.init_ray()
    assert calls == [{"kwargs": {}, "footer_actors": None, "preemption_watcher": None, "health_check_s": None}]
