"""The grader's second phase: run the checks, in a fresh process, on the learner's objects.

``python -m minipipe grade`` first runs a learner's notebook in a Jupyter kernel, with every
check cell left out, and pickles (cloudpickle, by value) the objects the checks take: the
learner's functions. This module, started as ``python -m minipipe.course.checks.runner IN OUT``
in a fresh interpreter, imports the checks *before* it loads any of those objects, then calls
each part's check, exactly as the generated check cell does, and writes one JSON line per part
to ``OUT`` as soon as it is known. Nothing the notebook did (a patched ``checks`` module, a
check cell replaced by a ``print``, a ``try/except`` around it) reaches this process.

What it cannot stop: a learner's function that, when the check calls it, sets out on purpose to
subvert the checker from inside. The checks are for learning; see docs/instructor.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any

__all__ = ["dump_cell", "run"]


def dump_cell(names: list[str], path: str) -> str:
    """The code the grader appends to the learner's notebook: pickle ``names`` into ``path``."""
    return (
        "def __minipipe_grader_dump(names, path):\n"
        "    import cloudpickle\n"
        "    found = {}\n"
        "    for name in names:\n"
        "        if name not in globals():\n"
        "            found[name] = ('missing', b'')\n"
        "            continue\n"
        "        try:\n"
        "            found[name] = ('ok', cloudpickle.dumps(globals()[name]))\n"
        "        except Exception as err:\n"
        "            found[name] = ('unpicklable', f'{type(err).__name__}: {err}'.encode())\n"
        "    with open(path, 'wb') as f:\n"
        "        f.write(cloudpickle.dumps(found))\n"
        f"__minipipe_grader_dump({names!r}, {path!r})\n"
    )


def _outcome(err: BaseException) -> tuple[str, str]:
    """``(error name, full message)`` for an exception a check raised."""
    from ...runtime.launch import PipelineTimeout, WorkerError
    from .common import CheckFailed

    name = type(err).__name__
    if isinstance(err, CheckFailed):
        message = str(err)
        cause = err.__cause__
        if cause is not None:
            lines = traceback.format_exception(cause)
            message += "\nyour function's error:\n" + "".join(lines[-6:]).rstrip()
        return "CheckFailed", message
    if isinstance(err, NotImplementedError):
        return name, (f"not implemented yet: {err} (raised while the check's arguments were "
                      "built: write the function the message names)")
    if isinstance(err, (PipelineTimeout, WorkerError)):
        return name, f"the check's run on real ranks failed: {err}"
    tail = "".join(traceback.format_exception(err)[-6:]).rstrip()
    return name, f"{name}: {err}\n{tail}"


def _load(objects: dict[str, tuple[str, bytes]]) -> tuple[dict[str, Any], dict[str, str]]:
    import cloudpickle

    loaded, problems = {}, {}
    for name, (status, blob) in objects.items():
        if status == "ok":
            try:
                loaded[name] = cloudpickle.loads(blob)
            except Exception as err:  # noqa: BLE001 - reported as that part's failure
                problems[name] = f"could not be loaded in a fresh process ({err})"
        elif status == "missing":
            problems[name] = "is not defined when the notebook has run"
        else:
            problems[name] = f"could not be pickled ({blob.decode(errors='replace')})"
    return loaded, problems


def run(inp: str, out: str) -> None:
    """Run every part listed in the pickle ``inp``; append one JSON line per part to ``out``."""
    import cloudpickle

    from .. import checks as module  # the checks first, before any learner object is loaded

    checks = SimpleNamespace(**{n: getattr(module, n) for n in module.__all__})
    with open(inp, "rb") as f:
        job = cloudpickle.loads(f.read())
    loaded, problems = _load(job["objects"])
    for part in job["parts"]:
        start, printed = time.perf_counter(), io.StringIO()
        missing = [n for n in part["names"] if n in problems]
        row: dict[str, Any] = {"part": part["part"], "passed": False}
        if missing:
            row.update(error="NameError", message="; ".join(f"{n} {problems[n]}" for n in missing))
        else:
            try:
                with contextlib.redirect_stdout(printed):
                    eval(part["call"], {"checks": checks, **loaded})  # noqa: S307 - our call
                row.update(passed=True, error=None, message="")
            except BaseException as err:  # noqa: BLE001 - every failure is the part's result
                row["error"], row["message"] = _outcome(err)
        row.update(output=printed.getvalue(), seconds=time.perf_counter() - start)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
