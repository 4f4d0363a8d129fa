"""Committed notebooks are clean: valid nbformat, no outputs, and lessons end with the checkpoint.

Outputs and execution counts are left out of the repository (they are machine-specific and
make diffs unreadable); every lesson and solution notebook ends with a call to
``minipipe.course.report.verification_checkpoint`` so a learner's run closes with the table of what
their machine measured.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("notebooks", "exercises", "solutions")
NEEDS_CHECKPOINT = ("notebooks", "solutions")
NOTEBOOKS = sorted(p for folder in FOLDERS for p in (ROOT / folder).glob("**/*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts)


def _folder(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _python(source: str) -> str:
    """Cell source without IPython magics and shell escapes, so ``ast`` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def _calls(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(_python(source))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else getattr(f, "attr", ""))
    return names


def test_the_course_has_lesson_notebooks():
    assert any(_folder(p) == "notebooks" for p in NOTEBOOKS), "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_notebook_is_valid_nbformat(path: Path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_id)
def test_notebook_has_no_outputs_or_execution_counts(path: Path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{_id(path)}: cells {dirty} carry outputs or execution counts; clear them "
                       "with `jupyter nbconvert --clear-output --inplace`")


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if _folder(p) in NEEDS_CHECKPOINT], ids=_id)
def test_notebook_ends_with_verification_checkpoint(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]
    assert code, f"{_id(path)} has no code cells"
    assert "verification_checkpoint" in _calls(code[-1].source), (
        f"{_id(path)}: the last code cell must call minipipe.course.report.verification_checkpoint(...)")
