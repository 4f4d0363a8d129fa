"""Exercises 2 and 3: a GPipe and a 1F1B generator (shared schedule helpers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ...schedules import Action, Kind, Schedule, gpipe, one_f_one_b
from .common import (
    CheckFailed,
    _how_far,
    _label,
    _orders,
    _passed,
    _schedule,
    _validated,
)

_GPIPE_CASES = [(2, 4), (4, 8), (3, 1), (1, 3), (4, 2), (3, 5)]


def check_gpipe(fn: Callable[[int, int], Schedule]) -> None:
    """``fn(p, m)``: GPipe (fill–drain): every rank runs all m forwards, then all m backwards."""
    __tracebackhide__ = True
    from ...simulate import simulate

    for p, m in _GPIPE_CASES:
        args = {"p": p, "m": m}
        label = _label(fn, args)
        s = _schedule(fn, args)
        if s.split_backward or s.v != 1:
            raise CheckFailed(f"{label}: GPipe has one chunk per rank and whole backwards (F and B "
                              "only, no W, no chunk prefix)")
        _validated(s, label)
        for r, order in enumerate(s.ranks):
            kinds = "".join(a.kind.value for a in order)
            if kinds != "F" * m + "B" * m:
                first_b = kinds.index("B")
                raise CheckFailed(
                    f"{label}: rank {r} runs {order[first_b]} before its last forward, which is "
                    f"not fill–drain: GPipe runs every forward of the batch first, then every "
                    f"backward.\n{_orders(s)}")
            if [a.mb for a in order[:m]] != list(range(m)):
                raise CheckFailed(f"{label}: rank {r} runs its forwards in the order "
                                  f"{' '.join(map(str, order[:m]))}; micro-batches enter the "
                                  "pipeline in order 0, 1, 2, ...")
        step = simulate(s, t_f=1.0, t_b=2.0).step_time
        best = simulate(gpipe(p, m), t_f=1.0, t_b=2.0).step_time
        if step > best + 1e-9:
            raise CheckFailed(f"{label} runs, but a simulated step (t_f=1, t_b=2) takes {step:g} "
                              f"instead of GPipe's {best:g}: look at the order of the backwards")
    _passed(f"gpipe validates and is fill–drain on {len(_GPIPE_CASES)} cases")


_1F1B_CASES = [(2, 4), (4, 8), (4, 2), (3, 3), (1, 3), (5, 1), (4, 5)]


def _warmup(order: Sequence[Action]) -> int:
    """Forwards before the first backward."""
    return next((k for k, a in enumerate(order) if a.kind is not Kind.F), len(order))


def check_one_f_one_b(fn: Callable[[int, int], Schedule]) -> None:
    """``fn(p, m)``: 1F1B (PipeDream-Flush): warm-up, steady one-forward-one-backward, cool-down."""
    __tracebackhide__ = True
    for p, m in _1F1B_CASES:
        args = {"p": p, "m": m}
        label = _label(fn, args)
        note = ("(In this case m < p: there are fewer micro-batches than the warm-up of the first "
                "ranks would like to start.)") if m < p else ""
        s = _schedule(fn, args, note)
        if s.split_backward or s.v != 1:
            raise CheckFailed(f"{label}: plain 1F1B has one chunk per rank and whole backwards "
                              "(F and B only, no W, no chunk prefix)")
        _validated(s, label, note)
        want = one_f_one_b(p, m)
        for r, (order, ref) in enumerate(zip(s.ranks, want.ranks)):
            got_w, want_w = _warmup(order), _warmup(ref)
            if got_w != want_w:
                diff = _how_far(got_w, want_w)
                raise CheckFailed(
                    f"{label}: rank {r} runs {got_w} forward(s) before its first backward (its "
                    f"warm-up forwards, plus the first forward of the steady phase if it has one): "
                    f"{diff}. Too many and the rank holds more activations than 1F1B needs; too "
                    "few and it sits idle waiting for a gradient. How many forwards can rank "
                    f"{r} run before the gradient of micro-batch 0 comes back from the last stage "
                    "(and can it ever run more than m?)" + (f"\n{note}" if note else "")
                    + f"\n{_orders(s)}")
            if tuple(order) != tuple(ref):
                k = next(i for i, (a, b) in enumerate(zip(order, ref)) if a != b)
                steady_end = want_w + 2 * (m - want_w)
                phase = ("steady phase (one forward, one backward)" if k < steady_end
                         else "cool-down")
                raise CheckFailed(
                    f"{label}: rank {r}'s warm-up is right, but its {phase} is not 1F1B's: "
                    f"position {k} holds {order[k]}. In the steady phase each new forward is "
                    "followed by the backward of the oldest micro-batch still in flight; the "
                    f"cool-down runs the backwards that are left.\n{_orders(s)}")
    _passed(f"one_f_one_b validates and matches 1F1B on {len(_1F1B_CASES)} cases (m < p included)")


