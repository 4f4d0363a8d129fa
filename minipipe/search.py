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

The objective is the step time (the last action's end). What makes the proof fast (p ≤ 4,
m ≤ 8 in about a second, V placement included): per-rank bounds that the model implies but
the solver does not see (:func:`_rank_bounds`: a rank's work after its first action, after its
first ``B`` less the forwards the memory let it run before, and before its last ``B``), and
the fastest admitted schedule at hand (:func:`_known`: ``start_from`` or the package's own
for the placement) as first solution and horizon. Neither changes the optimum; the tests
compare with the bare model.
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
        step_time: its simulated step time in the cost units (the solver's objective when
            proven; a stopped solver's best may replay faster than its objective).
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


def _build(pb: _Problem, upper: int | None = None, redundant: bool = True):
    """The CP-SAT model: intervals, dependencies, memory, and the step to minimise.

    ``upper``: a step some known schedule reaches (it bounds every time); else every action
    one after the other, each message paid. ``redundant``: add :func:`_rank_bounds` (the
    tests solve without them too, to check that they leave the optimum unchanged).
    """
    from ortools.sat.python import cp_model

    stages = pb.p * pb.v
    horizon = upper if upper is not None else \
        sum(pb.duration(k, s) for k in pb.kinds for s in range(stages)) * pb.m \
        + 2 * stages * pb.m * round(pb.comm * pb.scale)
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
    if redundant:
        _rank_bounds(model, pb, start, end, step)
    model.Minimize(step)
    return model, start, end


def _rank_bounds(model, pb: _Problem, start: dict, end: dict, step) -> None:
    """Redundant bounds on ``step``, one set per rank (each implied by the model; they help the proof).

    On rank ``r`` with lowest stage ``lo`` and highest ``hi``: ``F(lo, 0)`` is its first
    action (every ``F`` of the rank waits for an ``F`` of ``lo``, micro-batches in order),
    ``B(hi, 0)`` its first ``B`` (every ``B`` waits for a ``B`` of ``hi``) and ``B(lo, m−1)``
    its last ``B``. Every ``W`` comes after the first ``B``; every ``F`` and ``B`` before the
    last ``B`` ends. Its actions never overlap, so

    1. ``step ≥ start F(lo, 0) + work`` (all its work after its first action);
    2. ``step ≥ start B(hi, 0) + work − F_C``: an ``F`` started before the first ``B`` still
       holds its stash then (its ``W`` comes later), so at most ``C`` (the capacity) did, and
       ``F_C``, the ``C`` longest ``F`` of the rank, bounds their work — the fill a memory
       limit forces: with nothing to release, a rank waits for its first ``B``;
    3. ``end B(lo, m−1) ≥ start F(lo, 0) + work − W_C`` and ``≥ start B(hi, 0) + work − F_C −
       W_C``: only ``W`` may run after the last ``B``, and each still holds its stash when
       that ``B`` ends, so at most ``C`` of them (``W_C``: the ``C`` longest); the chain of
       ``B`` below ``lo`` then adds the drain.
    (2 and 3 count stashes at an instant just before; they need ``F`` and ``B`` of positive
    length on the rank, else they are left out.)
    """
    for r in range(pb.p):
        mine = [s for s in range(pb.p * pb.v) if pb.where[s][0] == r]
        lo, hi = min(mine), max(mine)
        work = sum(pb.duration(k, s) for k in pb.kinds for s in mine) * pb.m
        model.Add(step >= start[(Kind.F, lo, 0)] + work)
        if min(pb.duration(k, s) for k in (Kind.F, Kind.B) for s in mine) == 0:
            continue
        f_c, w_c = (sum(sorted((pb.duration(k, s) for s in mine for _ in range(pb.m)),
                               reverse=True)[:pb.capacity]) if k in pb.kinds else 0
                    for k in (Kind.F, Kind.W))
        model.Add(step >= start[(Kind.B, hi, 0)] + work - f_c)
        model.Add(end[(Kind.B, lo, pb.m - 1)] >= start[(Kind.F, lo, 0)] + work - w_c)
        model.Add(end[(Kind.B, lo, pb.m - 1)] >= start[(Kind.B, hi, 0)] + work - f_c - w_c)


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
            with ``optimal=False`` (the fastest schedule at hand if the solver found none).
        start_from: a schedule to start the solver from (a hint). The package's schedules
            for the placement (ZB-H1/ZB-H2 or 1F1B/naive on the loop, ZB-V/DualPipeV on the
            V) are tried too; the fastest that fits the limit is the solver's first solution.
        workers: solver threads. 1 (default): the same answer on every run, and gentle on a
            shared machine; 2 was no faster on a busy 2-core one.

    Raises:
        ValueError: bad sizes or costs, a limit below one chunk stash, or nothing found in
            the time limit and no schedule at hand fits the limit.
    """
    from ortools.sat.python import cp_model

    pb = _problem(p, m, t_f, t_b, t_w, comm, memory_limit, placement, v)
    known = _known(pb, start_from)
    model, start, end = _build(pb, known[1] if known else None)
    if known or start_from is not None:
        _hint(model, start, end, known[0] if known else start_from, pb)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = workers
    # Probing expands each no-overlap into order literals once the horizon is tight (a known
    # schedule's step): seconds of presolve at p = 4, m = 8, and the proof needs none of it.
    solver.parameters.cp_model_probing_level = 0
    t0 = time.perf_counter()
    status = solver.Solve(model)
    wall = time.perf_counter() - t0
    bound = solver.BestObjectiveBound() / pb.scale
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if known is None:
            raise ValueError(f"no schedule found for p={p}, m={m} under memory_limit="
                             f"{memory_limit} in {time_limit} s ({solver.StatusName(status)})")
        kept = Schedule(known[0].ranks, m=m, v=pb.v, placement=known[0].placement,
                        name=f"best-found@{memory_limit}")  # the solver found nothing better
        return SearchResult(kept, known[1] / pb.scale, bound, False, wall)
    orders = []
    for r in range(p):
        mine = sorted(((solver.Value(t), pb.kinds.index(k[0]), k) for k, t in start.items()
                       if pb.where[k[1]][0] == r))
        orders.append([Action(kind, i, pb.where[s][1]) for _, _, (kind, s, i) in mine])
    optimal = status == cp_model.OPTIMAL
    schedule = Schedule(orders, m=m, v=pb.v, placement=placement,
                        name=f"{'optimal' if optimal else 'best-found'}@{memory_limit}")
    # The simulator plays the order as soon as possible: the solver's step when proven, and
    # often less when the time limit stopped it on a solution with idle gaps.
    step = _replay(schedule, pb).step_time / pb.scale
    return SearchResult(schedule, step, bound, optimal, wall)


def _known(pb: _Problem, start_from: Schedule | None) -> tuple[Schedule, int] | None:
    """The fastest schedule at hand that the model admits, and its step (solver units).

    At hand: ``start_from`` and the package's generators for this placement and backward
    (ZB-H1, ZB-H2, or 1F1B and naive unsplit, on the loop placement with ``v = 1``; ZB-V and
    DualPipeV on the V placement). Admitted: same sizes, placement and backward, micro-batches
    in order on each stage, within the memory limit. Its step bounds the optimum from above
    (the model's horizon) and its times are the solver's first solution; ``None`` if none.
    """
    from .schedules import dualpipev, naive, one_f_one_b, zb_h1, zb_h2, zb_v

    gens: tuple = ()
    if pb.v == 1 and pb.where == make_placement("loop", pb.p, 1):
        gens = (zb_h1, zb_h2) if pb.split else (one_f_one_b, naive)
    elif pb.v == 2 and pb.where == make_placement("v", pb.p, 2) and pb.split:
        gens = (zb_v, dualpipev) if pb.m >= 2 * pb.p else (zb_v,)
    best = None
    for s in ([start_from] if start_from is not None else []) + [g(pb.p, pb.m) for g in gens]:
        if (s.p, s.m, s.v, s.split_backward) != (pb.p, pb.m, pb.v, pb.split) \
                or s.placement != pb.where or not _in_order(s):
            continue
        tl = _replay(s, pb)
        if max(tl.peak_pending_w) <= pb.capacity and (best is None or tl.step_time < best[1]):
            best = (s, round(tl.step_time))
    return best


def _in_order(s: Schedule) -> bool:
    """Each rank runs the micro-batches of each (kind, chunk) in increasing order."""
    for rank in s.ranks:
        last: dict[tuple[Kind, int], int] = {}
        for a in rank:
            if last.get((a.kind, a.chunk), -1) >= a.mb:
                return False
            last[(a.kind, a.chunk)] = a.mb
    return True


def _replay(schedule: Schedule, pb: _Problem):
    """``schedule`` played by the simulator in the solver's integer time units."""
    stages = range(pb.p * pb.v)
    f, b, w = ([pb.duration(k, s) for s in stages] for k in (Kind.F, Kind.B, Kind.W))
    return simulate(schedule, f, b, w if pb.split else None, round(pb.comm * pb.scale))


def _hint(model, start: dict, end: dict, schedule: Schedule, pb: _Problem) -> None:
    """Give the solver the times of ``schedule`` as a first solution to improve on."""
    if schedule.split_backward != pb.split:
        raise ValueError("start_from must split the backward (have W actions) exactly when "
                         "the search does (t_w > 0)")
    for e in _replay(schedule, pb).events:
        key = (e.action.kind, schedule.stage(e.rank, e.action.chunk), e.action.mb)
        model.AddHint(start[key], round(e.start))
        model.AddHint(end[key], round(e.end))


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
