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

from collections.abc import Sequence

from .dataflow import Invalid, compile_schedule, play
from .schedules import Schedule
from .timeline import Timeline
from .validate import ScheduleError, validate

__all__ = ["Cost", "simulate"]

Cost = float | Sequence[float]  #: one number for every stage, or one per pipeline stage



# ---------------------------------------------------------------------------- the simulator


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
    ``F``), ``W`` for its ``B``; a dependency on another rank (the schedule's placement says
    which stage runs where) adds ``comm``, one on the same rank nothing.

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
    try:
        starts, ends = play(compile_schedule(schedule, tuple(costs), float(comm)))
    except Invalid as err:
        validate(schedule)  # raises the full ScheduleError with the schedule drawn
        raise ScheduleError(str(err), schedule) from None  # should not happen
    return Timeline.from_columns(schedule, starts, ends, source="simulated")
