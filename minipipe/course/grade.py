"""Grade exercise notebooks: one row per graded part, with the check's full diagnosis.

Usage::

    python -m minipipe grade                       # every notebook in exercises/
    python -m minipipe grade exercises/03_1f1b.ipynb
    python -m minipipe.course.grade solutions/ --json report.json

A notebook is graded in two phases, so that nothing written in it can skip or fake a check:

1. **Integrity.** Every check cell (a cell calling ``checks.check_<name>(...)``) is compared
   with the one ``tools/build_exercises.py`` generated (its sha256, kept in
   :mod:`minipipe.course.checks.manifest`, as nbgrader does for its grade cells). A check cell
   that was edited (a ``try/except`` around it, the check replaced by a ``print``) or removed
   fails its part, whatever the code does.
2. **Fresh checks.** The notebook runs in a fresh plain ``python3`` kernel (nbclient), from its
   own folder, up to its last check cell, with every check cell left out; then the objects the
   checks take (the learner's functions) are pickled by value and the checks run in a *fresh
   process* (:mod:`minipipe.course.checks.runner`) that imported them first.

Each part's row shows ``pass`` or ``FAIL`` and, for a failure, the check's whole message (the
diagnosis is never cut) and where to look: cell numbers are 1-based, as JupyterLab shows them,
with the cell id. A run on real ranks that hangs or crashes inside a check (``PipelineTimeout``,
``WorkerError``) is that check's failure, with each rank's status. The exit status is 0 only if
every part passes. The notebooks on disk are not modified.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Result", "cell_checksum", "grade_notebook", "grade", "table", "main"]


@dataclass
class Result:
    """How one graded part of one notebook fared.

    Attributes:
        notebook: file name. path: as given. part: ``"1a"``, ... title: the part's heading.
        passed: the check cell is intact and its check passed in a fresh process.
        seconds: the check's wall time.
        error: ``CheckFailed``, ``NotImplementedError``, ``EditedCheck``, ``RemovedCheck``,
            ``NameError``, ``PipelineTimeout``, ``WorkerError``, ``Timeout``, ... or ``None``.
        message: the full diagnosis, or ``""``. output: what the check printed.
        cell: 1-based number of the check cell (as JupyterLab shows it), or ``None``.
        cell_id: its cell id. cell_source: its code in the learner's notebook.
    """

    notebook: str
    path: str
    part: str
    title: str
    passed: bool
    seconds: float = 0.0
    error: str | None = None
    message: str = ""
    output: str = ""
    cell: int | None = None
    cell_id: str = ""
    cell_source: str = ""

    @property
    def summary(self) -> str:
        """The diagnosis, whole (every line), or ``""`` for a pass."""
        return "" if self.passed else (self.message.strip() or self.error or "failed")


def cell_checksum(source: str) -> str:
    """sha256 of a cell's source, trailing spaces and surrounding blank lines ignored."""
    text = "\n".join(line.rstrip() for line in source.strip().splitlines())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _where(index: int | None, cell_id: str) -> str:
    return "" if index is None else f"cell {index + 1} (id {cell_id})"


def _locate(nb, part: dict) -> tuple[int | None, str | None]:
    """``(index, problem)`` of a part's check cell: problem ``None``, ``"edited"`` or
    ``"removed"``. A cell whose id changed but whose code is intact counts as intact."""
    code = [(k, c) for k, c in enumerate(nb.cells) if c.cell_type == "code"]
    same = [k for k, c in code if c.get("id") == part["id"]]
    for k in same:
        if cell_checksum(nb.cells[k].source) == part["sha256"]:
            return k, None
    moved = [k for k, c in code if cell_checksum(c.source) == part["sha256"]]
    if moved:
        return moved[0], None
    return (same[0], "edited") if same else (None, "removed")


def _integrity_failure(part: dict, index: int | None, problem: str) -> tuple[str, str]:
    original = part["call"]
    if problem == "edited":
        return "EditedCheck", (
            f"the check cell of part {part['part']} ({_where(index, part['id'])}) is not the "
            f"one the exercise came with: it must be exactly `{original}`. Put it back (copy it "
            "from a fresh exercises/ notebook) and run it; the part fails while it is changed. "
            "(The grader runs the original check anyway: see below.)")
    return "RemovedCheck", (
        f"the check cell of part {part['part']} (id {part['id']}, `{original}`) is missing from "
        "the notebook. Put it back (copy it from a fresh exercises/ notebook); the part fails "
        "while it is missing. (The grader runs the original check anyway: see below.)")


def _first_errors(nb) -> list[tuple[int, str, str]]:
    out = []
    for k, c in enumerate(nb.cells):
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                out.append((k, o.get("ename", "Error"), o.get("evalue", "")))
    return out


def _run_kernel(nb, parts: list[dict], found: list, dump: Path, timeout: float,
                kernel_name: str, folder: Path) -> str:
    """Phase 1: the notebook without its check cells, then the dump cell. Returns ``""`` or why
    the kernel could not finish."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    from .checks.runner import dump_cell

    checks_at = {k for k, _ in found if k is not None} | {k for k, c in enumerate(nb.cells)
                                                          if "checks.check_" in c.source}
    last = max([k for k, _ in found if k is not None] + [p["index"] for p in parts])
    run = nbformat.v4.new_notebook(metadata=nb.metadata)
    for k, c in enumerate(nb.cells[: last + 1]):
        if c.cell_type == "code":
            run.cells.append(nbformat.v4.new_code_cell("pass" if k in checks_at else c.source))
        else:
            run.cells.append(nbformat.v4.new_markdown_cell(c.source))
    names = sorted({n for p in parts for n in p["names"]})
    run.cells.append(nbformat.v4.new_code_cell(dump_cell(names, str(dump))))
    client = NotebookClient(run, timeout=timeout, kernel_name=kernel_name, allow_errors=True,
                            resources={"metadata": {"path": str(folder)}})
    try:
        client.execute()
    except CellTimeoutError:
        running = next((k for k, c in enumerate(run.cells) if not c.get("outputs")
                        and c.cell_type == "code"), None)
        return f"a cell ran longer than {timeout:g} s (near {_where(running, '?')})"
    except DeadKernelError as err:
        return f"the kernel died: {err}"
    for k, c in enumerate(run.cells[:-1]):
        nb.cells[k].outputs = c.get("outputs", [])
    return "" if dump.exists() else "the notebook did not finish"


def _run_checks(parts: list[dict], dump: Path, timeout: float,
                folder: Path) -> tuple[dict[str, dict], str]:
    """Phase 2: every part's check in one fresh process: ``{part: row}`` for the parts it
    reached, and what to say about the others."""
    import cloudpickle

    with open(dump, "rb") as f:
        objects = cloudpickle.loads(f.read())
    job, out = dump.with_suffix(".job"), dump.with_suffix(".jsonl")
    job.write_bytes(cloudpickle.dumps({"objects": objects, "parts": parts}))
    cmd = [sys.executable, "-m", "minipipe.course.checks.runner", str(job), str(out)]
    why = f"the check did not finish within {timeout:g} s"
    try:
        done = subprocess.run(cmd, cwd=folder, timeout=timeout * max(1, len(parts)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        if done.returncode:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-8:]
            why = "the checking process died:" + "".join(f"\n  {t}" for t in tail)
    except subprocess.TimeoutExpired:
        pass
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return {r["part"]: r for r in rows}, why


def grade_notebook(path: str | Path, timeout: float = 300.0,
                   kernel_name: str = "python3") -> list[Result]:
    """Grade one notebook: one :class:`Result` per check cell of its exercise.

    Args:
        path: the ``.ipynb`` file (its name says which exercise it is). timeout: seconds
            allowed per cell and per check. kernel_name: Jupyter kernel for phase 1.
    """
    import nbformat

    from .checks.manifest import CHECK_CELLS

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    parts = CHECK_CELLS.get(path.stem)
    if parts is None:
        return [Result(path.name, str(path), "-", "", False, error="UnknownExercise",
                       message=f"{path.stem} is not one of the exercises: "
                               f"{', '.join(sorted(CHECK_CELLS))}")]
    found = [_locate(nb, p) for p in parts]
    folder = path.parent.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "objects.pkl"
        stopped = _run_kernel(nb, parts, found, dump, timeout, kernel_name, folder)
        rows, why = ({}, "") if stopped else _run_checks(parts, dump, timeout, folder)
    errors = _first_errors(nb)
    results = []
    for part, (index, problem) in zip(parts, found):
        r = Result(path.name, str(path), part["part"], part["title"], False, cell=None,
                   cell_id=part["id"])
        if index is not None:
            r.cell, r.cell_source = index + 1, nb.cells[index].source
        row = rows.get(part["part"])
        if stopped:
            r.error, r.message = "NotebookStopped", f"the notebook could not be run: {stopped}"
        elif row is None:
            r.error, r.message = "Timeout", why
        else:
            r.passed, r.error, r.message = row["passed"], row["error"], row["message"]
            r.output, r.seconds = row["output"], row["seconds"]
            if row["error"] == "NameError":
                before = [e for e in errors if index is None or e[0] < index]
                if before:
                    k, ename, evalue = before[0]
                    r.message += (f". The first error in the notebook: cell {k + 1} (id "
                                  f"{nb.cells[k].get('id', '?')}) raised {ename}: {evalue}")
        if problem is not None:
            error, message = _integrity_failure(part, index, problem)
            ran = "passed" if r.passed else f"failed: {r.message}"
            r.passed, r.error, r.message = False, error, f"{message}\nThe original check {ran}"
        results.append(r)
    return results


def _notebooks(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found += sorted(q for q in p.glob("*.ipynb") if not q.name.startswith("."))
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{given}: not a notebook or a folder of notebooks")
    return found


def grade(paths: list[str], timeout: float = 300.0, kernel_name: str = "python3",
          progress: bool = False) -> list[Result]:
    """Grade every notebook in ``paths`` (files, or folders: their ``*.ipynb`` in name order)."""
    results = []
    for nb in _notebooks(paths):
        if progress:
            print(f"running {nb} ...", flush=True)
        results += grade_notebook(nb, timeout, kernel_name)
    return results


def table(results: list[Result]) -> str:
    """The score table: one row per part, each failure's whole diagnosis under its row."""
    name_w = max([len("exercise")] + [len(Path(r.notebook).stem) for r in results])
    header = f"{'exercise':<{name_w}}  part  result  {'time':>6}  cell  diagnosis"
    lines = [header, "-" * len(header)]
    pad = " " * (name_w + 2 + 6 + 8 + 8 + 6)
    for r in results:
        cell = str(r.cell) if r.cell is not None else "-"
        text = r.summary.splitlines() or [""]
        lines.append(f"{Path(r.notebook).stem:<{name_w}}  {r.part:<4}  "
                     f"{'pass' if r.passed else 'FAIL':<6}  {r.seconds:5.1f}s  {cell:>4}  "
                     f"{(r.error + ': ') if r.error and r.error != 'CheckFailed' else ''}"
                     f"{text[0]}".rstrip())
        lines += [f"{pad}{t}".rstrip() for t in text[1:]]
    passed = sum(r.passed for r in results)
    books = sorted({r.notebook for r in results})
    whole = sum(all(r.passed for r in results if r.notebook == b) for b in books)
    lines.append(f"score: {passed}/{len(results)} parts pass; {whole}/{len(books)} exercises "
                 "complete")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m minipipe grade [paths] [--timeout S] [--json FILE] [--quiet]``."""
    parser = argparse.ArgumentParser(
        prog="minipipe grade",
        description="Grade exercise notebooks: one row per part (exit 0 only if all pass).")
    parser.add_argument("paths", nargs="*", default=["exercises"],
                        help="notebooks or folders of notebooks (default: exercises)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds per cell and per check (300)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (python3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the table (with every diagnosis), no progress")
    args = parser.parse_args(argv)
    try:
        notebooks = _notebooks(args.paths)
    except FileNotFoundError as err:
        print(f"minipipe grade: {err}", file=sys.stderr)
        return 2
    if not notebooks:
        print(f"minipipe grade: no notebooks in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = grade([str(n) for n in notebooks], args.timeout, args.kernel,
                    progress=not args.quiet)
    print(table(results))
    if not args.quiet:
        print(f"graded {len(notebooks)} notebook(s) in {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
