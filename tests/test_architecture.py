"""The package's shape: no import cycles, the core never imports the course, files stay readable.

The import graph is read from the source (every ``import`` statement, those inside functions and
``TYPE_CHECKING`` blocks included), so a cycle hidden behind a lazy import is still a cycle.
Each module is also imported alone in a fresh interpreter: an import that only works after some
other module happened to be imported first fails there.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minipipe"
ENTRY = {"minipipe.__main__"}  # the command line joins the core and the course (``grade``)
MAX_FILE_LINES = 420  # "about 400" for the core
MAX_FUNCTION_LINES = 85  # "about 80" everywhere


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """The minipipe modules ``name`` imports (resolved to modules that exist)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in MODULES and t != name:
                out.add(t)
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_the_graph_reads_the_real_imports():
    # a few edges that must be there, so a broken parser cannot make the other tests pass
    assert "minipipe.validate" in GRAPH["minipipe.simulate"]
    assert "minipipe.runtime.stage" in GRAPH["minipipe.runtime.interpreter"]
    assert "minipipe.schedules" in GRAPH["minipipe.course.widgets"]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles():
    # a package importing its own submodules (``__init__`` re-exports) is not a cycle unless a
    # submodule imports the package back
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_the_course():
    for name, deps in GRAPH.items():
        if name.startswith("minipipe.course") or name in ENTRY:
            continue
        bad = sorted(d for d in deps if d.startswith("minipipe.course"))
        assert not bad, f"{name} (core) imports {bad}"


def test_core_files_and_functions_stay_readable():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        if not name.startswith("minipipe.course") and len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    # one interpreter per module, a few at a time (2-core machines: all at once would thrash)
    from concurrent.futures import ThreadPoolExecutor

    def try_import(name: str) -> tuple[str, int, str]:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
        return name, proc.returncode, proc.stdout

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(try_import, sorted(MODULES)))
    failed = {n: out.strip().splitlines()[-1:] for n, rc, out in results if rc}
    assert not failed, f"modules that fail to import alone: {failed}"
