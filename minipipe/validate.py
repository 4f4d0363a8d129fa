"""Check a schedule before any process starts: completeness, order, messages, deadlock.

The runtime moves data with point-to-point messages: after an action a rank posts its sends
without waiting for them (they are waited for at the end of the step), and before an action
it waits for the receives that action needs. Every stage boundary that crosses ranks is two
*channels*, one per direction (the activations of stage ``s`` to ``s + 1``, the gradients of
``s + 1`` to ``s``), and each channel delivers in the order it is sent, independently of the
others (a tag per channel). Neighbouring stages on one rank hand tensors over in memory.
:func:`dry_run` plays exactly that protocol without processes, so a schedule that passes
:func:`validate` cannot hang the runtime.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .dataflow import Invalid, check_runs, compile_schedule, crossing_edges, play
from .schedules import Action, Kind, Schedule

__all__ = ["ScheduleError", "Message", "Step", "comm_plan", "dry_run", "validate", "format_orders",
           "messages_per_step"]


class ScheduleError(ValueError):
    """A schedule that cannot run: names the rank, the action and the reason.

    Attributes:
        rank: the rank at fault (or ``None``).
        action: the action at fault (or ``None``).
        reason: the plain-words reason, without the schedule drawing.
    """

    def __init__(self, reason: str, schedule: Schedule | None = None,
                 rank: int | None = None, action: Action | None = None,
                 marks: dict[int, int] | None = None) -> None:
        self.reason, self.rank, self.action, self.schedule = reason, rank, action, schedule
        text = reason
        if schedule is not None:
            text += "\n" + format_orders(schedule, marks or {})
        super().__init__(text)


@dataclass(frozen=True)
class Message:
    """One point-to-point message: the activation (forward) or its gradient (backward).

    ``stage`` is the pipeline stage that produces it; ``src`` and ``dst`` are ranks.
    """

    kind: str  # "activation" or "gradient"
    mb: int
    stage: int
    src: int
    dst: int

    @property
    def channel(self) -> tuple[str, int]:
        """``(kind, stage)``: activations of stage ``s`` go to ``s + 1``, gradients to ``s − 1``;
        each channel delivers in the order it is sent, independently of the others."""
        return (self.kind, self.stage)

    def __str__(self) -> str:
        return f"{self.kind} of micro-batch {self.mb} (stage {self.stage}) {self.src}→{self.dst}"


@dataclass(frozen=True)
class Step:
    """What a rank does around one action: receive, compute, then queue its sends."""

    recvs: tuple[Message, ...]
    action: Action
    sends: tuple[Message, ...]


def _messages(schedule: Schedule, rank: int, a: Action) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
    """(receives needed before, sends produced after) action ``a`` on ``rank``.

    The neighbouring stage's rank comes from the schedule's placement; a neighbour on the same
    rank is handed the tensor in memory (no message).
    """
    place = schedule.placement
    s = schedule.stage(rank, a.chunk)
    before = rank if schedule.is_first(s) else place[s - 1][0]  # this rank: no message
    after = rank if schedule.is_last(s) else place[s + 1][0]
    recvs: list[Message] = []
    sends: list[Message] = []
    if a.kind is Kind.F:
        if before != rank:
            recvs.append(Message("activation", a.mb, s - 1, before, rank))
        if after != rank:
            sends.append(Message("activation", a.mb, s, rank, after))
    elif a.kind is Kind.B:
        if after != rank:
            recvs.append(Message("gradient", a.mb, s + 1, after, rank))
        if before != rank:
            sends.append(Message("gradient", a.mb, s, rank, before))
    return tuple(recvs), tuple(sends)


def comm_plan(schedule: Schedule) -> list[list[Step]]:
    """Per rank, each action with the messages it receives before and sends after it."""
    plan = []
    for r, order in enumerate(schedule.ranks):
        steps = []
        for a in order:
            recvs, sends = _messages(schedule, r, a)
            steps.append(Step(recvs, a, sends))
        plan.append(steps)
    return plan


def messages_per_step(schedule: Schedule) -> int:
    """Point-to-point messages of one step: an activation and a gradient per micro-batch on
    every stage boundary that crosses ranks (each travelled by ``m / pipelines`` of them)."""
    return 2 * schedule.group_mbs * len(crossing_edges(schedule))


def format_orders(schedule: Schedule, marks: dict[int, int] | None = None) -> str:
    """Each rank's order on one line; ``marks[rank] = index`` brackets that action."""
    marks = marks or {}
    show = schedule.v > 1
    lines = []
    for r, order in enumerate(schedule.ranks):
        cells = [f"[{a.label(show)}]" if marks.get(r) == k else a.label(show) for k, a in enumerate(order)]
        if marks.get(r) == len(order):
            cells.append("[end]")
        lines.append(f"  rank {r}: " + " ".join(cells))
    return "\n".join(lines)


def _check_complete(schedule: Schedule, m: int, v: int) -> None:
    kinds = [Kind.F, Kind.B] + ([Kind.W] if schedule.split_backward else [])
    for r, order in enumerate(schedule.ranks):
        seen: dict[Action, int] = {}
        for k, a in enumerate(order):
            if a.mb >= m or a.chunk >= v:
                raise ScheduleError(
                    f"rank {r} runs {a.describe()}, but the schedule has micro-batches 0..{m - 1}"
                    f" and chunks 0..{v - 1}", schedule, r, a, {r: k})
            if a in seen:
                raise ScheduleError(
                    f"rank {r} runs {a.describe()} twice (positions {seen[a]} and {k})",
                    schedule, r, a, {r: k})
            seen[a] = k
        for c in range(v):
            visits = schedule.mbs_of_stage(schedule.stage(r, c)) if m == schedule.m else range(m)
            for a, k in seen.items():
                if a.chunk == c and a.mb not in visits:
                    raise ScheduleError(
                        f"rank {r} runs {a.describe()}, but micro-batch {a.mb} travels pipeline "
                        f"{schedule.group_of(a.mb)}, not chunk {c}'s (micro-batches "
                        f"{visits.start}..{visits.stop - 1})", schedule, r, a, {r: k})
            for i in visits:
                for kind in kinds:
                    a = Action(kind, i, c)
                    if a not in seen:
                        raise ScheduleError(f"rank {r} never runs {a.describe()}", schedule, r, a)
        for a, k in seen.items():
            before = {Kind.B: Kind.F, Kind.W: Kind.B}.get(a.kind)
            if before is not None:
                need = Action(before, a.mb, a.chunk)
                if seen[need] > k:
                    raise ScheduleError(
                        f"rank {r} runs {a.describe()} before its {before.value}",
                        schedule, r, a, {r: k})


def _check_local_deps(schedule: Schedule) -> None:
    """Neighbouring stages on the same rank: the tensor handed over must exist already."""
    place = schedule.placement
    for r, order in enumerate(schedule.ranks):
        pos = {a: k for k, a in enumerate(order)}
        for a, k in pos.items():
            s = schedule.stage(r, a.chunk)
            dep = None
            if a.kind is Kind.F and not schedule.is_first(s) and place[s - 1][0] == r:
                dep = Action(Kind.F, a.mb, place[s - 1][1])
            if a.kind is Kind.B and not schedule.is_last(s) and place[s + 1][0] == r:
                dep = Action(Kind.B, a.mb, place[s + 1][1])
            if dep is not None and pos[dep] > k:
                raise ScheduleError(
                    f"rank {r} runs {a.describe()} before {dep.describe()}, which it needs",
                    schedule, r, a, {r: k})


def _check_channels(schedule: Schedule, plan: list[list[Step]]) -> None:
    """Each channel (one stage boundary, one direction) is received in the order it is sent."""
    sent: dict[tuple[str, int], list[tuple[Message, int]]] = defaultdict(list)
    received: dict[tuple[str, int], list[tuple[Message, int]]] = defaultdict(list)
    for steps in plan:
        for k, step in enumerate(steps):
            for msg in step.sends:
                sent[msg.channel].append((msg, k))
            for msg in step.recvs:
                received[msg.channel].append((msg, k))
    for channel, recvs in received.items():
        for (want, k_dst), (got, k_src) in zip(recvs, sent.get(channel, [])):
            if want != got:
                src, dst = want.src, want.dst
                a = schedule.ranks[dst][k_dst]
                show = schedule.v > 1  # with chunks, kind and micro-batch do not name a message
                raise ScheduleError(
                    f"rank {dst} runs {a.describe()} and waits for the {want.kind} of micro-batch "
                    f"{want.mb}{_at(want, show)} from rank {src}, but rank {src} sends the "
                    f"{got.kind} of micro-batch {got.mb}{_at(got, show)} on that channel first "
                    f"(after its {schedule.ranks[src][k_src].label(show)}); each channel (one "
                    f"stage boundary, one direction) delivers messages in the order they are sent",
                    schedule, dst, a, {dst: k_dst, src: k_src})


def _at(msg: Message, show: bool) -> str:
    return f" (stage {msg.stage})" if show else ""


def _dry_run_ticks(schedule: Schedule) -> list[list[tuple[int, Action]]]:
    """The dry run played tick by tick (the plain reference for :func:`dry_run`)."""
    plan = comm_plan(schedule)
    p = schedule.p
    pos = [0] * p
    posted: set[Message] = set()  # sends never block: posted once the producing action ran
    ran: list[list[tuple[int, Action]]] = [[] for _ in range(p)]
    tick = 0
    while any(pos[r] < len(plan[r]) for r in range(p)):
        runnable = [r for r in range(p)
                    if pos[r] < len(plan[r]) and posted.issuperset(plan[r][pos[r]].recvs)]
        if not runnable:
            stuck = [r for r in range(p) if pos[r] < len(plan[r])]
            waits = []
            show = schedule.v > 1
            for r in stuck:
                step = plan[r][pos[r]]
                what = "; ".join(f"the {m.kind} of micro-batch {m.mb}{_at(m, show)} from rank "
                                 f"{m.src}" for m in step.recvs if m not in posted)
                waits.append(f"rank {r} waits at {step.action.label(show)} for {what}")
            first = stuck[0]
            raise ScheduleError(
                "deadlock: every unfinished rank waits for a message no rank will send yet.\n  "
                + "\n  ".join(waits),
                schedule, first, plan[first][pos[first]].action, {r: pos[r] for r in stuck})
        for r in runnable:  # one tick: each runnable rank runs one action, then sends
            step = plan[r][pos[r]]
            ran[r].append((tick, step.action))
            posted.update(step.sends)
            pos[r] += 1
        tick += 1
    return ran


def dry_run(schedule: Schedule) -> list[list[tuple[int, Action]]]:
    """Play the runtime's message protocol without processes.

    Returns:
        Per rank, ``(tick, action)`` pairs: in each tick every rank whose next action has
        all its messages available runs it. Useful as a timestep × rank grid.

    Raises:
        ScheduleError: the ranks deadlock; names each stuck rank and what it waits for.
    """
    try:
        plan = compile_schedule(schedule)
        starts = play(plan)[0].astype(int).tolist()
    except Invalid:
        return _dry_run_ticks(schedule)  # incomplete or stuck: play it tick by tick
    b = plan.bounds.tolist()
    return [list(zip(starts[b[r]:b[r + 1]], order)) for r, order in enumerate(schedule.ranks)]


def validate(schedule: Schedule, m: int | None = None, v: int | None = None) -> Schedule:
    """Check that ``schedule`` can run, and return it.

    Every (chunk, micro-batch) has exactly one F and one B (and W, if any) per rank, in
    dependency order; each channel is received in the order it is sent; and the dry run of
    the message protocol finishes without deadlock.

    The checks run in time linear in the number of actions (:mod:`minipipe.dataflow`); when
    one fails, the plain checks below find the first problem and explain it.

    Args:
        schedule: the schedule to check. m, v: expected micro-batches and chunks per rank
            (default: the schedule's own ``m`` and ``v``).

    Raises:
        ScheduleError: the first problem found, naming the rank, the action and the reason.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"expected a Schedule, got {type(schedule).__name__}")
    m = schedule.m if m is None else m
    v = schedule.v if v is None else v
    if m < 1 or not any(schedule.ranks):
        raise ScheduleError("the schedule has no actions", schedule)
    fast_error = None
    if (m, v) == (schedule.m, schedule.v):
        try:
            check_runs(compile_schedule(schedule, timed=False))
            return schedule
        except Invalid as err:
            fast_error = err  # explain it below
    _check_complete(schedule, m, v)
    _check_local_deps(schedule)
    _check_channels(schedule, comm_plan(schedule))
    _dry_run_ticks(schedule)
    if fast_error is not None:  # the plain checks found nothing: a bug in one of the two
        raise ScheduleError(f"{fast_error} (but the plain checks pass: please report)", schedule)
    return schedule
