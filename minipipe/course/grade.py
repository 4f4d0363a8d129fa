"""Grade exercise notebooks: run each top to bottom; report a pass or the first failing check.

Usage::

    python -m minipipe grade                       # every notebook in exercises/
    python -m minipipe grade exercises/03_1f1b.ipynb
    python -m minipipe.course.grade solutions/ --json report.json

Each notebook runs in a fresh plain ``python3`` Jupyter kernel (nbclient) from its own folder. A
notebook passes when every cell runs; otherwise its row shows the first failing check's message
(the text of the ``CheckFailed`` error the cell raised), or the error that stopped it. The exit
status is 0 only if every notebook passes. The notebooks on disk are not modified.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Result", "grade_notebook", "grade", "main"]


@dataclass
class Result:
    """How one notebook fared.

    Attributes:
        notebook: file name. path: as given. passed: every cell ran. seconds: wall time.
        error: the failing cell's error name (``CheckFailed``, ``NotImplementedError``,
            ``ImportError``, ``Timeout``, ``DeadKernel``, ...), or ``None``.
        message: what failed (the check's message for ``CheckFailed``), or ``""``.
        cell: index of the failing cell, or ``None``. cell_source: its code.
    """

    notebook: str
    path: str
    passed: bool
    seconds: float
    error: str | None = None
    message: str = ""
    cell: int | None = None
    cell_source: str = ""

    @property
    def summary(self) -> str:
        """One line for the table: the first line of the message."""
        if self.passed:
            return ""
        return (self.message.strip().splitlines() or [self.error or "failed"])[0]


def _error_output(cell) -> dict | None:
    return next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)


def grade_notebook(path: str | Path, timeout: float = 300.0,
                   kernel_name: str = "python3") -> Result:
    """Run one notebook in a fresh kernel and say whether it passed and, if not, why.

    Args:
        path: the ``.ipynb`` file. timeout: seconds allowed per cell. kernel_name: Jupyter kernel.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    current = {"index": None}

    def on_cell_start(cell, cell_index, **_):
        current["index"] = cell_index

    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent.resolve())}},
                            on_cell_start=on_cell_start)
    start = time.perf_counter()

    def result(**kw) -> Result:
        index = current["index"]
        source = nb.cells[index].source if index is not None else ""
        return Result(path.name, str(path), seconds=time.perf_counter() - start, cell=index,
                      cell_source=source, **kw)

    log = tempfile.TemporaryFile()  # the kernel's own stderr: shown only if it dies
    try:
        client.execute(stderr=log)
    except CellExecutionError as err:
        index = next((k for k, c in enumerate(nb.cells) if _error_output(c)), current["index"])
        current["index"] = index
        out = _error_output(nb.cells[index]) if index is not None else None
        ename = (out or {}).get("ename") or getattr(err, "ename", "Error")
        evalue = (out or {}).get("evalue") or getattr(err, "evalue", str(err))
        if ename == "CheckFailed":
            message = evalue
        elif ename == "NotImplementedError":
            message = (f"not implemented yet: {evalue} (raised in cell {index}, before its check "
                       "ran)")
        else:
            message = f"{ename}: {evalue} (cell {index}; not a check: the notebook itself failed)"
        return result(passed=False, error=ename, message=message)
    except CellTimeoutError:
        return result(passed=False, error="Timeout",
                      message=f"cell {current['index']} ran longer than {timeout:g} s")
    except DeadKernelError as err:
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-15:]
        return result(passed=False, error="DeadKernel",
                      message=f"the kernel died: {err}" + "".join(f"\n  {t}" for t in tail))
    finally:
        log.close()
    return Result(path.name, str(path), passed=True, seconds=time.perf_counter() - start)


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
    """Grade every notebook in ``paths``: files, or folders (their ``*.ipynb``, in name order)."""
    results = []
    for nb in _notebooks(paths):
        if progress:
            print(f"running {nb} ...", flush=True)
        results.append(grade_notebook(nb, timeout, kernel_name))
    return results


def table(results: list[Result], width: int = 100) -> str:
    """The score table: one row per notebook, then the score."""
    name_w = max([len("exercise")] + [len(Path(r.notebook).stem) for r in results])
    header = f"{'exercise':<{name_w}}  result  {'time':>6}  first failing check"
    lines = [header, "-" * len(header)]
    for r in results:
        detail = r.summary
        if len(detail) > width:
            detail = detail[: width - 1] + "…"
        lines.append(f"{Path(r.notebook).stem:<{name_w}}  {'pass' if r.passed else 'FAIL':<6}  "
                     f"{r.seconds:5.1f}s  {detail}")
    passed = sum(r.passed for r in results)
    lines.append(f"score: {passed}/{len(results)} exercises pass")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m minipipe grade [paths] [--timeout S] [--json FILE] [--quiet]``."""
    parser = argparse.ArgumentParser(
        prog="minipipe grade",
        description="Run exercise notebooks and print a score table (exit 0 only if all pass).")
    parser.add_argument("paths", nargs="*", default=["exercises"],
                        help="notebooks or folders of notebooks (default: exercises)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per cell (300)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (python3)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the table, not progress or the full failure messages")
    args = parser.parse_args(argv)
    try:
        notebooks = _notebooks(args.paths)
    except FileNotFoundError as err:
        print(f"minipipe grade: {err}", file=sys.stderr)
        return 2
    if not notebooks:
        print(f"minipipe grade: no notebooks in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    results = grade([str(n) for n in notebooks], args.timeout, args.kernel, progress=not args.quiet)
    print(table(results))
    if not args.quiet:
        for r in results:
            if not r.passed:
                print(f"\n{Path(r.notebook).stem} (cell {r.cell}, {r.error}):\n{r.message}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
