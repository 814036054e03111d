"""The package's layering, checked on the source with an AST walk (no imports executed).

Rules (issue 13; README "Layout"):

* no import cycle anywhere in ``robustseg``;
* the ML core (``data``, ``augment``, ``models``, ``regimes``, ``engine``, ``analysis``)
  imports neither ``ray`` (except ``data/streaming.py``, the Ray Data reader) nor
  ``trainables``, ``deploy`` or ``robustseg.cli``;
* only ``robustseg.cli`` imports ``trainables`` and ``deploy``, and nothing outside it
  (library, ``trainables``, ``deploy``) imports ``robustseg.cli``;
* no private name (``_x``) is imported from a module outside the importer's own package.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"robustseg": REPO / "platform" / "robustseg", "trainables": REPO / "trainables", "deploy": REPO / "deploy"}
CORE = ("data", "augment", "models", "regimes", "engine", "analysis")
RAY_ALLOWED = {"robustseg.data.streaming"}


def modules() -> Dict[str, Path]:
    """Dotted module name -> file, for the three top-level packages."""
    out = {}
    for top, root in ROOTS.items():
        for f in root.rglob("*.py"):
            parts = [top, *f.relative_to(root).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = modules()


def imports(name: str) -> Iterator[Tuple[str, List[str], int]]:
    """(imported module, names taken from it, line) for every import statement, lazy ones included."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


def edges(name: str) -> Set[str]:
    """In-tree modules ``name`` imports: a submodule when one is named (``from pkg import sub``), else the module."""
    out = set()
    for base, names, _ in imports(name):
        subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
        out.update(subs or ([base] if base in MODULES else []))
    out.discard(name)
    return out


def cycles() -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: edges(m) for m in MODULES}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations() -> List[str]:
    """Every broken rule, as ``file:line: what``."""
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles()]
    for name, path in sorted(MODULES.items()):
        where = path.relative_to(REPO)
        core = any(in_package(name, f"robustseg.{c}") for c in CORE)
        cli = in_package(name, "robustseg.cli")
        own = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for base, names, line in imports(name):
            if core and in_package(base, "ray") and name not in RAY_ALLOWED:
                out.append(f"{where}:{line}: the ML core imports ray")
            if in_package(name, "robustseg") and not cli and (in_package(base, "trainables") or in_package(base, "deploy")):
                out.append(f"{where}:{line}: only robustseg.cli may import {base}")
            if not cli and in_package(base, "robustseg.cli"):
                out.append(f"{where}:{line}: imports {base} (only the command line may)")
            if base in MODULES and not in_package(base, own):
                for n in names:
                    if n.startswith("_") and not n.startswith("__") and f"{base}.{n}" not in MODULES:
                        out.append(f"{where}:{line}: imports the private name {n} from {base}")
    return out


def test_the_package_keeps_its_layers() -> None:
    problems = violations()
    assert not problems, f"{len(problems)} layering problem(s):\n" + "\n".join(problems)


def test_the_checker_sees_what_it_checks() -> None:
    # The walk finds the package, its lazy imports and both kinds of import statement.
    assert "robustseg.cli" in MODULES and "robustseg.engine.fit" in MODULES and "trainables.ray_session" in MODULES
    assert "trainables.ray_session" in edges("robustseg.cli.train")  # a lazy import inside a function
    assert "robustseg.config" in edges("robustseg.cli.common")
    assert any(in_package(base, "ray") for base, _, _ in imports("robustseg.data.streaming"))


@pytest.mark.parametrize("source, problem", [
    ("import ray\n", "the ML core imports ray"),
    ("from trainables.ray_session import init_ray\n", "only robustseg.cli may import trainables.ray_session"),
    ("from robustseg.cli.common import print_table\n", "imports robustseg.cli.common (only the command line may)"),
    ("from robustseg.engine.fit import _private_helper\n", "imports the private name _private_helper"),
    ("from robustseg.engine import fit\n", "import cycle"),
])
def test_each_rule_fails_on_a_planted_violation(tmp_path, monkeypatch, source, problem) -> None:
    # A module planted in the ML core (models); for the cycle, in engine, and fit imports it back.
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    monkeypatch.setitem(MODULES, f"robustseg.{'engine' if problem == 'import cycle' else 'models'}.planted", planted)
    if problem == "import cycle":
        fit = tmp_path / "fit.py"
        fit.write_text(MODULES["robustseg.engine.fit"].read_text() + "\nfrom robustseg.engine import planted\n")
        monkeypatch.setitem(MODULES, "robustseg.engine.fit", fit)
    monkeypatch.setattr(Path, "relative_to", lambda self, other: self)
    assert any(problem in p for p in violations()), violations()


MAX_FUNCTION_LINES = 100


def test_no_library_function_is_over_100_lines() -> None:
    long = []
    for name, path in sorted(MODULES.items()):
        if not in_package(name, "robustseg"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name} is {lines} lines")
    assert not long, "split these along their steps:\n" + "\n".join(long)
