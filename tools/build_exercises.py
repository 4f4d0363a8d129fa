"""Build ``exercises/*.ipynb`` and ``solutions/*.ipynb`` from one annotated source per exercise.

Each ``exercises_src/NN_name.py`` is a notebook in the "percent" format: ``# %%`` starts a code
cell, ``# %% [markdown]`` a markdown cell whose lines are written as ``# text``. Inside a code
cell, the learner's part sits between two markers (nbgrader's)::

    def bubble_fraction(p, m):
        ### BEGIN SOLUTION Exercise 1: write the bubble fraction
        return (p - 1) / (m + p - 1)
        ### END SOLUTION

The solution notebook keeps the code and drops the marker lines; the exercise notebook replaces
the region with a stub at the marker's indentation, whose message is the text after
``BEGIN SOLUTION``::

        # YOUR CODE HERE
        raise NotImplementedError("Exercise 1: write the bubble fraction")

Both notebooks are written without outputs, with fixed cell ids, so the same source always gives
the same bytes (``tests/test_exercises.py`` checks the committed files against this builder).

A code cell that calls ``checks.check_<name>(...)`` is a *check cell*: one graded part of the
exercise, named by the ``## 1a. Title`` heading above it. The builder also writes
``minipipe/course/checks/manifest.py``: for every check cell its id, a checksum of its source
and the call, which the grader (``python -m minipipe grade``) uses to spot an edited or removed
check cell and to run the check itself, in a fresh process, on the learner's functions.

Usage::

    python tools/build_exercises.py           # write exercises/ and solutions/
    python tools/build_exercises.py --check   # exit 1 if the committed notebooks are stale
"""

from __future__ import annotations

import argparse
import ast
import json
import pprint
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minipipe.course.grade import cell_checksum  # noqa: E402 - the grader's own test

BEGIN = re.compile(r"^(?P<indent>\s*)### BEGIN SOLUTION(?P<message>.*)$")
END = re.compile(r"^\s*### END SOLUTION\s*$")
CELL = re.compile(r"^# %%(?P<markdown>\s*\[markdown\])?\s*$")
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
HEADING = re.compile(r"^##\s+(?P<part>\w+)\.\s*(?P<title>.*)$", re.M)
MANIFEST = "minipipe/course/checks/manifest.py"


def parse(text: str) -> list[tuple[str, str]]:
    """``[(cell_type, source), ...]`` from a percent-format source (lines before the first cell are
    a header for maintainers and are dropped)."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = CELL.match(line)
        if match:
            cells.append(("markdown" if match["markdown"] else "code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        source = "\n".join(lines).strip("\n")
        if source.strip():
            out.append((kind, source))
    return out


def render_code(source: str, solution: bool, where: str = "") -> str:
    """The code of one cell, as the solution or as the exercise (regions replaced by stubs)."""
    lines, out = source.split("\n"), []
    k = 0
    while k < len(lines):
        begin = BEGIN.match(lines[k])
        if END.match(lines[k]):
            raise ValueError(f"{where}: '### END SOLUTION' without a BEGIN")
        if not begin:
            out.append(lines[k])
            k += 1
            continue
        end = next((j for j in range(k + 1, len(lines)) if END.match(lines[j])), None)
        if end is None:
            raise ValueError(f"{where}: '### BEGIN SOLUTION' without an END")
        message = begin["message"].strip()
        if not message:
            raise ValueError(f"{where}: write the stub's message after '### BEGIN SOLUTION'")
        if solution:
            out.extend(lines[k + 1:end])
        else:
            indent = begin["indent"]
            stub = f"raise NotImplementedError({json.dumps(message, ensure_ascii=False)})"
            out += [f"{indent}# YOUR CODE HERE", indent + stub]
        k = end + 1
    return "\n".join(out)


def notebook(cells: list[tuple[str, str]], solution: bool, name: str) -> nbformat.NotebookNode:
    """One notebook, without outputs, with deterministic cell ids."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNEL, "language_info": {"name": "python"}}
    for k, (kind, source) in enumerate(cells):
        cell_id = f"cell-{k:02d}"
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source, id=cell_id))
        else:
            code = render_code(source, solution, f"{name}, cell {k}")
            nb.cells.append(nbformat.v4.new_code_cell(code, id=cell_id))
    return nb


def _check_call(source: str, where: str) -> tuple[str, list[str]] | None:
    """The ``checks.check_<name>(...)`` call of a cell and the names it uses, or ``None``."""
    calls = [node for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "checks"
             and node.func.attr.startswith("check_")]
    if not calls:
        return None
    if len(calls) > 1:
        raise ValueError(f"{where}: one check call per cell (each is one graded part)")
    call = calls[0]
    names = sorted({n.id for arg in [*call.args, *(k.value for k in call.keywords)]
                    for n in ast.walk(arg) if isinstance(n, ast.Name)})
    return ast.unparse(call), names


def check_cells(cells: list[tuple[str, str]], name: str) -> list[dict]:
    """The graded parts of one exercise: each check cell's id, checksum, call and part name."""
    parts, heading = [], None
    for k, (kind, source) in enumerate(cells):
        if kind == "markdown":
            heading = HEADING.search(source) or heading
            continue
        found = _check_call(render_code(source, False, name), f"{name}, cell {k}")
        if found is None:
            continue
        if heading is None:
            raise ValueError(f"{name}, cell {k}: a check cell needs a '## 1a. Title' heading above")
        code = render_code(source, False, name)
        if code != render_code(source, True, name):
            raise ValueError(f"{name}, cell {k}: a check cell holds no solution region")
        parts.append({"id": f"cell-{k:02d}", "index": k, "sha256": cell_checksum(code),
                      "part": heading["part"], "title": heading["title"].strip(),
                      "call": found[0], "names": found[1]})
    if len({p["part"] for p in parts}) != len(parts):
        raise ValueError(f"{name}: two check cells under one '## <part>.' heading")
    return parts


def manifest_source(parts: dict[str, list[dict]]) -> str:
    """The text of ``minipipe/course/checks/manifest.py``."""
    body = pprint.pformat(parts, width=100, sort_dicts=True)
    return ('"""Generated by tools/build_exercises.py from exercises_src/: do not edit.\n\n'
            "For each exercise notebook, its check cells (one graded part each): cell id and "
            "index,\nsha256 of the source (``minipipe.course.grade.cell_checksum``), the check call and "
            'the names it uses.\n"""\n\n'
            f"CHECK_CELLS = {body}\n")


def build(src_dir: Path = ROOT / "exercises_src") -> dict[str, str]:
    """``{"exercises/NN_name.ipynb": text, "solutions/NN_name.ipynb": text, ...,
    MANIFEST: text}``."""
    built, parts = {}, {}
    for src in sorted(Path(src_dir).glob("[0-9][0-9]_*.py")):
        cells = parse(src.read_text(encoding="utf-8"))
        for folder, solution in (("exercises", False), ("solutions", True)):
            nb = notebook(cells, solution, src.name)
            nbformat.validate(nb)
            built[f"{folder}/{src.stem}.ipynb"] = nbformat.writes(nb) + "\n"
        parts[src.stem] = check_cells(cells, src.name)
    built[MANIFEST] = manifest_source(parts)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if a committed notebook differs from its source")
    args = parser.parse_args(argv)
    built = build()
    stale = [rel for rel, text in built.items()
             if not (ROOT / rel).exists() or (ROOT / rel).read_text(encoding="utf-8") != text]
    if args.check:
        for rel in stale:
            print(f"stale: {rel}")
        return 1 if stale else 0
    for rel in stale:
        (ROOT / rel).parent.mkdir(exist_ok=True)
        (ROOT / rel).write_text(built[rel], encoding="utf-8")
        print(f"wrote {rel}")
    print(f"{len(built)} notebooks, {len(stale)} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
