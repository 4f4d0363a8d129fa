"""Exercise 1: the two bubble figures and the micro-batches a target bubble needs."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from fractions import Fraction

from .common import (
    CheckFailed,
    _call,
    _close,
    _integer,
    _label,
    _number,
    _passed,
)

_FIXED_BUBBLE_CASES = [(4, 16), (2, 4), (8, 8), (8, 2), (16, 64), (5, 7), (3, 1), (1, 5), (1, 1),
                       (2, 1), (64, 3), (7, 300)]


def _random_bubble_cases(n: int = 40) -> list[tuple[int, int]]:
    rng = random.Random(101)
    return [(rng.randint(1, 64), rng.randint(1, 512)) for _ in range(n)]


_BUBBLE_CASES = _FIXED_BUBBLE_CASES + _random_bubble_cases()


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


def smallest_m(p: int, target: float) -> int:
    """Reference answer for :func:`check_micro_batches_for`, in exact rational arithmetic.

    The smallest ``m >= 1`` with ``(p − 1)/(m + p − 1) <= target``, ``target`` taken as the exact
    value of the float given: ``m >= (p − 1)(1 − target)/target``.
    """
    t = Fraction(target)
    if p == 1 or t >= 1:
        return 1
    return max(1, math.ceil(Fraction(p - 1) * (1 - t) / t))


def _agree(p: int, target: float) -> bool:
    """True when float arithmetic and exact arithmetic agree on the answer for this case, for
    the two usual correct methods (a loop comparing floats, and the float closed form); cases
    where float rounding alone would decide are left out."""
    m = 1
    while (p - 1) / (m + p - 1) > target:
        m += 1
    closed = max(1, math.ceil((p - 1) / target - (p - 1)))
    return m == closed == smallest_m(p, target)


def _boundary_cases() -> list[tuple[int, float]]:
    """Targets hit exactly by some m: a strict ``<`` or ``int(x) + 1`` as a ceiling is off by
    one on each of these."""
    cases = []
    for p, m in [(2, 3), (5, 16), (2, 9), (3, 6), (4, 12), (9, 24), (2, 1), (5, 4), (11, 30),
                 (3, 2), (17, 48), (2, 19), (6, 45), (9, 56), (4, 1)]:
        target = (p - 1) / (m + p - 1)
        if _agree(p, target) and smallest_m(p, target) == m:
            cases.append((p, target))
    return cases


def _random_mb_cases(n: int = 60) -> list[tuple[int, float]]:
    rng = random.Random(7)
    cases: list[tuple[int, float]] = []
    while len(cases) < n:
        p = rng.randint(1, 64)
        if rng.random() < 0.5:  # an exact hit of a random m
            m = rng.randint(1, 400)
            target = (p - 1) / (m + p - 1) if p > 1 else rng.choice([0.5, 0.01])
        else:
            target = round(rng.uniform(0.005, 0.95), rng.randint(2, 4))
        if _agree(p, target):
            cases.append((p, target))
    return cases


_MB_CASES = [(4, 0.07), (8, 0.3), (2, 0.15), (16, 0.11), (4, 0.9), (1, 0.01)]
_ALL_MB_CASES = _MB_CASES + _boundary_cases() + _random_mb_cases()


def check_micro_batches_for(fn: Callable[[int, float], int]) -> None:
    """``fn(p, target)``: the smallest m whose GPipe bubble fraction of the step is <= target.

    Checked on hand-picked cases, on targets that some m hits exactly (the bubble equals the
    target: that m counts), and on a random sweep, against the exact rational answer. The answer
    must be an int (a Python or numpy int, or a one-element integer tensor), not a float.
    """
    __tracebackhide__ = True
    for p, target in _ALL_MB_CASES:
        args = {"p": p, "target": target}
        label = _label(fn, args)
        got = _integer(_call(fn, args), label,
                       "a whole number of micro-batches; math.ceil returns an int, numpy's "
                       "ceil a float: wrap it in int()")
        if got < 1:
            raise CheckFailed(f"{label} returned {got}: a step has at least one micro-batch")
        want = smallest_m(p, target)
        if got == want:
            continue
        exact = (p - 1) / (want + p - 1) == target  # the target is hit (as a float)
        frac = (p - 1) / (got + p - 1)
        if got < want:
            raise CheckFailed(f"{label} returned m={got}, but then the bubble is {frac:.4%} of "
                              f"the step, above the target {target:.4%}: too few micro-batches "
                              "(rounding down where a ceiling is needed?)")
        if exact and got == want + 1:
            raise CheckFailed(
                f"{label} returned m={got}, one more than needed: here the target is hit exactly "
                "(one m gives a bubble equal to the target), and 'at most target' includes "
                "equality. A strict `<` where `<=` is meant, or `int(x) + 1` used as a ceiling "
                "(it adds one when x is already whole), gives one too many exactly there.")
        if p > 1 and got == max(1, math.ceil(Fraction(p - 1) / Fraction(target))):
            raise CheckFailed(
                f"{label} returned m={got}: that is where the overhead (p − 1)/m drops under "
                f"{target:.4%}. The target is on the fraction of the step, (idle ÷ step "
                "time), which is smaller for the same m: fewer micro-batches are enough.")
        raise CheckFailed(f"{label} returned m={got}: it meets the target, but a smaller m "
                          "does too. Return the smallest.")
    _passed(f"micro_batches_for gives the smallest m on {len(_ALL_MB_CASES)} cases (targets hit "
            "exactly and a random sweep included, against exact fractions)")
