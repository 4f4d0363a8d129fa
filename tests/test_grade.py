"""The grader cannot be tricked: edited, removed or patched checks fail; rows per part; full text.

One notebook (exercise 1's solution with wrong answers and three tricks planted) is graded once
through ``python -m minipipe grade``; the other tests call the grader's pieces directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from minipipe.course import grade
from minipipe.course.checks import runner
from minipipe.course.checks.manifest import CHECK_CELLS
from minipipe.runtime.launch import PipelineTimeout, WorkerError

ROOT = Path(__file__).resolve().parents[1]
PARTS = {p["part"]: p for p in CHECK_CELLS["01_bubble"]}


def _cell(nb, part: str):
    return next(c for c in nb.cells if c.get("id") == PARTS[part]["id"])


def _define(nb, name: str, body: str) -> None:
    """Replace the learner's function ``name`` by ``body`` (in its own cell)."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and f"def {name}(" in c.source)
    cell.source = body


@pytest.fixture(scope="module")
def tricked(tmp_path_factory):
    """Exercise 1 with three wrong answers, each hidden behind a trick, and 06 intact."""
    folder = tmp_path_factory.mktemp("tricked")
    nb = nbformat.read(ROOT / "solutions" / "01_bubble.ipynb", as_version=4)
    # 1a: wrong answer; the check replaced by a function that prints "passed"
    _define(nb, "bubble_fraction", "def bubble_fraction(p, m):\n    return (p - 1) / m\n")
    _cell(nb, "1a").source = ('def check(fn):\n    print("passed: bubble_fraction")\n\n'
                              "check(bubble_fraction)")
    # 1b: wrong answer; the check wrapped in try/except AssertionError
    _define(nb, "bubble_overhead", "def bubble_overhead(p, m):\n    return (p - 1) / p\n")
    _cell(nb, "1b").source = ("try:\n    " + PARTS["1b"]["call"]
                              + "\nexcept AssertionError:\n    print('passed')")
    # 1d: wrong answer (`<` for `<=`); the check cell intact, but a cell added before it
    # patches the checks module so that the notebook's own check passes
    _define(nb, "micro_batches_for",
            "def micro_batches_for(p, target):\n    m = 1\n"
            "    while not (p - 1) / (m + p - 1) < target:\n        m += 1\n    return m\n")
    k = nb.cells.index(_cell(nb, "1d"))
    nb.cells.insert(k, nbformat.v4.new_code_cell(
        "import minipipe.course.checks as c\nc.check_micro_batches_for = lambda fn: print('passed')"))
    nbformat.write(nb, folder / "01_bubble.ipynb")
    removed = nbformat.read(ROOT / "solutions" / "06_partition.ipynb", as_version=4)
    removed.cells = [c for c in removed.cells if c.get("id") != CHECK_CELLS["06_partition"][0]["id"]]
    nbformat.write(removed, folder / "06_partition.ipynb")
    out = folder / "grade.json"
    code = grade.main([str(folder), "--json", str(out), "--quiet"])
    return code, {(r["notebook"], r["part"]): r for r in json.loads(out.read_text())}


def test_a_check_replaced_by_a_print_fails(tricked):
    code, rows = tricked
    r = rows[("01_bubble.ipynb", "1a")]
    assert code == 1 and not r["passed"] and r["error"] == "EditedCheck"
    assert "The original check failed: bubble_fraction returns (p − 1)/m" in r["message"]
    assert r["cell"] == PARTS["1a"]["index"] + 1  # 1-based, as JupyterLab shows


def test_a_check_wrapped_in_try_except_fails(tricked):
    r = tricked[1][("01_bubble.ipynb", "1b")]
    assert not r["passed"] and r["error"] == "EditedCheck"
    assert "does not change with m" in r["message"]


def test_a_patched_checks_module_does_not_reach_the_grader(tricked):
    r = tricked[1][("01_bubble.ipynb", "1d")]
    assert not r["passed"] and r["error"] == "CheckFailed"  # the cell itself is intact
    assert "one more than needed: here the target is hit exactly" in r["message"]
    assert r["cell"] == PARTS["1d"]["index"] + 2  # a cell was inserted above it


def test_a_removed_check_fails_and_the_check_still_runs(tricked):
    r = tricked[1][("06_partition.ipynb", "6a")]
    assert not r["passed"] and r["error"] == "RemovedCheck" and r["cell"] is None
    assert "The original check passed" in r["message"]


def test_the_table_keeps_every_line_of_the_diagnosis():
    long = ("rank 0 runs 3 forward(s) before its first backward (its warm-up forwards, plus the "
            "first forward of the steady phase if it has one): one too many. Too many and the "
            "rank holds more\n  rank 0: F0 F1 F2 B0\n  rank 1: F0 B0")
    rows = [grade.Result("03_1f1b.ipynb", "x", "3a", "t", False, 1.0, "CheckFailed", long,
                         cell=5, cell_id="cell-04"),
            grade.Result("03_1f1b.ipynb", "x", "3c", "t", True, 2.0, cell=11)]
    text = grade.table(rows)
    assert "one too many" in text and "rank 1: F0 B0" in text
    assert "score: 1/2 parts pass; 0/1 exercises complete" in text


def test_a_hang_or_a_crash_on_ranks_is_the_checks_failure_with_each_ranks_status():
    hung = PipelineTimeout(10, ["step 0: B0 (waiting for rank 1)", "step 0: F1"])
    name, message = runner._outcome(hung)
    assert name == "PipelineTimeout" and "rank 0: step 0: B0 (waiting for rank 1)" in message
    crashed = WorkerError(1, "Traceback ...\nValueError: boom\n", ["F0", "B0"])
    name, message = runner._outcome(crashed)
    assert name == "WorkerError" and "ValueError: boom" in message and "rank 1: B0" in message


def test_checksums_ignore_trailing_space_only():
    call = PARTS["1a"]["call"]
    assert grade.cell_checksum(call + "  \n\n") == PARTS["1a"]["sha256"]
    assert grade.cell_checksum(call + "  # ok") != PARTS["1a"]["sha256"]


def test_an_unknown_notebook_is_reported(tmp_path):
    shutil.copy(ROOT / "solutions" / "01_bubble.ipynb", tmp_path / "99_mine.ipynb")
    (r,) = grade.grade_notebook(tmp_path / "99_mine.ipynb")
    assert not r.passed and r.error == "UnknownExercise"
