"""Exercise 1: the two bubble figures and the micro-batches a target bubble needs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from fractions import Fraction

from .common import (
    CheckFailed,
    _call,
    _close,
    _label,
    _number,
    _passed,
)

_BUBBLE_CASES = [(4, 16), (2, 4), (8, 8), (8, 2), (16, 64), (5, 7), (3, 1), (1, 5)]


def _bubble_values(fn: Callable) -> dict[tuple[int, int], float]:
    __tracebackhide__ = True
    got = {}
    for p, m in _BUBBLE_CASES:
        args = {"p": p, "m": m}
        got[(p, m)] = _number(_call(fn, args), _label(fn, args))
    return got


def _bubble_check(fn: Callable, want: Callable[[int, int], Fraction],
                  slips: list[tuple[Callable[[int, int], float], str]], name: str) -> None:
    __tracebackhide__ = True
    got = _bubble_values(fn)
    if all(_close(got[c], float(want(*c))) for c in got):
        return
    for formula, why in slips:  # a known wrong formula, recognised on every case
        if all(_close(got[c], formula(*c)) for c in got):
            raise CheckFailed(why)
    if all(_close(got[c], 100 * float(want(*c))) for c in got):
        raise CheckFailed(f"{name} returns a percentage (e.g. {got[(4, 16)]:.4g} for p=4, m=16); "
                          "return a fraction instead (0.5 for half), and format it as a "
                          "percentage only when you print it")
    for (p, m), value in got.items():
        label = f"{getattr(fn, '__name__', name)}(p={p}, m={m})"
        expected = float(want(p, m))
        if _close(value, expected):
            continue
        if value == 0 and expected > 0:
            raise CheckFailed(f"{label} returned 0, yet a {p}-stage pipeline does wait. Integer "
                              "division (`//`) rounds the fraction down to 0: use `/`")
        if p == 1:
            raise CheckFailed(f"{label} returned {value:.6g}: with a single stage nothing ever "
                              "waits for another stage, so there is no bubble")
        raise CheckFailed(
            f"{label} returned {value:.6g}, which is not {name}'s figure for that case. Draw the "
            f"GPipe timeline for p={p}, m={m} in slots of (t_f + t_b): how many slots does the "
            "step last, how many of them is one stage busy, and how many idle? Then check which "
            "two of those numbers this function divides.")


def check_bubble_fraction(fn: Callable[[int, int], float]) -> None:
    """``fn(p, m)``: GPipe's bubble as a fraction of the step (idle / step time), equal stages."""
    __tracebackhide__ = True
    _bubble_check(fn, lambda p, m: Fraction(p - 1, m + p - 1), [
        (lambda p, m: (p - 1) / m,
         "bubble_fraction returns (p − 1)/m: that is the overhead relative to useful work (idle "
         "time ÷ busy time, Megatron-LM's 'bubble time fraction'), the other bubble figure. This "
         "function asks for the share of the whole step a stage waits, idle time ÷ step time, "
         "what a stopwatch measures. How many (t_f + t_b) slots long is a GPipe step?"),
        (lambda p, m: (p - 1) / p,
         "bubble_fraction does not change with m: you return (p − 1)/p, the '(4 − 1)/4' slip "
         "some write-ups make. More micro-batches shrink the bubble: which term of your "
         "formula should depend on m?"),
        (lambda p, m: m / (m + p - 1),
         "bubble_fraction returns the busy share of the step (utilization), 1 minus the bubble. "
         "The bubble is the idle share."),
    ], "bubble_fraction")
    _passed("bubble_fraction matches GPipe's idle share of the step on "
            f"{len(_BUBBLE_CASES)} cases (p=4, m=16: {3 / 19:.2%})")


def check_bubble_overhead(fn: Callable[[int, int], float]) -> None:
    """``fn(p, m)``: GPipe's bubble relative to useful work (idle / busy), equal stages."""
    __tracebackhide__ = True
    _bubble_check(fn, lambda p, m: Fraction(p - 1, m), [
        (lambda p, m: (p - 1) / (m + p - 1),
         "bubble_overhead returns (p − 1)/(m + p − 1): that is the share of the step a stage "
         "waits (idle ÷ step time), the other bubble figure. This one compares the idle time "
         "with the useful work (idle ÷ busy), so it can exceed 1: for p=8, m=2 a stage waits "
         "longer than it computes."),
        (lambda p, m: (p - 1) / p,
         "bubble_overhead does not change with m: you return (p − 1)/p, the '(4 − 1)/4 = 18.75%' "
         "slip of some write-ups (18.75% is 3/16, for m = 16). Which term should be m?"),
        (lambda p, m: min(1.0, (p - 1) / m),
         "bubble_overhead is capped at 1: idle ÷ busy is not a share of anything and can exceed "
         "1 (p=8, m=2: a stage idles longer than it works). Remove the cap."),
    ], "bubble_overhead")
    _passed("bubble_overhead matches idle ÷ busy for GPipe on "
            f"{len(_BUBBLE_CASES)} cases (p=4, m=16: {3 / 16:.2%})")


_MB_CASES = [(4, 0.07), (8, 0.3), (2, 0.15), (16, 0.11), (4, 0.9), (1, 0.01)]


def smallest_m(p: int, target: float) -> int:
    """Reference answer for :func:`check_micro_batches_for` (a loop: exact, no rounding)."""
    m = 1
    while (p - 1) / (m + p - 1) > target:
        m += 1
    return m


def check_micro_batches_for(fn: Callable[[int, float], int]) -> None:
    """``fn(p, target)``: the smallest m whose GPipe bubble fraction of the step is <= target."""
    __tracebackhide__ = True
    for p, target in _MB_CASES:
        args = {"p": p, "target": target}
        label = _label(fn, args)
        got = _call(fn, args)
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            raise CheckFailed(f"{label} returned {got!r}: return a whole number of micro-batches "
                              "(an int; round up with math.ceil if you solve for m)")
        got = int(got)
        if got < 1:
            raise CheckFailed(f"{label} returned {got}: a step has at least one micro-batch")
        frac = (p - 1) / (got + p - 1)
        if frac > target:
            raise CheckFailed(f"{label} returned m={got}, but then the bubble is {frac:.2%} of the "
                              f"step, above the target {target:.0%}: too few micro-batches")
        if got > 1 and (p - 1) / (got - 1 + p - 1) <= target:
            if got == math.ceil((p - 1) / target):
                raise CheckFailed(
                    f"{label} returned m={got}: that is where the overhead (p − 1)/m drops under "
                    f"{target:.0%}. The target is on the fraction of the step, (idle ÷ step "
                    "time), which is smaller for the same m: fewer micro-batches are enough.")
            raise CheckFailed(f"{label} returned m={got}: it meets the target, but a smaller m "
                              "does too. Return the smallest.")
    _passed(f"micro_batches_for gives the smallest m on {len(_MB_CASES)} cases")


