"""Exercise 7: where to put the W actions of a zero-bubble schedule."""

from __future__ import annotations

from collections.abc import Callable

from ...schedules import Kind, Schedule, one_f_one_b, zb_h1
from .common import (
    CheckFailed,
    _label,
    _orders,
    _passed,
    _peak_until,
    _schedule,
    _validated,
)

# the visible 4-rank case first, then every p up to 8 with m from 1 to 16 (m < p included):
# a placement tuned to one plot fails on the others. All simulation: about a second.
_ZB_CASES = [(2, 4), (4, 8), (3, 5), (4, 2), (1, 3), (3, 3)] + [
    (p, m) for p in range(1, 9) for m in range(1, 17)
    if (p, m) not in {(2, 4), (4, 8), (3, 5), (4, 2), (1, 3), (3, 3)}]


def check_zero_bubble(fn: Callable[[int, int], Schedule]) -> None:
    """``fn(p, m)``: 1F1B's F/B order with a W for every B, placed to fill the bubbles (ZB-H1).

    Passes when the schedule validates, keeps 1F1B's order of F and B on every rank, holds no
    more activations than 1F1B's first rank (``min(p, m)``; an activation is freed by its W), and
    a simulated step with ``t_f = t_b = t_w = 1`` is as short as ZB-H1's.
    """
    __tracebackhide__ = True
    from ...simulate import simulate

    for p, m in _ZB_CASES:
        args = {"p": p, "m": m}
        label = _label(fn, args)
        s = _schedule(fn, args)
        if not s.split_backward:
            raise CheckFailed(f"{label} has no W actions: split each backward into B (input "
                              "gradient) and W (weight gradient) and place every W")
        _validated(s, label)
        ref = one_f_one_b(p, m)
        for r, (order, want) in enumerate(zip(s.ranks, ref.ranks)):
            fb = [a for a in order if a.kind is not Kind.W]
            if tuple(fb) != tuple(want):
                k = next((i for i, (a, b) in enumerate(zip(fb, want)) if a != b), len(want))
                raise CheckFailed(f"{label}: rank {r}'s F and B actions are not in 1F1B's order "
                                  f"(first difference at its F/B action {k}). Keep 1F1B's order "
                                  "for F and B; this exercise only places the W's.\n"
                                  + _orders(s))
        held = [_peak_until(o, Kind.W) for o in s.ranks]
        if max(held) > min(p, m):
            r = max(range(p), key=held.__getitem__)
            raise CheckFailed(
                f"{label}: rank {r} holds up to {held[r]} micro-batches of activations (an "
                f"activation is freed by its W, not its B), more than 1F1B's busiest rank "
                f"({min(p, m)}). Deferring W's costs memory: run the deferred ones sooner.\n"
                + _orders(s))
        step = simulate(s, t_f=1.0, t_b=1.0, t_w=1.0).step_time
        target = simulate(zb_h1(p, m), t_f=1.0, t_b=1.0, t_w=1.0).step_time
        if step > target + 1e-9:
            plain = simulate(one_f_one_b(p, m), t_f=1.0, t_b=2.0).step_time
            raise CheckFailed(
                f"{label}: a simulated step (t_f = t_b = t_w = 1) takes {step:g} time units; 1F1B "
                f"takes {plain:g} and ZB-H1 {target:g}. Some bubble is still empty: plot "
                "minipipe.plot_timeline(minipipe.simulate(schedule, 1, 1, 1)) and look where "
                "ranks idle while they still have W's to do (a rank far from the last stage waits "
                "longest for gradients).")
    _passed(f"zero-bubble placement validates, keeps 1F1B's memory and matches ZB-H1's step time "
            f"on {len(_ZB_CASES)} cases (p = 1…8, m = 1…16)")


