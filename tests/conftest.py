"""Shared test fixtures.

Real data lives in ``../shared/data`` beside the checkout (never in the repo). Under CI
(``CI=true``) a missing file is a failure; elsewhere the test is skipped with a reason that
names the path.
"""
from __future__ import annotations

import os
import sys
import socket
from pathlib import Path
from typing import Any, Callable

import pytest

# Float32 on every CPU, so tests that compare two inference paths bit for bit hold on machines
# with AMX too (where bf16 autocast is the default); tests/engine/test_precision.py covers bf16.
os.environ.setdefault("ROBUSTSEG_CPU_BF16", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ROBUSTSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def _require(rel: str) -> Path:
    p = SHARED_DATA / rel
    if not p.exists():
        msg = f"real data not found: {p}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (CI=true: real-data tests must run)")
        pytest.skip(msg)
    return p


@pytest.fixture
def shared_data() -> Callable[[str], Path]:
    """``shared_data("acdc_h5")`` -> the path under ../shared/data, or skip/fail if missing."""
    return _require


@pytest.fixture(autouse=True)
def _isolated_mlflow_uri() -> Any:
    """Restore MLflow's process-wide tracking/registry URIs after each test.

    ``mlflow.set_tracking_uri`` exports ``MLFLOW_TRACKING_URI``; a test that leaves it set
    sends every later test's runs (resolved through that variable) into its own store.
    """
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])


@pytest.fixture(autouse=True)
def _quiet_ray_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3-compatible server (moto) on 127.0.0.1 for one test module: real S3 protocol."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()  # stop only what this fixture started


@pytest.fixture(scope="session", autouse=True)
def _no_store_in_the_checkout() -> Any:
    """Fail the run if any test leaves an MLflow store at the repository root.

    MLflow's default tracking URI is ``./mlflow.db``: a lookup with no URI silently creates
    one in the working folder (a 950 KB one was once committed). Tests use tmp paths.
    """
    watched = [REPO / "mlflow.db", REPO / "mlruns"]
    before = {p for p in watched if p.exists()}
    yield
    appeared = [str(p) for p in watched if p.exists() and p not in before]
    assert not appeared, f"a test created an MLflow store in the checkout: {appeared}"


# ------------------------------------------------------------------ nothing written into the checkout
# Tests (and the commands they run) write under tmp_path, never into the repository (issue 13):
# the untracked and ignored paths of the checkout are compared before and after the session.
_CHECKOUT = Path(__file__).resolve().parents[1]
_BUILD_LITTER = ("__pycache__", ".pytest_cache", ".egg-info")


def _untracked_paths() -> "set[str] | None":
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=_CHECKOUT,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout: nothing to compare
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in p for part in _BUILD_LITTER)}


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_clean() -> Any:
    """Fails the session (a teardown error) when it left new files in the checkout."""
    before = _untracked_paths()
    yield
    after = _untracked_paths()
    if before is None or after is None:
        return
    new = sorted(p for p in after - before if not any(p.startswith(b) for b in before if b.endswith("/")))
    assert not new, (f"the test session wrote into the checkout {_CHECKOUT} (tests must write under tmp_path): "
                     + ", ".join(new[:20]))
