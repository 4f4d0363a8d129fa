"""Zero-bubble schedules: the backward split into B (input gradient) and W (weight gradient)."""

from __future__ import annotations

from .base import Action, Kind, Schedule, W, check_sizes
from .one_f_one_b import one_f_one_b

__all__ = ["zb_h1"]


def zb_h1(p: int, m: int) -> Schedule:
    """Zero-bubble ZB-H1 (Qi et al. 2024): 1F1B with backward split into ``B`` and ``W``.

    ``F`` and ``B`` (input gradient) keep 1F1B's order. A ``W`` (weight gradient) runs when
    its rank would otherwise wait for input, or as soon as rank ``r`` has more than ``r``
    deferred. The order is found by playing that rule on unit costs (``t_f = t_b = t_w``).
    Bubble ``(p − 1)(t_f + t_b − t_w)`` instead of 1F1B's ``(p − 1)(t_f + t_b + t_w)`` (for
    ``m >= p``). Peak in-flight forwards awaiting ``B`` on rank ``r``: ``min(p − r, m)``, as
    1F1B; counting those that still wait for ``W``, ``min(p, m)`` on every rank: 1F1B's peak.
    """
    check_sizes(p, m)
    todo = [list(order) for order in one_f_one_b(p, m).ranks]  # 1F1B's F/B order
    ranks: list[list[Action]] = [[] for _ in range(p)]
    free = [0] * p  # when each rank is next idle
    finish: dict[tuple[int, Action], int] = {}
    waiting_w: list[list[int]] = [[] for _ in range(p)]  # micro-batches whose W is deferred

    def ready(r: int, a: Action) -> int | None:  # when a's input is there (None: not yet known)
        if a.kind is Kind.F:
            return 0 if r == 0 else finish.get((r - 1, a))
        return 0 if r == p - 1 else finish.get((r + 1, a))

    while any(todo) or any(waiting_w):
        best: tuple[int, int, bool] | None = None
        for r in range(p):
            t = ready(r, todo[r][0]) if todo[r] else None
            must_w = len(waiting_w[r]) > r or not todo[r]
            if waiting_w[r] and (must_w or t is None or t > free[r]):
                cand = (free[r], r, True)  # fill the wait with a deferred W
            elif todo[r] and t is not None:
                cand = (max(free[r], t), r, False)
            else:
                continue
            best = cand if best is None or cand < best else best
        start, r, do_w = best  # type: ignore[misc]
        a = W(waiting_w[r].pop(0)) if do_w else todo[r].pop(0)
        if a.kind is Kind.B:
            waiting_w[r].append(a.mb)
        free[r] = finish[(r, a)] = start + 1
        ranks[r].append(a)
    return Schedule(ranks, m=m, v=1, name="zb-h1")
