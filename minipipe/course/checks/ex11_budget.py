"""Exercise 11: a schedule within a memory budget and a time budget (the search's optimum).

In the style of the LLM-Training-Puzzles: the learner gets ``p``, ``m``, the costs and a
memory budget, and must write a schedule that fits the memory and comes within a stated
margin of the fastest schedule that fits it — which :func:`minipipe.search.solve` finds and
proves. Graded three ways: the validator, the simulated step and memory, and a real run
against single-process training (with the activation bytes measured).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ...schedules import Kind, Schedule, zb_h1, zb_h2
from ...simulate import simulate
from .common import CheckFailed, _label, _orders, _passed, _schedule, _validated
from .ex08_own_schedule import check_schedule_on_ranks

#: the puzzle: sizes, costs (t_b the input-gradient part, t_w the weight part), budgets
BUDGET = {"p": 3, "m": 6, "t_f": 1.0, "t_b": 2.0, "t_w": 1.0, "memory": 4, "margin": 0.02}


@lru_cache(maxsize=8)
def optimum(p: int, m: int, t_f: float, t_b: float, t_w: float, memory: float) -> float:
    """The fastest simulated step under ``memory`` micro-batches per rank (proven by CP-SAT)."""
    from ...search import solve

    res = solve(p, m, t_f, t_b, t_w, memory_limit=memory, time_limit=30)
    if not res.optimal:
        raise RuntimeError("the solver did not prove its optimum in 30 s; rerun on a quieter "
                           "machine")
    return res.step_time


def _step_and_memory(s: Schedule, b: dict[str, Any]):
    tl = simulate(s, b["t_f"], b["t_b"] if s.split_backward else b["t_b"] + b["t_w"],
                  b["t_w"] if s.split_backward else None)
    return tl.step_time, tl.peak_pending_w


def check_budget_schedule(fn: Callable[[], Schedule], run: bool = True, **budget: Any) -> Any:
    """``fn()``: a schedule for the puzzle in :data:`BUDGET` (override any entry by keyword).

    Passes when the schedule validates, holds at most ``memory`` micro-batches of activations
    on every rank (simulated, and measured on real ranks when ``run``), simulates to a step
    within ``margin`` of the optimum under that memory, and trains exactly like one process.

    Returns:
        The :class:`~minipipe.runtime.RunResult` of the real run (``None`` when ``run=False``).
    """
    __tracebackhide__ = True
    b = BUDGET | budget
    label = _label(fn, {})
    s = _schedule(fn, {})
    if (s.p, s.m) != (b["p"], b["m"]):
        raise CheckFailed(f"{label} has p={s.p} ranks and m={s.m} micro-batches; the puzzle asks "
                          f"for p={b['p']}, m={b['m']} (micro-batches 0..{b['m'] - 1} on every rank)")
    _validated(s, label)
    step, held = _step_and_memory(s, b)
    if max(held) > b["memory"]:
        r = held.index(max(held))
        hint = (" That is ZB-H2: its warm-up is too long for this budget."
                if s == zb_h2(b["p"], b["m"]) else "")
        release = "W" if s.split_backward else "B"
        raise CheckFailed(f"{label}: rank {r} holds {held[r]} micro-batches of activations at once "
                          f"(F run, {release} not yet); the budget is {b['memory']}.{hint}\n"
                          + _orders(s))
    best = optimum(b["p"], b["m"], b["t_f"], b["t_b"], b["t_w"], b["memory"])
    limit = best * (1 + b["margin"])
    if step > limit + 1e-9:
        hint = ""
        if s == zb_h1(b["p"], b["m"]):
            hint = (f" That is ZB-H1: it holds only {max(held)} micro-batches; the budget lets "
                    "the early ranks run more forwards before their first B.")
        elif not s.split_backward:
            hint = " Split the backward: with W actions a rank can fill its waits."
        raise CheckFailed(f"{label}: simulated step {step:g} (t_f={b['t_f']:g}, t_b={b['t_b']:g}, "
                          f"t_w={b['t_w']:g}) is over the time budget {limit:g} ({b['margin']:.0%} "
                          f"above the best step that fits {b['memory']} micro-batches).{hint}")
    _passed(f"{label}: step {step:g} within the budget {limit:g}, peak memory {held} <= "
            f"{b['memory']} micro-batches (simulated)")
    if not run:
        return None
    result = check_schedule_on_ranks(s)
    release = Kind.W if s.split_backward else Kind.B
    for r, (measured, per) in enumerate(zip(result.peak_activation_bytes,
                                            result.activation_bytes_per_mb)):
        if measured > b["memory"] * max(per.values()):
            raise CheckFailed(f"on real ranks rank {r} held {measured} bytes of activations, more "
                              f"than {b['memory']} micro-batches ({per} bytes each until "
                              f"{release.value})")
    _passed(f"measured peak activation bytes {result.peak_activation_bytes}: within "
            f"{b['memory']} micro-batches on every rank")
    return result
