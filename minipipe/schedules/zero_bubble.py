"""Zero-bubble schedules: the backward split into B (input gradient) and W (weight gradient)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from .base import Action, B, F, Kind, Schedule, W, check_sizes
from .one_f_one_b import one_f_one_b

__all__ = ["zb_h1", "zb_h2"]


def _fill_w(todo: list[list[Action]], must_w: Callable[[int, int], bool]) -> list[list[Action]]:
    """Insert each rank's ``W`` actions into its F/B order, on unit costs (one chunk per rank).

    A deferred ``W`` runs when its rank would otherwise wait for input, when nothing else is
    left, or when ``must_w(rank, deferred)`` says so. The order is found by playing that rule
    with ``t_f = t_b = t_w = 1``: every rank's next candidate sits in a heap, the earliest
    start (then the lowest rank) runs next. A candidate changes only when its rank acts, or
    when a neighbour finishes the action its next F or B waits for: only those are recomputed
    (stale entries are skipped), so this is near-linear in the number of actions.
    """
    p, m = len(todo), 1 + max(a.mb for order in todo for a in order)
    todo_q = [deque(order) for order in todo]
    ranks: list[list[Action]] = [[] for _ in range(p)]
    free = [0] * p  # when each rank is next idle
    done = [([-1] * m, [-1] * m) for _ in range(p)]  # per rank: end time of F, of B, per mb
    waiting_w: list[deque[int]] = [deque() for _ in range(p)]  # micro-batches whose W is deferred
    weights = [W(i) for i in range(m)]

    forward, backward = Kind.F, Kind.B  # locals: this loop runs once per action

    def candidate(r: int) -> tuple[int, int, bool] | None:  # (start, rank, is W) or None
        t = -1  # when the next F or B can start (-1: its input is not there yet)
        queue = todo_q[r]
        if queue:
            a = queue[0]
            if a.kind is forward:
                t = 0 if r == 0 else done[r - 1][0][a.mb]
            else:  # the last rank's B follows its own F in every order built here
                t = 0 if r == p - 1 else done[r + 1][1][a.mb]
        wait = waiting_w[r]
        if wait and (not queue or t < 0 or t > free[r] or must_w(r, len(wait))):
            return (free[r], r, True)  # fill the wait with a deferred W
        if t >= 0:
            return (free[r] if free[r] > t else t, r, False)
        return None

    def renew(q: int) -> None:  # rank q's candidate may have changed: push the new one
        version[q] += 1
        c = candidate(q)
        if c is not None:
            push(heap, (*c, version[q]))

    version = [0] * p
    heap = [(*c, 0) for c in map(candidate, range(p)) if c is not None]
    heapq.heapify(heap)
    push, pop = heapq.heappush, heapq.heappop
    while heap:
        start, r, do_w, ver = pop(heap)
        if ver != version[r]:
            continue
        a = weights[waiting_w[r].popleft()] if do_w else todo_q[r].popleft()
        free[r] = start + 1
        ranks[r].append(a)
        q = -1  # the neighbour whose next action may wait for this one
        if a.kind is forward:
            done[r][0][a.mb] = start + 1
            q = r + 1
        elif a.kind is backward:
            done[r][1][a.mb] = start + 1
            waiting_w[r].append(a.mb)
            q = r - 1
        renew(r)
        if 0 <= q < p and todo_q[q] and todo_q[q][0] == a:
            renew(q)
    return ranks


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
    ranks = _fill_w([list(o) for o in one_f_one_b(p, m).ranks], lambda r, n: n > r)
    return Schedule(ranks, m=m, v=1, name="zb-h1")


def zb_h2(p: int, m: int) -> Schedule:
    """Zero-bubble ZB-H2 (Qi et al. 2024): a longer warm-up, so no rank waits in the steady state.

    Rank ``r`` runs ``min(2(p − r) − 1, m)`` forwards before its first ``B`` (ZB-H1: ``p − r``),
    which fills its wait for the first gradient; then ``B`` and ``F`` in turn, a ``W`` filling
    every wait and forced once rank ``r`` has more than ``2r`` deferred. Step time, for
    ``m >= 2p − 1`` and ``t_b <= t_f + t_w``: ``m(t_f + t_b + t_w) + (p − 1)·t_f`` — no bubble in
    the steady state, only the ramp: under our flush (one optimizer step per batch) rank ``r``
    idles ``r·t_f`` at the start and ``(p − 1 − r)·t_f`` at the end. That beats ZB-H1 by
    ``(p − 1)(t_b − t_w)``; with ``t_f = t_b = t_w`` the two tie. The paper also removes the
    ramp by dropping the optimizer's synchronisation ("post-validation"); minipipe keeps it.
    For smaller ``m`` the simulator is slower than this formula (the warm-up cannot fill).

    Memory: up to ``min(2(p − r) − 1, m)`` micro-batches awaiting ``B`` on rank ``r``, and
    ``min(2p − 1, m)`` awaiting ``W`` on every rank: about twice 1F1B's ``p``.
    """
    check_sizes(p, m)
    todo = []
    for r in range(p):
        warmup = min(2 * (p - r) - 1, m)
        order = [F(i) for i in range(warmup)]
        for i in range(m - warmup):  # steady state: B of the oldest, then F of the newest
            order += [B(i), F(warmup + i)]
        todo.append(order + [B(i) for i in range(m - warmup, m)])
    ranks = _fill_w(todo, lambda r, n: n > 2 * r)
    return Schedule(ranks, m=m, v=1, name="zb-h2")
