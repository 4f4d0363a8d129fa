"""Play a schedule on a model of the machine and measure it: events, step time, bubbles, memory.

The simulator turns a :class:`~minipipe.schedules.Schedule` into a :class:`Timeline` of timed
events, one per action. The runtime builds the same :class:`Timeline` from what it measures on
real ranks (``source="measured"``), and every figure (step time, both bubbles, peak in-flight
micro-batches) is computed from the events alone, so predicted and measured timelines are read
the same way.

Cost convention (used by :func:`simulate` and :mod:`minipipe.formulas`):

- ``t_f``: forward of one micro-batch on one stage.
- ``t_b``: the input-gradient part of the backward of one micro-batch on one stage.
- ``t_w``: the weight-gradient part (default 0: not split out).

A schedule without ``W`` actions runs the whole backward as one ``B`` costing ``t_b + t_w``; a
split-backward (zero-bubble) schedule runs ``B`` costing ``t_b`` and ``W`` costing ``t_w``. So
``t_f=1, t_b=2`` means "backward is twice the forward", and ``t_f = t_b = t_w = 1`` is the
zero-bubble paper's setting (whole backward ``2 t_f``).
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Sequence
from itertools import compress, repeat
from operator import add, attrgetter

from .schedules import Action, Kind, Schedule
from .timeline import Event, Timeline
from .validate import ScheduleError, validate

__all__ = ["Cost", "simulate"]

Cost = float | Sequence[float]  #: one number for every stage, or one per pipeline stage



# ---------------------------------------------------------------------------- the simulator


class _Invalid(Exception):
    """Raised by the fast checks; :func:`simulate` then asks :func:`validate` for the reason."""


def _per_stage(name: str, cost: Cost | None, stages: int) -> list[float]:
    if cost is None:
        return [0.0] * stages
    if isinstance(cost, (int, float)):
        values = [float(cost)] * stages
    else:
        values = [float(c) for c in cost]
        if len(values) != stages:
            raise ValueError(f"{name} has {len(values)} values: give one number, or one per "
                             f"pipeline stage (p·v = {stages})")
    if any(c < 0 for c in values):
        raise ValueError(f"{name} must be >= 0, got {cost}")
    return values


def simulate(
    schedule: Schedule,
    t_f: Cost = 1.0,
    t_b: Cost = 2.0,
    t_w: Cost | None = None,
    comm: float = 0.0,
) -> Timeline:
    """Run ``schedule`` on a model machine: each rank starts each action as early as it can.

    Costs follow the module's convention: ``t_b`` is the input-gradient part of the backward,
    ``t_w`` the weight-gradient part (``None`` or 0: not split out). A schedule without W
    actions runs ``B`` for ``t_b + t_w``; a split-backward schedule runs ``B`` for ``t_b`` and
    ``W`` for ``t_w``. Each cost is one number or a list with one number per pipeline stage
    (index ``schedule.stage(rank, chunk)``, length ``p·v``), e.g. to slow down one stage.

    Each rank runs its actions in its order, one at a time. ``F`` of stage ``s`` waits for
    ``F`` of stage ``s − 1``, ``B`` of stage ``s`` for ``B`` of stage ``s + 1`` (and its own
    ``F``), ``W`` for its ``B``; a dependency on another rank adds ``comm``.

    The schedule is checked as :func:`~minipipe.validate.validate` does (every action once,
    local order, message order, no deadlock), but in time linear in the number of actions;
    only when a check fails is ``validate`` run, to give its full explanation.

    Args:
        schedule: the schedule to play.
        t_f: forward time per micro-batch per stage.
        t_b: input-gradient backward time (the whole backward for an unsplit schedule when
            ``t_w`` is 0).
        t_w: weight-gradient time; ``None`` means 0.
        comm: latency of one point-to-point message between two ranks.

    Returns:
        A :class:`Timeline` with ``source="simulated"`` whose first action starts at 0.

    Raises:
        ScheduleError: the schedule cannot run (the reason ``validate`` gives: a missing or
            repeated action, an order that deadlocks, ...).
        ValueError: a cost list of the wrong length, or a negative cost.

    Example:
        >>> from minipipe import gpipe
        >>> simulate(gpipe(4, 16), t_f=1, t_b=2).step_time  # (m + p - 1)(t_f + t_b)
        57.0
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"expected a Schedule, got {type(schedule).__name__}")
    stages = schedule.num_stages
    costs = [_per_stage(name, c, stages) for name, c in (("t_f", t_f), ("t_b", t_b), ("t_w", t_w))]
    if comm < 0:
        raise ValueError(f"comm must be >= 0, got {comm}")
    was_enabled = gc.isenabled()
    gc.disable()  # allocating ~10^5 events would trigger many useless collections
    try:
        plans = _compile(schedule, *costs, float(comm))
        starts, ends = _run(plans, schedule.p, schedule.m)
        events: list[Event] = []
        for r, order in enumerate(schedule.ranks):
            events.extend(_events(r, order, starts[r], ends[r]))
    except _Invalid as err:
        validate(schedule)  # raises the full ScheduleError with the schedule drawn
        raise ScheduleError(str(err), schedule) from None  # should not happen
    finally:
        if was_enabled:
            gc.enable()
    return Timeline(schedule, events, source="simulated")


def _events(rank: int, actions: Sequence[Action], starts: list[float],
            ends: list[float]) -> list[Event]:
    """``[Event(rank, a, s, e) for a, s, e in zip(actions, starts, ends)]``, twice as fast.

    Fills the slots column by column from C (``map`` over the slot setters, which a frozen
    dataclass does not intercept) instead of calling ``Event.__init__`` once per action.
    """
    events = list(map(object.__new__, repeat(Event, len(actions))))
    for name, values in (("rank", repeat(rank)), ("action", actions), ("start", starts),
                         ("end", ends)):
        deque(map(getattr(Event, name).__set__, events, values), maxlen=0)
    return events


_Plan = tuple[list[int], list[int], list[float], list[float]]  # keys, deps, lags, durations


def _compile(schedule: Schedule, tf: list[float], tb: list[float], tw: list[float],
             comm: float) -> list[_Plan]:
    """Per rank: each action's key, its dependency's key, the message lag and the duration.

    Action keys are ``F(s, i) = (s + 1)·m + i``, ``B(s, i) = (S + 1)·m + s·m + i`` and
    ``W(s, i) = (2S + 1)·m + s·m + i`` for stage ``s`` of ``S``; keys ``0..m−1`` are a stage
    ``−1`` whose forwards (the input batches) finish at time 0. Each action has exactly one
    dependency: F(s−1) for F, B(s+1) for B (its own F on the last stage), its own B for W.
    That is enough: with it, an action placed before one it needs on the same rank makes
    :func:`_run` find a deadlock. Raises ``_Invalid`` for a missing, repeated or out-of-range
    action, or messages out of order. Written with ``map`` over columns: it is the hot path.
    """
    p, m, v = schedule.p, schedule.m, schedule.v
    if m < 1 or v < 1:
        raise _Invalid("the schedule has no actions")
    kinds = [list(map(attrgetter("kind"), order)) for order in schedule.ranks]
    split = any(Kind.W in ks for ks in kinds)
    stages, last = p * v, p * v - 1
    ms = m * stages
    n_kinds = 3 if split else 2
    # row of an action = offset[kind] + chunk; Kind members are singletons, so id() is exact
    offset = {id(Kind.F): 0, id(Kind.B): v, id(Kind.W): 2 * v}
    fifo: dict[tuple[int, int], list[list[int]]] = {}  # (src, dst): [sent, received] messages
    plans = []
    for r, order in enumerate(schedule.ranks):
        if len(order) != n_kinds * m * v:
            raise _Invalid(f"rank {r} has {len(order)} actions, expected {n_kinds * m * v}")
        # one row per (kind, chunk): key base, dependency base, lag, duration, message peers
        base, dep, lag, dur, src, dst = [], [], [], [], [], []
        for kind in range(3):
            for c in range(v):
                s = c * p + r
                prev = (s - 1) % p if s > 0 and (s - 1) % p != r else -1
                nxt = (s + 1) % p if s < last and (s + 1) % p != r else -1
                base.append(m + kind * ms + s * m)
                if kind == 0:  # F needs F of the stage before, received from `prev`
                    dep.append(s * m)
                    src.append(prev), dst.append(nxt), dur.append(tf[s])
                elif kind == 1:  # B needs B of the stage after (from `nxt`); the last, its F
                    dep.append(m + ms + (s + 1) * m if s < last else m + s * m)
                    src.append(nxt), dst.append(prev)
                    dur.append(tb[s] if split else tb[s] + tw[s])
                else:  # W needs its own B, on this rank
                    dep.append(m + ms + s * m), src.append(-1), dst.append(-1), dur.append(tw[s])
                lag.append(comm if src[-1] >= 0 else 0.0)
        chunks = list(map(attrgetter("chunk"), order))
        mbs = list(map(attrgetter("mb"), order))
        if max(chunks) >= v or max(mbs) >= m:
            raise _Invalid(f"rank {r} runs a micro-batch or chunk outside the schedule")
        rows = list(map(add, map(offset.__getitem__, map(id, kinds[r])), chunks))
        keys = list(map(add, map(base.__getitem__, rows), mbs))
        deps = list(map(add, map(dep.__getitem__, rows), mbs))
        if len(set(keys)) != len(keys):  # with the count right, also: none is missing
            raise _Invalid(f"rank {r} runs an action twice")
        for peer in (set(src) | set(dst)) - {-1}:  # messages in the order they are received/sent
            fifo.setdefault((peer, r), [[], []])[1] = list(
                compress(deps, map([q == peer for q in src].__getitem__, rows)))
            fifo.setdefault((r, peer), [[], []])[0] = list(
                compress(keys, map([q == peer for q in dst].__getitem__, rows)))
        plans.append((keys, deps, list(map(lag.__getitem__, rows)),
                       list(map(dur.__getitem__, rows))))
    if any(sent != received for sent, received in fifo.values()):
        raise _Invalid("messages between two ranks are received in another order than sent")
    return plans


def _run(plans: list[_Plan], p: int, m: int) -> tuple[list[list[float]], list[list[float]]]:
    """Start and end time of every action, rank by rank: the event loop.

    A rank runs its actions in order until one needs a result not computed yet; it then waits
    (parked under that result's key) and is resumed when the result is computed. Each action
    is handled once. Raises ``_Invalid`` when ranks are left waiting (deadlock).
    """
    size = 1 + max(max(keys) for keys, *_ in plans)
    finish = [0.0] * m + [-1.0] * (size - m)  # end time of every action, -1: not run yet
    starts = [[0.0] * len(plan[0]) for plan in plans]
    free = [0.0] * p  # when each rank is next idle
    at = [0] * p  # next action of each rank
    waiting: dict[int, int] = {}  # key of a missing result -> the one rank that can wait for it
    ready = list(range(p - 1, -1, -1))
    while ready:
        r = ready.pop()
        keys, deps, lags, durs = plans[r]
        st = starts[r]
        k, n, t = at[r], len(keys), free[r]
        while k < n:
            d = deps[k]
            done = finish[d]
            if done < 0:  # blocked: park until the dependency runs
                waiting[d] = r
                break
            done += lags[k]
            if done > t:
                t = done
            st[k] = t
            t += durs[k]
            key = keys[k]
            finish[key] = t
            if key in waiting:
                ready.append(waiting.pop(key))
            k += 1
        at[r], free[r] = k, t
    if any(at[r] < len(plans[r][0]) for r in range(p)):
        raise _Invalid("deadlock: some rank waits for an action that never runs")
    return starts, [list(map(add, st, plan[3])) for st, plan in zip(starts, plans, strict=True)]
