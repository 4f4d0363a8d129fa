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


@dataclass
class _Problem:
    """The inputs in the solver's terms: integer durations, placement, memory capacity."""

    p: int
    m: int
    v: int
    where: tuple[tuple[int, int], ...]  # (rank, chunk) of each stage
    costs: list[list[float]]  # t_f, t_b (+ t_w when not split), t_w per stage
    split: bool
    comm: float
    scale: int
    capacity: int  # chunk stashes per rank

    @property
    def kinds(self) -> list[Kind]:
        return [Kind.F, Kind.B] + ([Kind.W] if self.split else [])

    def duration(self, kind: Kind, stage: int) -> int:
        return round(self.costs[{Kind.F: 0, Kind.B: 1, Kind.W: 2}[kind]][stage] * self.scale)

    def lag(self, a: int, b: int) -> int:  # message latency between the ranks of stages a, b
        return round(self.comm * self.scale) if self.where[a][0] != self.where[b][0] else 0


def _problem(p, m, t_f, t_b, t_w, comm, memory_limit, placement, v) -> _Problem:
    v = v if v is not None else (2 if placement == "v" else 1)
    where = make_placement(placement, p, v)
    stages = p * v
    split = t_w is not None and (not isinstance(t_w, (int, float)) or t_w > 0)
    costs = [_per_stage(n, c, stages) for n, c in (("t_f", t_f), ("t_b", t_b), ("t_w", t_w or 0))]
    if not split:
        costs[1] = [b + w for b, w in zip(costs[1], costs[2], strict=True)]
    if p < 1 or m < 1 or comm < 0:
        raise ValueError(f"need p >= 1, m >= 1 and comm >= 0, got p={p}, m={m}, comm={comm}")
    capacity = m * v if memory_limit is None else int(
        Fraction(memory_limit).limit_denominator(1000) * v)
    if capacity < 1:
        raise ValueError(f"memory_limit={memory_limit} holds less than one chunk stash (1/{v})")
    scale = _scale([x for row in costs for x in row] + [comm])
    return _Problem(p, m, v, where, costs, split, comm, scale, min(capacity, m * v))


def _build(pb: _Problem):
    """The CP-SAT model: intervals, dependencies, memory, and the step to minimise."""
    from ortools.sat.python import cp_model

    stages = pb.p * pb.v
    horizon = sum(pb.duration(k, s) for k in pb.kinds for s in range(stages)) * pb.m \
        + 2 * stages * pb.m * pb.lag(0, 1 % stages)
    model = cp_model.CpModel()
    start: dict[tuple[Kind, int, int], cp_model.IntVar] = {}
    end: dict[tuple[Kind, int, int], cp_model.IntVar] = {}
    busy: list[list] = [[] for _ in range(pb.p)]
    for kind, s, i in ((k, s, i) for k in pb.kinds for s in range(stages) for i in range(pb.m)):
        key = (kind, s, i)
        start[key] = model.NewIntVar(0, horizon, "")
        end[key] = model.NewIntVar(0, horizon, "")
        busy[pb.where[s][0]].append(model.NewIntervalVar(start[key], pb.duration(kind, s),
                                                         end[key], ""))
        if i:  # micro-batches in order on each stage
            model.Add(start[key] >= end[(kind, s, i - 1)])
    for r in range(pb.p):
        model.AddNoOverlap(busy[r])
    release = Kind.W if pb.split else Kind.B
    held: list[list] = [[] for _ in range(pb.p)]
    for s, i in ((s, i) for s in range(stages) for i in range(pb.m)):
        if s:  # F waits for the stage before
            model.Add(start[(Kind.F, s, i)] >= end[(Kind.F, s - 1, i)] + pb.lag(s, s - 1))
        if s < stages - 1:  # B waits for the stage after; the last stage for its own F
            model.Add(start[(Kind.B, s, i)] >= end[(Kind.B, s + 1, i)] + pb.lag(s, s + 1))
        else:
            model.Add(start[(Kind.B, s, i)] >= end[(Kind.F, s, i)])
        if pb.split:
            model.Add(start[(Kind.W, s, i)] >= end[(Kind.B, s, i)])
        held[pb.where[s][0]].append(model.NewIntervalVar(
            start[(Kind.F, s, i)], model.NewIntVar(0, horizon, ""), start[(release, s, i)], ""))
    if pb.capacity < pb.m * pb.v:
        for r in range(pb.p):
            model.AddCumulative(held[r], [1] * len(held[r]), pb.capacity)
    step = model.NewIntVar(0, horizon, "step")
    model.AddMaxEquality(step, list(end.values()))
    for r in range(pb.p):  # implied, but it helps the proof: a rank starts with its first
        first = min(s for s in range(stages) if pb.where[s][0] == r)  # stage's first F and
        work = sum(pb.duration(k, s) for k in pb.kinds for s in range(stages)  # then works
                   if pb.where[s][0] == r) * pb.m
        model.Add(step >= start[(Kind.F, first, 0)] + work)
    model.Minimize(step)
    return model, start, end


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
            with ``optimal=False`` (``start_from`` itself if the solver found nothing better).
        start_from: a schedule to start the solver from (a hint; any valid one helps).
        workers: solver threads (1 keeps it gentle on a shared machine).

    Raises:
        ValueError: bad sizes or costs, a limit below one chunk stash, or nothing found in
            the time limit without ``start_from``.
    """
    from ortools.sat.python import cp_model

    pb = _problem(p, m, t_f, t_b, t_w, comm, memory_limit, placement, v)
    model, start, end = _build(pb)
    if start_from is not None:
        _hint(model, start, end, start_from, pb)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = workers
    t0 = time.perf_counter()
    status = solver.Solve(model)
    wall = time.perf_counter() - t0
    bound = solver.BestObjectiveBound() / pb.scale
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if start_from is None:
            raise ValueError(f"no schedule found for p={p}, m={m} under memory_limit="
                             f"{memory_limit} in {time_limit} s ({solver.StatusName(status)})")
        kept = Schedule(start_from.ranks, m=m, v=pb.v, placement=start_from.placement,
                        name=f"best-found@{memory_limit}")  # the solver found nothing better
        return SearchResult(kept, _replay(kept, pb).step_time, bound, False, wall)
    orders = []
    for r in range(p):
        mine = sorted(((solver.Value(t), pb.kinds.index(k[0]), k) for k, t in start.items()
                       if pb.where[k[1]][0] == r))
        orders.append([Action(kind, i, pb.where[s][1]) for _, _, (kind, s, i) in mine])
    optimal = status == cp_model.OPTIMAL
    schedule = Schedule(orders, m=m, v=pb.v, placement=placement,
                        name=f"{'optimal' if optimal else 'best-found'}@{memory_limit}")
    return SearchResult(schedule, solver.ObjectiveValue() / pb.scale, bound, optimal, wall)


def _replay(schedule: Schedule, pb: _Problem):
    return simulate(schedule, pb.costs[0], pb.costs[1], pb.costs[2] if pb.split else None, pb.comm)


def _hint(model, start: dict, end: dict, schedule: Schedule, pb: _Problem) -> None:
    """Give the solver the times of ``schedule`` as a first solution to improve on."""
    if schedule.split_backward != pb.split:
        raise ValueError("start_from must split the backward (have W actions) exactly when "
                         "the search does (t_w > 0)")
    for e in _replay(schedule, pb).events:
        key = (e.action.kind, schedule.stage(e.rank, e.action.chunk), e.action.mb)
        model.AddHint(start[key], round(e.start * pb.scale))
        model.AddHint(end[key], round(e.end * pb.scale))


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
