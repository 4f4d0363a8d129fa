"""Zero-bubble schedules: the backward split into B (input gradient) and W (weight gradient)."""

from __future__ import annotations

import heapq
from collections import deque

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
    todo = [deque(order) for order in one_f_one_b(p, m).ranks]  # 1F1B's F/B order
    ranks: list[list[Action]] = [[] for _ in range(p)]
    free = [0] * p  # when each rank is next idle
    done = [([-1] * m, [-1] * m) for _ in range(p)]  # per rank: end time of F, of B, per mb
    waiting_w: list[deque[int]] = [deque() for _ in range(p)]  # micro-batches whose W is deferred
    weights = [W(i) for i in range(m)]

    def candidate(r: int) -> tuple[int, int, bool] | None:  # (start, rank, is W) or None
        t = -1  # when the next F or B can start (-1: its input is not there yet)
        if todo[r]:
            a = todo[r][0]
            if a.kind is Kind.F:
                t = 0 if r == 0 else done[r - 1][0][a.mb]
            else:
                t = 0 if r == p - 1 else done[r + 1][1][a.mb]
        wait = waiting_w[r]
        if wait and (len(wait) > r or not todo[r] or t < 0 or t > free[r]):
            return (free[r], r, True)  # fill the wait with a deferred W
        if t >= 0:
            return (max(free[r], t), r, False)
        return None

    # Every rank's current candidate sits in a heap: the earliest start (then the lowest rank)
    # runs next. A candidate changes only when its rank acts, or when a neighbour finishes the
    # action its next F or B waits for: only those are recomputed (stale entries are skipped).
    version = [0] * p
    heap = [(*c, 0) for c in map(candidate, range(p)) if c is not None]
    heapq.heapify(heap)
    while heap:
        start, r, do_w, ver = heapq.heappop(heap)
        if ver != version[r]:
            continue
        a = weights[waiting_w[r].popleft()] if do_w else todo[r].popleft()
        free[r] = start + 1
        ranks[r].append(a)
        touched = [r]
        if a.kind is Kind.F:
            done[r][0][a.mb] = start + 1
            touched.append(r + 1)  # its next action may be this F's successor
        elif a.kind is Kind.B:
            done[r][1][a.mb] = start + 1
            waiting_w[r].append(a.mb)
            touched.append(r - 1)
        for q in touched:
            if q == r or (0 <= q < p and todo[q] and todo[q][0] == a):
                version[q] += 1
                c = candidate(q)
                if c is not None:
                    heapq.heappush(heap, (*c, version[q]))
    return Schedule(ranks, m=m, v=1, name="zb-h1")
