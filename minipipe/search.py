"""The fastest schedule under a memory limit, found by a constraint solver (OR-Tools CP-SAT).

The zero-bubble authors do not hand-design every schedule: they state the problem — each
rank runs its F, B and W actions one at a time, each waits for what it needs, at most so many
micro-batches' activations are held at once — and let a solver place the actions. This
module does the same with Google's CP-SAT solver, and hands back an ordinary
:class:`~minipipe.schedules.Schedule` (each rank's actions in the order the solver starts
them), which the validator checks, the simulator times and the runtime runs.

The model (all times integers: costs are scaled by the smallest of 1, 10, 100, 1000 that
makes them whole, else rounded to a thousandth):

- one interval per action; the actions of a rank do not overlap;
- ``F`` of stage ``s`` starts after ``F`` of stage ``s − 1`` ends, ``B`` of ``s`` after ``B`` of
  ``s + 1`` (the last stage's ``B`` after its own ``F``), ``W`` after its ``B``; ``comm`` is
  added when the two stages sit on different ranks — exactly what
  :func:`~minipipe.simulate.simulate` plays;
- memory: a (chunk, micro-batch) is held from the start of its ``F`` to the start of its ``W``
  (of its ``B`` when the backward is not split), as ``Timeline.peak_pending_w`` counts it; a
  rank may hold ``memory_limit`` micro-batches of its whole share, i.e. ``memory_limit·v``
  chunk stashes;
- each stage runs the micro-batches of one kind in increasing order. Every schedule in the
  package does; it keeps messages on each channel in order and removes the solver's
  symmetric copies of one solution. "Optimal" below means optimal among such schedules.

The objective is the step time (the last action's end).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from .schedules import Action, Kind, Schedule
from .schedules.base import make_placement
from .simulate import Cost, simulate

__all__ = ["SearchResult", "search", "solve"]


@dataclass(frozen=True)
class SearchResult:
    """What :func:`solve` found.

    Attributes:
        schedule: the best schedule found (an ordinary, validated :class:`Schedule`).
        step_time: its step time in the cost units (the solver's objective).
        lower_bound: no schedule of the model is faster than this (proven by the solver).
        optimal: True when ``step_time == lower_bound``: proven optimal.
        wall_s: seconds the solver ran.
    """

    schedule: Schedule
    step_time: float
    lower_bound: float
    optimal: bool
    wall_s: float


def _scale(values: Sequence[float]) -> int:
    for scale in (1, 10, 100, 1000):
        if all(abs(x * scale - round(x * scale)) < 1e-9 for x in values):
            return scale
    return 1000


def _per_stage(name: str, cost: Cost, stages: int) -> list[float]:
    values = [float(cost)] * stages if isinstance(cost, (int, float)) else [float(c) for c in cost]
    if len(values) != stages or any(c < 0 for c in values):
        raise ValueError(f"{name} must be one number >= 0 or one per stage ({stages}), got {cost}")
    return values


def solve(p: int, m: int, t_f: Cost = 1, t_b: Cost = 1, t_w: Cost | None = 1, comm: float = 0,
          memory_limit: float | None = None, placement: str | Sequence[tuple[int, int]] = "loop",
          v: int | None = None, time_limit: float = 10.0, start_from: Schedule | None = None,
          workers: int = 1) -> SearchResult:
    """Find the schedule with the smallest step under a per-rank activation limit.

    Args:
        p: ranks. m: micro-batches.
        t_f, t_b, t_w: costs as in :func:`~minipipe.simulate.simulate` (one number, or one per
            stage). ``t_w=None`` or 0: the backward is not split (no ``W`` actions; ``B`` costs
            ``t_b + t_w``), the setting of GPipe and 1F1B.
        comm: latency of one message between two ranks.
        memory_limit: micro-batches of activations a rank may hold (of its whole share of
            the model; a V-placement chunk stash counts ``1/2``). ``None``: no limit.
        placement: ``"loop"`` (default, ``v = 1``), ``"v"`` (``v = 2``) or an explicit list.
        v: chunks per rank (default: 2 for ``"v"``, else 1).
        time_limit: seconds for the solver; beyond it the best schedule found is returned
            with ``optimal=False``.
        start_from: a schedule to start the solver from (a hint; any valid one helps).
        workers: solver threads (1 keeps it gentle on a shared machine).

    Raises:
        ValueError: bad sizes or costs, or no schedule fits the memory limit (the limit must
            allow at least one chunk stash per rank).
    """
    from ortools.sat.python import cp_model

    v = v if v is not None else (2 if placement == "v" else 1)
    where = make_placement(placement, p, v)
    stages = p * v
    split = t_w is not None and (not isinstance(t_w, (int, float)) or t_w > 0)
    costs = [_per_stage(n, c, stages) for n, c in (("t_f", t_f), ("t_b", t_b), ("t_w", t_w or 0))]
    if not split:
        costs[1] = [b + w for b, w in zip(costs[1], costs[2], strict=True)]
    scale = _scale([x for row in costs for x in row] + [comm])
    dur = [[round(x * scale) for x in row] for row in costs]
    lag = round(comm * scale)
    kinds = [Kind.F, Kind.B] + ([Kind.W] if split else [])
    capacity = m * v if memory_limit is None else int(Fraction(memory_limit).limit_denominator(1000) * v)
    if capacity < 1:
        raise ValueError(f"memory_limit={memory_limit} holds less than one chunk stash (1/{v})")
    horizon = sum(d for row in dur for d in row) * m + 2 * stages * m * lag

    model = cp_model.CpModel()
    start: dict[tuple[Kind, int, int], cp_model.IntVar] = {}
    end: dict[tuple[Kind, int, int], cp_model.IntVar] = {}
    per_rank: list[list] = [[] for _ in range(p)]
    for kind in kinds:
        for s in range(stages):
            d = dur[kinds.index(kind) if kind is not Kind.W else 2][s]
            for i in range(m):
                key = (kind, s, i)
                start[key] = model.NewIntVar(0, horizon, f"s{kind.value}{s}_{i}")
                end[key] = model.NewIntVar(0, horizon, f"e{kind.value}{s}_{i}")
                per_rank[where[s][0]].append(model.NewIntervalVar(start[key], d, end[key], ""))
                if i:  # micro-batches in order on each stage
                    model.Add(start[key] >= end[(kind, s, i - 1)])
    for r in range(p):
        model.AddNoOverlap(per_rank[r])

    def link(after: tuple, before: tuple, s_after: int, s_before: int) -> None:
        gap = lag if where[s_after][0] != where[s_before][0] else 0
        model.Add(start[after] >= end[before] + gap)

    release = Kind.W if split else Kind.B
    held: list[list] = [[] for _ in range(p)]
    for s in range(stages):
        for i in range(m):
            if s:
                link((Kind.F, s, i), (Kind.F, s - 1, i), s, s - 1)
            if s < stages - 1:
                link((Kind.B, s, i), (Kind.B, s + 1, i), s, s + 1)
            else:
                model.Add(start[(Kind.B, s, i)] >= end[(Kind.F, s, i)])
            if split:
                model.Add(start[(Kind.W, s, i)] >= end[(Kind.B, s, i)])
            size = model.NewIntVar(0, horizon, "")
            held[where[s][0]].append(model.NewIntervalVar(
                start[(Kind.F, s, i)], size, start[(release, s, i)], ""))
    if capacity < m * v:
        for r in range(p):
            model.AddCumulative(held[r], [1] * len(held[r]), capacity)

    makespan = model.NewIntVar(0, horizon, "step")
    model.AddMaxEquality(makespan, list(end.values()))
    model.Minimize(makespan)
    if start_from is not None:
        _hint(model, start, start_from, costs, comm, scale, split)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = workers
    t0 = time.perf_counter()
    status = solver.Solve(model)
    wall = time.perf_counter() - t0
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise ValueError(f"no schedule found for p={p}, m={m} under memory_limit={memory_limit} "
                         f"in {time_limit} s (solver status {solver.StatusName(status)})")
    orders = []
    for r in range(p):
        mine = [(solver.Value(start[k]), k) for k in start if where[k[1]][0] == r]
        mine.sort(key=lambda x: (x[0], kinds.index(x[1][0]), x[1][2]))
        orders.append([Action(kind, i, where[s][1]) for _, (kind, s, i) in mine])
    optimal = status == cp_model.OPTIMAL
    schedule = Schedule(orders, m=m, v=v, placement=placement,
                        name=f"{'optimal' if optimal else 'best-found'}@{memory_limit}")
    return SearchResult(schedule, solver.ObjectiveValue() / scale,
                        solver.BestObjectiveBound() / scale, optimal, wall)


def _hint(model, start: dict, schedule: Schedule, costs: list[list[float]], comm: float,
          scale: int, split: bool) -> None:
    """Give the solver the start times of ``schedule`` as a first solution to improve on."""
    if schedule.split_backward != split:
        raise ValueError("start_from must split the backward (have W actions) exactly when "
                         "the search does (t_w > 0)")
    timeline = simulate(schedule, costs[0], costs[1], costs[2] if split else None, comm)
    for e in timeline.events:
        key = (e.action.kind, schedule.stage(e.rank, e.action.chunk), e.action.mb)
        if key in start:
            model.AddHint(start[key], round(e.start * scale))


def search(p: int, m: int, t_f: Cost = 1, t_b: Cost = 1, t_w: Cost | None = 1, comm: float = 0,
           memory_limit: float | None = None, placement: str | Sequence[tuple[int, int]] = "loop",
           **options) -> Schedule:
    """:func:`solve`, returning only the schedule (named ``optimal@…`` or ``best-found@…``).

    Example:
        >>> s = search(2, 4, t_f=1, t_b=1, t_w=1, memory_limit=2)
        >>> simulate(s, 1, 1, 1).step_time
        13.0
    """
    return solve(p, m, t_f, t_b, t_w, comm, memory_limit, placement, **options).schedule
