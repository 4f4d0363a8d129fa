"""A schedule compiled to flat integer lists, and the event loop that plays it.

This is the fast path behind :func:`~minipipe.validate.validate`, its dry run and
:func:`~minipipe.simulate.simulate`: linear in the number of actions, written with ``map``
over columns because it is the hot path at cluster sizes (``p = 64, m = 1024``). It only says
*whether* a schedule is sound; when it is not, :mod:`minipipe.validate` works out *why*, with
the plain (slower) checks that name the rank, the action and the reason.

Every action has an integer key: ``F(s, i) = (s + 1)·m + i``, ``B(s, i) = (S + 1)·m + s·m + i``,
``W(s, i) = (2S + 1)·m + s·m + i`` for stage ``s`` of ``S``; keys ``0..m−1`` are a stage ``−1``
whose forwards (the input batches) are done at time 0. Each action has exactly one dependency:
``F(s−1)`` for ``F``, ``B(s+1)`` for ``B`` (its own ``F`` on the last stage), its own ``B`` for
``W``. Wherever the stages sit (the schedule's ``placement``), that is enough: an action placed
before one it needs on the same rank leaves that rank waiting for ever, which :func:`play`
reports as a deadlock.

Messages: a stage boundary that crosses ranks is two channels, the activations of stage ``s``
(``s → s + 1``) and the gradients of stage ``s + 1`` (``s + 1 → s``); each channel delivers in
the order it is sent (the runtime gives each its own tag). So the receiving stage must consume
a channel's micro-batches in the order the sending stage produces them. Neighbouring stages on
the same rank hand tensors over in memory: no channel.
"""

from __future__ import annotations

from collections import deque
from itertools import chain
from operator import add, attrgetter, lt

from .schedules import Kind, Schedule

__all__ = ["Invalid", "Plan", "compile_schedule", "play", "check_runs", "crossing_edges"]

Plan = tuple[list[int], list[int], list[float], list[float]]  #: keys, deps, lags, durations


class Invalid(Exception):
    """The schedule cannot run; :func:`~minipipe.validate.validate` then says why."""


def crossing_edges(schedule: Schedule) -> list[int]:
    """Stages ``s`` whose boundary ``s → s + 1`` crosses ranks (carries messages)."""
    place = schedule.placement
    return [s for s in range(schedule.num_stages - 1) if place[s][0] != place[s + 1][0]]


def compile_schedule(schedule: Schedule,
                     costs: tuple[list[float], list[float], list[float]] | None = None,
                     comm: float = 0.0, timed: bool = True) -> list[Plan]:
    """Per rank: each action's key, its dependency's key, the message lag and the duration.

    ``costs`` are ``(t_f, t_b, t_w)``, one number per pipeline stage; a schedule without ``W``
    runs ``B`` for ``t_b + t_w``. ``None``: every action takes one tick (the dry run). Raises
    :class:`Invalid` for a missing, repeated or out-of-range action, or a channel received in
    another order than it is sent. ``timed=False`` leaves the lags and durations empty (all
    :func:`check_runs` needs).
    """
    p, m, v = schedule.p, schedule.m, schedule.v
    if m < 1 or v < 1:
        raise Invalid("the schedule has no actions")
    kinds = [list(map(attrgetter("kind"), order)) for order in schedule.ranks]
    split = any(Kind.W in ks for ks in kinds)
    S = p * v
    tf, tb, tw = costs or ([1.0] * S, [1.0] * S, [0.0 if not split else 1.0] * S)
    n_kinds = 3 if split else 2
    place = schedule.placement
    offset = {id(Kind.F): 0, id(Kind.B): v, id(Kind.W): 2 * v}  # row = offset[kind] + chunk
    plans = []
    for r, order in enumerate(schedule.ranks):
        if len(order) != n_kinds * m * v:
            raise Invalid(f"rank {r} has {len(order)} actions, expected {n_kinds * m * v}")
        base, dep, lag, dur = [], [], [], []  # one entry per row (kind, chunk)
        for kind in range(3):
            for c in range(v):
                s = schedule.stage(r, c)
                base.append(m + kind * S * m + s * m)
                if kind == 0:  # F needs F of the stage before
                    dep.append(s * m)
                    far = s > 0 and place[s - 1][0] != r
                    dur.append(tf[s])
                elif kind == 1:  # B needs B of the stage after; the last stage, its own F
                    dep.append(m + S * m + (s + 1) * m if s < S - 1 else m + s * m)
                    far = s < S - 1 and place[s + 1][0] != r
                    dur.append(tb[s] if split else tb[s] + tw[s])
                else:  # W needs its own B, on this rank
                    dep.append(m + S * m + s * m)
                    far = False
                    dur.append(tw[s])
                lag.append(comm if far else 0.0)
        chunks = list(map(attrgetter("chunk"), order))
        mbs = list(map(attrgetter("mb"), order))
        if max(chunks) >= v or max(mbs) >= m:
            raise Invalid(f"rank {r} runs a micro-batch or chunk outside the schedule")
        rows = list(map(add, map(offset.__getitem__, map(id, kinds[r])), chunks))
        keys = list(map(add, map(base.__getitem__, rows), mbs))
        if len(set(keys)) != len(keys):  # with the count right, also: none is missing
            raise Invalid(f"rank {r} runs an action twice")
        deps = list(map(add, map(dep.__getitem__, rows), mbs))
        if timed:
            plans.append((keys, deps, list(map(lag.__getitem__, rows)),
                          list(map(dur.__getitem__, rows))))
        else:
            plans.append((keys, deps, [], []))
    _check_channels(schedule, plans)
    return plans


def _check_channels(schedule: Schedule, plans: list[Plan]) -> None:
    """Each channel is consumed in the order it is produced: the micro-batches of ``F`` (or
    ``B``) on the two stages of a boundary come in the same order on their ranks."""
    m, S = schedule.m, schedule.num_stages
    position = [0] * (m + 3 * S * m)  # of each action (by key) in its rank's order
    for keys, *_ in plans:
        deque(map(position.__setitem__, keys, range(len(keys))), maxlen=0)

    def same_order(a: int, b: int) -> bool:  # keys a.., b..: m micro-batches of one stage each
        pa, pb = position[a:a + m], position[b:b + m]
        if all(map(lt, pa, pa[1:])) and all(map(lt, pb, pb[1:])):
            return True  # both in micro-batch order (the usual case, checked in C)
        return sorted(range(m), key=pa.__getitem__) == sorted(range(m), key=pb.__getitem__)

    for s in crossing_edges(schedule):
        f, b = m + s * m, m + S * m + s * m  # keys of F(s, 0) and B(s, 0)
        if not (same_order(f, f + m) and same_order(b + m, b)):
            raise Invalid(f"a channel of stage boundary {s} → {s + 1} is received out of order")


def play(plans: list[Plan], m: int) -> tuple[list[list[float]], list[list[float]]]:
    """Start and end time of every action, rank by rank: the event loop.

    A rank runs its actions in order until one needs a result not computed yet; it then waits
    (parked under that result's key, the action kept aside) and is resumed when the result is
    computed. Each action is handled once; each rank walks one ``zip`` of its plan's columns.
    Raises :class:`Invalid` when ranks are left waiting (deadlock).
    """
    p = len(plans)
    size = 1 + max(max(keys) for keys, *_ in plans)
    finish = [0.0] * m + [-1.0] * (size - m)  # end time of every action, -1: not run yet
    starts: list[list[float]] = [[] for _ in plans]
    free = [0.0] * p  # when each rank is next idle
    todo = [zip(*plan) for plan in plans]  # each rank's (key, dep, lag, duration), in order
    parked: list[tuple | None] = [None] * p  # the action a rank waits to run
    left = p  # ranks not finished
    waiter = [-1] * size  # key of a missing result -> the one rank that waits for it
    ready = list(range(p - 1, -1, -1))
    while ready:
        r = ready.pop()
        put, t = starts[r].append, free[r]
        for item in todo[r] if parked[r] is None else chain((parked[r],), todo[r]):
            key, dep, lag, dur = item
            done = finish[dep]
            if done < 0:  # blocked: park until the dependency runs
                waiter[dep], parked[r] = r, item
                break
            done += lag
            if done > t:
                t = done
            put(t)
            t += dur
            finish[key] = t
            if waiter[key] >= 0:
                ready.append(waiter[key])
        else:
            left, parked[r] = left - 1, None
        free[r] = t
    if left:
        raise Invalid("deadlock: some rank waits for an action that never runs")
    return starts, [list(map(add, st, plan[3])) for st, plan in zip(starts, plans, strict=True)]


def check_runs(plans: list[Plan], m: int) -> None:
    """:func:`play` without the clock: only whether every rank reaches its end.

    The same loop (each action handled once, a blocked rank parked under the key it needs),
    minus the start and end times, for :func:`~minipipe.validate.validate`, which needs only
    the verdict. Raises :class:`Invalid` when ranks are left waiting (deadlock).
    """
    p = len(plans)
    size = 1 + max(max(keys) for keys, *_ in plans)
    done = bytearray(size)  # 1: the action has run (keys 0..m-1: the input batches)
    done[:m] = b"\x01" * m
    todo = [zip(keys, deps) for keys, deps, *_ in plans]
    parked: list[tuple | None] = [None] * p
    left = p
    waiter = [-1] * size
    ready = list(range(p - 1, -1, -1))
    while ready:
        r = ready.pop()
        for item in todo[r] if parked[r] is None else chain((parked[r],), todo[r]):
            key, dep = item
            if not done[dep]:
                waiter[dep], parked[r] = r, item
                break
            done[key] = 1
            if waiter[key] >= 0:
                ready.append(waiter[key])
        else:
            left, parked[r] = left - 1, None
    if left:
        raise Invalid("deadlock: some rank waits for an action that never runs")
