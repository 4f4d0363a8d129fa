"""A schedule compiled to integer arrays, and the event loop that plays it.

This is the fast path behind :func:`~minipipe.validate.validate`, its dry run and
:func:`~minipipe.simulate.simulate`: linear in the number of actions, numpy for the columns and
one compiled loop (:func:`_run`, numba: see :mod:`minipipe.jit`) for the events, because it is
the hot path at cluster sizes (``p = 64, m = 1024``: half a million actions in milliseconds).
It only says *whether* a schedule is sound; when it is not, :mod:`minipipe.validate` works out
*why*, with the plain (slower) checks that name the rank, the action and the reason.

Every action has an integer key: ``F(s, i) = (s + 1)·m + i``, ``B(s, i) = (S + 1)·m + s·m + i``,
``W(s, i) = (2S + 1)·m + s·m + i`` for stage ``s`` of ``S``; keys ``0..m−1`` are a stage ``−1``
whose forwards (the input batches) are done at time 0. Each action has exactly one dependency:
``F(s−1)`` for ``F`` (the input on a group's first stage), ``B(s+1)`` for ``B`` (its own ``F``
on a group's last stage), its own ``B`` for ``W``. With ``pipelines > 1`` (bidirectional
DualPipe) the stages form groups and only the keys of micro-batches that travel a stage's
group are used. Wherever the stages sit (the schedule's ``placement``), that is enough: an
action placed before one it needs on the same rank leaves that rank waiting for ever, which
:func:`play` reports as a deadlock.

Messages: a stage boundary that crosses ranks is two channels, the activations of stage ``s``
(``s → s + 1``) and the gradients of stage ``s + 1`` (``s + 1 → s``); each channel delivers in
the order it is sent (the runtime gives each its own tag). So the receiving stage must consume
a channel's micro-batches in the order the sending stage produces them. Neighbouring stages on
the same rank hand tensors over in memory: no channel.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .jit import jit
from .schedules import Schedule

__all__ = ["Invalid", "Plan", "compile_schedule", "play", "check_runs", "crossing_edges"]


class Invalid(Exception):
    """The schedule cannot run; :func:`~minipipe.validate.validate` then says why."""


class Plan(NamedTuple):
    """A compiled schedule: one entry per action, all ranks concatenated in their orders."""

    keys: np.ndarray  #: the action's key
    deps: np.ndarray  #: the key of the one result it needs
    lags: np.ndarray  #: message latency added to that result (0 on the same rank)
    durations: np.ndarray  #: how long it runs
    bounds: np.ndarray  #: rank ``r``'s actions are ``bounds[r]:bounds[r + 1]``
    m: int  #: micro-batches (keys ``0..m−1`` are the inputs, ready at time 0)
    size: int  #: number of keys


def crossing_edges(schedule: Schedule) -> list[int]:
    """Stages ``s`` whose boundary ``s → s + 1`` crosses ranks (carries messages)."""
    place = schedule.placement
    return [s for s in range(schedule.num_stages - 1)
            if place[s][0] != place[s + 1][0] and not schedule.is_last(s)]


def compile_schedule(schedule: Schedule,
                     costs: tuple[list[float], list[float], list[float]] | None = None,
                     comm: float = 0.0, timed: bool = True) -> Plan:
    """Every action's key, its dependency's key, the message lag and the duration.

    ``costs`` are ``(t_f, t_b, t_w)``, one number per pipeline stage; a schedule without ``W``
    runs ``B`` for ``t_b + t_w``. ``None``: every action takes one tick (the dry run). Raises
    :class:`Invalid` for a missing, repeated or out-of-range action, or a channel received in
    another order than it is sent. ``timed=False``: zero lags, unit durations (a verdict only).
    What does not depend on the costs is worked out once per schedule (:meth:`Schedule.memo`).
    """
    keys, deps, kind, stage, far, split = schedule.memo("dataflow", lambda: _structure(schedule))
    bounds, m, S = schedule.columns()[3], schedule.m, schedule.num_stages
    size = m + 3 * S * m
    if not timed:
        return Plan(keys, deps, np.zeros(len(keys)), np.ones(len(keys)), bounds, m, size)
    tf, tb, tw = (np.asarray(c, float) for c in costs) if costs else (
        np.ones(S), np.ones(S), np.full(S, 1.0 if split else 0.0))
    cost = np.concatenate((tf, tb if split else tb + tw, tw))  # B is the whole backward unsplit
    return Plan(keys, deps, far * float(comm), cost[kind * S + stage], bounds, m, size)


def _structure(schedule: Schedule) -> tuple:
    """Keys, dependencies, kinds, stages, whether the dependency is on another rank, and
    whether the backward is split: all :func:`compile_schedule` needs besides the costs."""
    p, m, v = schedule.p, schedule.m, schedule.v
    if m < 1 or v < 1:
        raise Invalid("the schedule has no actions")
    kind, chunk, mb, bounds = schedule.columns()
    counts = np.diff(bounds)
    split = bool((kind == 2).any())
    expected = (3 if split else 2) * schedule.group_mbs * v  # each chunk: its group's mbs
    wrong = np.flatnonzero(counts != expected)
    if wrong.size:
        r = int(wrong[0])
        raise Invalid(f"rank {r} has {counts[r]} actions, expected {expected}")
    if (chunk >= v).any() or (mb >= m).any():
        r = int(np.searchsorted(bounds, np.flatnonzero((chunk >= v) | (mb >= m))[0], "right")) - 1
        raise Invalid(f"rank {r} runs a micro-batch or chunk outside the schedule")
    S = p * v
    rank = np.repeat(np.arange(p), counts)
    stage = np.array([schedule.stage(r, c) for r in range(p) for c in range(v)])[rank * v + chunk]
    if schedule.pipelines > 1:
        wrong = np.flatnonzero(stage // schedule.group_stages != mb // schedule.group_mbs)
        if wrong.size:
            raise Invalid(f"rank {int(rank[wrong[0]])} runs a micro-batch on a stage of another "
                          "pipeline")
    keys = m + (kind * S + stage) * m + mb
    size = m + 3 * S * m
    seen = np.bincount(keys, minlength=size)
    if (seen > 1).any():  # with the counts right, also: none is missing
        twice = np.flatnonzero(seen[keys] > 1)[0]
        raise Invalid(f"rank {int(rank[twice])} runs an action twice")
    _check_channels(schedule, keys, bounds, rank, size)
    # F needs F of the stage before (a group's first stage: the input); B needs B of the stage
    # after, on a group's last stage its own F; W needs its own B (same rank)
    per = schedule.group_stages
    turn = (kind == 1) & (stage % per == per - 1)
    dep_kind = np.where((kind == 0) | turn, 0, 1)
    dep_stage = np.where(kind == 0, stage - 1, np.where((kind == 1) & ~turn, stage + 1, stage))
    dep_stage[(kind == 0) & (stage % per == 0)] = -1  # reads the input
    deps = np.where(dep_stage < 0, mb, m + (dep_kind * S + dep_stage) * m + mb)
    owner = np.array([r for r, _ in schedule.placement])[dep_stage.clip(0)]  # rank of the dep
    far = (kind < 2) & ~turn & (dep_stage >= 0) & (owner != rank)
    return keys, deps, kind, stage, far, split


def _check_channels(schedule: Schedule, keys: np.ndarray, bounds: np.ndarray,
                    rank: np.ndarray, size: int) -> None:
    """Each channel is consumed in the order it is produced: the micro-batches of ``F`` (or
    ``B``) on the two stages of a boundary come in the same order on their ranks."""
    m, S = schedule.m, schedule.num_stages
    edges = np.array(crossing_edges(schedule), dtype=np.int64)
    if not edges.size:
        return
    position = np.zeros(size, np.int64)  # of each action (by key) in its rank's order
    position[keys] = np.arange(len(keys)) - bounds[rank]
    f = position[m:m + S * m].reshape(S, m)  # row s: positions of F(s, 0..m−1)
    b = position[m + S * m:m + 2 * S * m].reshape(S, m)
    per = schedule.group_mbs  # the micro-batches of a boundary: those of its group
    cols = (edges // schedule.group_stages * per)[:, None] + np.arange(per)
    rows = edges[:, None]
    pairs = [(f[rows, cols], f[rows + 1, cols]), (b[rows + 1, cols], b[rows, cols])]
    for send, recv in pairs:
        rising = (np.diff(send, axis=1) > 0).all(1) & (np.diff(recv, axis=1) > 0).all(1)
        odd = np.flatnonzero(~rising)  # both in micro-batch order is the usual case
        if odd.size and (np.argsort(send[odd], 1) != np.argsort(recv[odd], 1)).any():
            s = int(edges[odd[(np.argsort(send[odd], 1) != np.argsort(recv[odd], 1)).any(1)][0]])
            raise Invalid(f"a channel of stage boundary {s} → {s + 1} is received out of order")


# ---------------------------------------------------------------------------- the event loop


@jit
def _run(keys, deps, lags, durations, bounds, finish, starts, waiter) -> int:
    """Play the compiled schedule; fill ``starts`` (and ``finish``, by key); return the number
    of ranks left waiting (0: it ran to the end; more: deadlock).

    A rank runs its actions in order until one needs a result not computed yet (``finish``
    still ``−1``); it then waits, registered under that result's key in ``waiter``, and is
    resumed when the result is computed. Each action is handled once. An action starts when
    both its rank is free and its dependency's result has arrived (``+ lag``).
    """
    p = len(bounds) - 1
    nxt = bounds[:p].copy()  # next action of each rank
    free = np.zeros(p)  # when each rank is next idle
    ready = np.arange(p - 1, -1, -1)  # a stack of ranks to resume (each at most once)
    top, left = p, p
    while top > 0:
        top -= 1
        r = ready[top]
        t, k, end = free[r], nxt[r], bounds[r + 1]
        while k < end:
            done = finish[deps[k]]
            if done < 0:  # blocked: wait for that result
                waiter[deps[k]] = r
                break
            done += lags[k]
            if done > t:
                t = done
            starts[k] = t
            t += durations[k]
            finish[keys[k]] = t
            if waiter[keys[k]] >= 0:
                ready[top] = waiter[keys[k]]
                top += 1
            k += 1
        if k == end:
            left -= 1
        nxt[r], free[r] = k, t
    return left


def play(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Start and end time of every action (in :class:`Plan` order): the event loop.

    Raises :class:`Invalid` when ranks are left waiting (deadlock).
    """
    finish = np.full(plan.size, -1.0)
    finish[:plan.m] = 0.0
    starts = np.zeros(len(plan.keys))
    waiter = np.full(plan.size, -1, np.int64)
    if _run(plan.keys, plan.deps, plan.lags, plan.durations, plan.bounds, finish, starts,
                   waiter):
        raise Invalid("deadlock: some rank waits for an action that never runs")
    return starts, starts + plan.durations


def check_runs(plan: Plan) -> None:
    """Whether every rank reaches its end: :func:`play`, keeping only the verdict.

    Raises :class:`Invalid` when ranks are left waiting (deadlock).
    """
    play(plan)
