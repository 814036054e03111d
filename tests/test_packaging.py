"""The explicit package list in pyproject.toml covers every package in the tree."""
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(cfg["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO / "platform").parts) for p in (REPO / "platform").rglob("__init__.py")}
    found |= {p.parent.name for p in REPO.glob("*/__init__.py") if p.parent.name not in ("platform", "tests")}
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
