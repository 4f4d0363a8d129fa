"""Exercise 10: fix hand-written schedules that hang or train on the wrong data, minimally."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from ...schedules import Action, Schedule
from .common import CheckFailed, _label, _orders, _passed, _schedule, _validated

# The broken schedules of the exercise (the notebook prints the same ones). Each becomes valid
# by moving one action on one rank (a test checks it, and that none is valid as it stands).
BROKEN: dict[str, Schedule] = {
    # rank 1 wants F1 before it sends the gradient rank 0 waits for: a deadlock
    "a": Schedule(["F0 B0 F1 B1 F2 B2", "F0 F1 B0 B1 F2 B2"], name="broken a"),
    # rank 1 sends the gradient of micro-batch 1 before micro-batch 0's: rank 0 receives them
    # in the order sent, so without the validator it uses micro-batch 1's gradient for 0
    "b": Schedule(["F0 F1 F2 F3 B0 B1 B2 B3", "F0 F1 F2 F3 B1 B0 B2 B3"], name="broken b"),
    # rank 0's warm-up is too short for 3 ranks: it waits for B0 that needs its own F1
    "c": Schedule(["F0 B0 F1 F2 F3 B1 B2 B3", "F0 F1 B0 F2 B1 F3 B2 B3",
                   "F0 B0 F1 B1 F2 B2 F3 B3"], name="broken c"),
}
SMALLEST_CHANGE = {"a": 1, "b": 1, "c": 1}  # actions to move (tests/test_exercises.py checks)


def moved_actions(before: Sequence[Action], after: Sequence[Action]) -> int:
    """How many actions must be moved to turn one order into the other: ``len −`` the longest
    common subsequence (the actions that keep their relative order stay put)."""
    n = len(after)
    prev = [0] * (n + 1)
    for a in before:
        cur = [0] * (n + 1)
        for j, b in enumerate(after):
            cur[j + 1] = prev[j] + 1 if a == b else max(prev[j + 1], cur[j])
        prev = cur
    return len(before) - prev[n]


def check_fix(fn: Callable[[], Schedule], which: str, run: bool = True) -> Any:
    """``fn()``: the broken schedule ``which`` (``"a"``, ``"b"``, ``"c"``), fixed by the smallest
    change: the same actions on every rank, moved as few as possible, so that the validator and
    its dry run accept it; then trained on real ranks against single-process training.

    Returns:
        The :class:`~minipipe.runtime.RunResult` of the real run (``None`` with ``run=False``).
    """
    __tracebackhide__ = True
    from .ex08_own_schedule import check_schedule_on_ranks

    broken = BROKEN[which]
    label = _label(fn, {})
    s = _schedule(fn, {})
    if s.p != broken.p or s.m != broken.m or s.v != broken.v:
        raise CheckFailed(f"{label} has p={s.p}, m={s.m}, v={s.v}; the broken schedule "
                          f"{which!r} has p={broken.p}, m={broken.m}, v={broken.v}: fix its "
                          "order, do not change its shape")
    for r, (mine, theirs) in enumerate(zip(s.ranks, broken.ranks)):
        extra, lost = Counter(mine) - Counter(theirs), Counter(theirs) - Counter(mine)
        if extra or lost:
            what = "; ".join(
                [f"adds {' '.join(map(str, sorted(extra.elements(), key=str)))}"] * bool(extra)
                + [f"drops {' '.join(map(str, sorted(lost.elements(), key=str)))}"] * bool(lost))
            raise CheckFailed(f"{label}: rank {r} {what}. The bug is in the order: every rank "
                              "must still run each of its actions once; move actions, do not "
                              "add or remove them.\n" + _orders(s))
    _validated(s, label, "Read the message: which rank waits, for what, and who should send it?")
    moved = sum(moved_actions(a, b) for a, b in zip(broken.ranks, s.ranks))
    if moved > SMALLEST_CHANGE[which]:
        ranks = [r for r, (a, b) in enumerate(zip(broken.ranks, s.ranks)) if a != b]
        raise CheckFailed(
            f"{label} is valid, but it moves {moved} actions (on rank(s) "
            f"{', '.join(map(str, ranks))}), and moving {SMALLEST_CHANGE[which]} is enough. A "
            "fix in a real code base should be the smallest change that removes the cause: "
            "find the one action that is out of place (the validator's message names the rank "
            "that waits and what it waits for).\n" + _orders(s))
    if not run:
        _passed(f"schedule {which!r} fixed by moving {moved} action(s); validator and dry run "
                "accept it")
        return None
    result = check_schedule_on_ranks(s, steps=1)
    _passed(f"schedule {which!r} fixed by moving {moved} action(s): it validates, and on "
            f"{s.p} real ranks it trains exactly like a single process")
    return result
