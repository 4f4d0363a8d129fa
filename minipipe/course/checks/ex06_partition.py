"""Exercise 6: the balanced partitioner (minimise the slowest stage)."""

from __future__ import annotations

import itertools
import numbers
import random
from collections.abc import Callable, Sequence

import torch

from .common import (
    CheckFailed,
    _call,
    _label,
    _passed,
)

_PARTITION_CASES: list[tuple[list[float], int]] = [
    ([1, 1, 9, 1, 7], 2),  # greedy "fill up to the average" gives 17, best is 11
    ([5, 2, 8, 8], 2),
    ([1, 9, 4, 8], 3),
    ([9, 7, 6], 2),  # equal layer counts give 16, best is 13
    ([8, 6, 7, 6], 3),
    ([5, 8, 9, 7], 3),
    ([0.8, 1.3, 1.1, 2.9, 0.4, 0.4, 1.7, 2.2, 0.6], 3),  # measured-looking times
    ([0.8, 1.3, 1.1, 2.9, 0.4, 0.4, 1.7, 2.2, 0.6], 4),
    ([0, 3, 0, 0, 3, 0], 2),  # zero-cost layers
    ([2, 3, 5], 3),  # one layer per stage
    ([4, 1, 2], 1),  # one stage
]


def _random_partition_cases() -> list[tuple[list[float], int]]:
    rng = random.Random(2024)
    cases = []
    for _ in range(12):
        n = rng.randint(6, 16)
        k = rng.randint(2, min(5, n))
        cases.append(([round(rng.uniform(0.1, 5.0), 2) for _ in range(n)], k))
    return cases


def _bottleneck(costs: Sequence[float], bounds: Sequence[int]) -> float:
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))


def brute_force_bottleneck(costs: Sequence[float], stages: int) -> float:
    """The best bottleneck over every contiguous split (all ``C(n-1, stages-1)`` of them)."""
    n = len(costs)
    return min(_bottleneck(costs, (0, *cuts, n))
               for cuts in itertools.combinations(range(1, n), stages - 1))


def check_partition(fn: Callable[[list[float], int], list[int]]) -> None:
    """``fn(costs, stages)``: bounds of the contiguous split whose slowest stage is cheapest.

    Returns must be ``stages + 1`` increasing layer indices from 0 to ``len(costs)`` (stage ``s``
    holds layers ``bounds[s]:bounds[s+1]``, as ``train(..., bounds=...)`` takes them). The
    bottleneck is compared with a brute force over every split.
    """
    __tracebackhide__ = True
    cases = _PARTITION_CASES + _random_partition_cases()
    for costs, k in cases:
        args = {"costs": list(costs), "stages": k}
        label = _label(fn, args)
        got = _call(fn, args)
        got = getattr(got, "bounds", got)  # a minipipe.partition.Partition is fine too
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, Sequence) or isinstance(got, str) or not all(
                isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in got):
            raise CheckFailed(f"{label} returned {got!r}: return a list of ints, the stage "
                              "boundaries")
        got = [int(b) for b in got]
        n = len(costs)
        if len(got) != k + 1:
            hint = ""
            if len(got) == k - 1:
                hint = (" (you returned only the cut points: add 0 in front and len(costs) at "
                        "the end)")
            elif len(got) == k and sum(got) == n:
                hint = " (that looks like stage sizes: return boundaries, the running sums from 0)"
            elif len(got) < k + 1:
                hint = " (fewer stages than asked: every stage must get at least one layer)"
            raise CheckFailed(f"{label} returned {got}: that is {len(got)} number(s); return "
                              f"stages + 1 = {k + 1} boundaries, from 0 to {n}{hint}")
        if got[0] != 0 or got[-1] != n:
            raise CheckFailed(f"{label} returned {got}: boundaries start at 0 and end at "
                              f"len(costs) = {n}, so that every layer is in a stage")
        empty = [s for s in range(k) if got[s + 1] <= got[s]]
        if empty:
            raise CheckFailed(f"{label} returned {got}: stage {empty[0]} holds layers "
                              f"{got[empty[0]]}:{got[empty[0] + 1]}, which is "
                              + ("empty" if got[empty[0] + 1] == got[empty[0]] else "backwards")
                              + "; every stage needs at least one layer, in order")
        mine, best = _bottleneck(costs, got), brute_force_bottleneck(costs, k)
        if mine > best + 1e-9 * max(1.0, best):
            stage = max(range(k), key=lambda s: sum(costs[got[s]:got[s + 1]]))
            raise CheckFailed(
                f"{label} returned {got}: its slowest stage (stage {stage}) costs {mine:g}, but a "
                f"contiguous split exists whose slowest stage costs {best:g} (the checker tried "
                "every split). A rule that fills stages one by one (up to the average, or with "
                "equal layer counts) cannot see what its choice leaves for the later stages: "
                "look for an exact method (every split, dynamic programming, or a binary search "
                "on the bottleneck).")
    _passed(f"partition returns an optimal contiguous split on {len(cases)} cases "
            "(checked against brute force)")


