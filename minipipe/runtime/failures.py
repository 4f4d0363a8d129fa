"""Why a run failed, named from the caller's side: which rank is the cause, and how it ended.

When one rank fails its peers fail a moment later ("connection closed by peer", or a timeout
while they wait for it), and their reports can reach the caller first. :func:`primary_cause`
picks the cause: a rank that ended without a result (named with its exit code or signal), then
the first error reported that is not such a consequence; a rank found stopped (SIGSTOP) or
stuck running one action is named ahead of the peers that gave up waiting for it.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["WorkerError", "PipelineTimeout", "MainGuardError", "primary_cause", "stuck_rank",
           "death"]

# what a rank says when a peer went away or gave up first: a consequence, not the cause
SECONDARY = (b"closed by peer", b"reset by peer", b"Broken pipe", b"Connection closed")
GUARD = ('the script that calls train() or launch() has no `if __name__ == "__main__":` guard: '
         'each rank starts by importing the script again, and without the guard that import '
         'starts the training once more. Put the training code under that line')


class WorkerError(RuntimeError):
    """A rank failed; ``rank`` says which, ``worker_traceback`` where (or how it died).

    ``exitcode``: the dead rank's exit status (negative: killed by that signal), when it died
    without a result; ``cause``: one line naming the rank when it was found frozen or stuck.
    """

    def __init__(self, rank: int, worker_traceback: str, status: list[str] | None = None,
                 exitcode: int | None = None, cause: str = "") -> None:
        self.rank, self.worker_traceback, self.status = rank, worker_traceback, status or []
        self.exitcode, self.cause = exitcode, cause
        board = "".join(f"\n  rank {r}: {s}" for r, s in enumerate(self.status))
        if cause:
            head = f"{cause}\nthe rank that gave up waiting reported:\n"
        elif worker_traceback.startswith("Traceback"):
            head = f"rank {rank} failed; its traceback:\n"
        else:
            head = ""
        super().__init__(head + worker_traceback.rstrip()
                         + (f"\nwhat each rank was doing:{board}" if board else ""))


class PipelineTimeout(RuntimeError):
    """The run took longer than its timeout; ``status`` holds each rank's last action and
    ``stuck`` the rank found frozen or stuck in one action (None if every rank was waiting)."""

    def __init__(self, timeout: float, status: list[str],
                 stuck: tuple[int, str] | None = None) -> None:
        self.status, self.stuck = status, stuck[0] if stuck else None
        board = "".join(f"\n  rank {r}: {s}" for r, s in enumerate(status))
        why = stuck[1] if stuck else ("the pipeline is probably hung (a receive whose send "
                                      "never comes)")
        super().__init__(f"no result after {timeout:.0f} s: {why}. What each rank was doing "
                         f"when it was stopped:{board}")


class MainGuardError(RuntimeError):
    """The calling script has no ``if __name__ == "__main__":`` guard (found at rank start-up)."""


def _proc_state(pid: int | None) -> str:
    """One-letter state of a process from /proc (``T``: stopped); empty where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def stuck_rank(pids: list[int | None], status: list[str]) -> tuple[int, str] | None:
    """The rank the others wait on: stopped (SIGSTOP, a debugger), or the only one still
    running an action while the others wait. Returns ``(rank, one line)`` or None."""
    for rank, pid in enumerate(pids):
        if _proc_state(pid) in ("T", "t"):
            return rank, (f"rank {rank} is stopped (SIGSTOP or a debugger) at '{status[rank]}' "
                          f"and the other ranks wait on it: resume it (kill -CONT {pid}) or "
                          "kill it")
    running = [r for r, s in enumerate(status) if ": running " in s]
    if len(running) == 1 and any("waiting" in s for s in status):
        r = running[0]
        return r, (f"rank {r} is stuck running one action ('{status[r]}') while the others "
                   "wait on it: an endless loop or a very slow computation in that stage, or a "
                   "frozen process")
    return None


def death(rank: int, code: int) -> str:
    """One line for a rank that ended without a result, from its exit status."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = {"SIGKILL": "killed from outside, or by the out-of-memory killer",
               "SIGSEGV": "a crash in native code", "SIGBUS": "a crash in native code",
               "SIGABRT": "aborted in native code"}.get(name, "killed by a signal")
        return f"rank {rank} died from {name} ({why}) without returning a result"
    how = "os._exit(0), or an exit from native code" if code == 0 else \
        "os._exit, or a crash in native code"
    return f"rank {rank} exited with status {code} without returning a result ({how})"


def primary_cause(procs: list[Any], out: dict, errors: list, status: list[str],
                  unguarded: bool) -> Exception | None:
    """The primary cause, in this order: a script without a main guard; a rank that ended
    without a result (its exit code or signal), since its peers' errors ("connection closed by
    peer") only follow from it; then the first error reported, passing over consequences — a
    peer that lost its connection, or one that timed out waiting for a frozen or stuck rank."""
    if unguarded:
        return MainGuardError(GUARD)
    reported = {rank for _, rank, _ in errors}
    for rank, proc in enumerate(procs):
        if rank not in out and rank not in reported and proc.exitcode is not None:
            return WorkerError(rank, death(rank, proc.exitcode), status, exitcode=proc.exitcode)
    if not errors:
        return None
    when, rank, data = min(errors, key=lambda e: (any(s in e[2] for s in SECONDARY), e[0]))
    stuck = stuck_rank([p.pid for p in procs], status)
    gave_up = any(s in data for s in (*SECONDARY, b"imed out", b"imeout"))
    if stuck is not None and gave_up and stuck[0] != rank and stuck[0] not in reported:
        return WorkerError(stuck[0], data.decode(), status, cause=stuck[1])
    return WorkerError(rank, data.decode(), status)
