"""Zero-bubble schedules: the backward split into B (input gradient) and W (weight gradient)."""

from __future__ import annotations

import heapq

import numpy as np

from ..jit import jit
from .base import B, F, Schedule, check_sizes
from .one_f_one_b import one_f_one_b

__all__ = ["zb_h1", "zb_h2"]


def _fill_w(fb: Schedule, limit: list[int], name: str) -> Schedule:
    """Insert each rank's ``W`` actions into the F/B orders of ``fb`` (one chunk per rank).

    A deferred ``W`` runs when its rank would otherwise wait for input, when nothing else is
    left, or when rank ``r`` has more than ``limit[r]`` deferred. The order is found by playing
    that rule with ``t_f = t_b = t_w = 1`` (:func:`_fill_w_loop`).
    """
    p, m = fb.p, fb.m
    kinds, _, mbs, bounds = fb.columns()
    out = np.zeros((p, 3 * m), np.int64)  # per rank: kind * m + micro-batch of each action
    _fill_w_loop(kinds, mbs, bounds, m, np.array(limit, np.int64), out)
    return Schedule.from_columns(out.ravel() // m, np.zeros(3 * p * m, np.int64), out.ravel() % m,
                                 np.arange(p + 1) * 3 * m, m, 1, name=name)


@jit
def _fill_w_loop(kinds, mbs, bounds, m, limit, out) -> None:
    """The W-filling rule played on unit costs: fills ``out[r]`` with rank ``r``'s order.

    Every rank's next candidate (its next F or B, or a deferred W) sits in a heap as
    ``(start, rank, is W, version)``; the earliest start (then the lowest rank) runs next.
    A candidate changes only when its rank acts, or when a neighbour finishes the action its
    next F or B waits for: only those are renewed (an entry whose version is old is skipped),
    so this is near-linear in the number of actions. Written for numba (:mod:`minipipe.jit`).
    """
    p = len(bounds) - 1
    head = bounds[:p].copy()  # next F or B of each rank
    free = np.zeros(p, np.int64)  # when each rank is next idle
    f_end = np.full((p, m), -1, np.int64)  # when F / B of each micro-batch ended, per rank
    b_end = np.full((p, m), -1, np.int64)
    deferred = np.zeros((p, m), np.int64)  # micro-batches whose W waits, oldest first
    w_head, w_tail, n_out = np.zeros(p, np.int64), np.zeros(p, np.int64), np.zeros(p, np.int64)
    version = np.zeros(p, np.int64)
    renew, n_renew = np.arange(p), p  # ranks whose candidate may have changed
    heap = [(np.int64(0), np.int64(0), np.int64(0), np.int64(0))]  # typed for numba
    heap.pop()
    while True:
        for j in range(n_renew):
            x = renew[j]
            version[x] += 1
            t = -1  # when its next F or B can start (-1: its input is not there yet)
            if head[x] < bounds[x + 1]:
                i = mbs[head[x]]
                if kinds[head[x]] == 0:
                    t = 0 if x == 0 else f_end[x - 1, i]
                else:  # the last rank's B follows its own F in every order built here
                    t = 0 if x == p - 1 else b_end[x + 1, i]
            waiting = w_tail[x] - w_head[x]
            if waiting and (head[x] == bounds[x + 1] or t < 0 or t > free[x]
                            or waiting > limit[x]):
                heapq.heappush(heap, (free[x], x, np.int64(1), version[x]))  # fill with a W
            elif t >= 0:
                heapq.heappush(heap, (max(free[x], t), x, np.int64(0), version[x]))
        if not heap:
            break
        start, r, do_w, ver = heapq.heappop(heap)
        if ver != version[r]:
            n_renew = 0
            continue
        if do_w:
            kind, i = 2, deferred[r, w_head[r]]
            w_head[r] += 1
        else:
            kind, i = kinds[head[r]], mbs[head[r]]
            head[r] += 1
        free[r] = start + 1
        out[r, n_out[r]] = kind * m + i
        n_out[r] += 1
        renew[0], n_renew = r, 1
        q = -1  # the neighbour whose next action may wait for this one
        if kind == 0:
            f_end[r, i], q = start + 1, r + 1
        elif kind == 1:
            b_end[r, i], q = start + 1, r - 1
            deferred[r, w_tail[r]] = i
            w_tail[r] += 1
        if 0 <= q < p and head[q] < bounds[q + 1] and kinds[head[q]] == kind and mbs[head[q]] == i:
            renew[1], n_renew = q, 2


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
    return _fill_w(one_f_one_b(p, m), list(range(p)), "zb-h1")


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
    fwd, bwd = [F(i) for i in range(m)], [B(i) for i in range(m)]  # shared by every rank
    todo = []
    for r in range(p):
        warmup = min(2 * (p - r) - 1, m)
        steady = [None] * (2 * (m - warmup))  # steady state: B of the oldest, then F of the newest
        steady[0::2], steady[1::2] = bwd[:m - warmup], fwd[warmup:]
        todo.append(fwd[:warmup] + steady + bwd[m - warmup:])
    return _fill_w(Schedule(todo, m=m, v=1), [2 * r for r in range(p)], "zb-h2")
