"""A timeline of one optimizer step, simulated or measured, and every figure read off it.

:func:`~minipipe.simulate.simulate` produces one; the runtime builds the same type from what it
measures on real ranks (``source="measured"``). Every figure (step time, both bubbles, peak
in-flight micro-batches) is computed from the events alone, so predicted and measured timelines
are read the same way. :func:`text_timeline` draws one as text (no matplotlib).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from .schedules import Action, Kind, Schedule
from .validate import messages_per_step

__all__ = ["Event", "Timeline", "text_timeline"]

_KIND = {Kind.F: 0, Kind.B: 1, Kind.W: 2}


@dataclass(frozen=True, slots=True)
class Event:
    """One action run on one rank, from ``start`` to ``end`` (any time unit, e.g. seconds)."""

    rank: int
    action: Action
    start: float
    end: float

    @property
    def duration(self) -> float:
        """``end - start``."""
        return self.end - self.start


class Timeline:
    """Timed events of one optimizer step, simulated or measured, and the figures read off them.

    Every figure is computed from the events and ``schedule`` only, so a timeline the runtime
    measured (``source="measured"``) is read exactly like a simulated one. The events are kept
    as columns (numpy arrays, rank by rank in start order); :attr:`events` builds the
    :class:`Event` objects on first use, so a simulated step of half a million actions costs
    no objects until someone looks at them.

    Attributes:
        schedule: the schedule that was run.
        events: one :class:`Event` per action (built on demand from the columns).
        source: ``"simulated"`` or ``"measured"`` (shown in plots and summaries).
    """

    def __init__(self, schedule: Schedule, events: Sequence[Event] = (),
                 source: str = "simulated") -> None:
        self.schedule, self.source = schedule, source
        events = sorted(events, key=lambda e: (e.rank, e.start, e.end))  # stable: ties kept
        self._events: list[Event] | None = events
        self._ranks = np.array([e.rank for e in events], np.int64)
        self._kinds = np.array([_KIND[e.action.kind] for e in events], np.int64)
        self._starts = np.array([e.start for e in events], float)
        self._ends = np.array([e.end for e in events], float)

    @classmethod
    def from_columns(cls, schedule: Schedule, starts: np.ndarray, ends: np.ndarray,
                     source: str = "simulated") -> Timeline:
        """The timeline of ``schedule`` whose actions (in :meth:`Schedule.columns` order: rank
        by rank, each in its order) start and end at ``starts`` and ``ends``."""
        timeline = cls.__new__(cls)
        timeline.schedule, timeline.source, timeline._events = schedule, source, None
        kinds, _, _, bounds = schedule.columns()
        timeline._ranks = np.repeat(np.arange(schedule.p), np.diff(bounds))
        timeline._kinds, timeline._starts, timeline._ends = kinds, starts, ends
        return timeline

    @property
    def events(self) -> list[Event]:
        """One :class:`Event` per action, rank by rank, each rank's in start order."""
        if self._events is None:
            self._events = _events(self.schedule, self._starts.tolist(), self._ends.tolist())
        return self._events

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Timeline):
            return NotImplemented
        return (self.schedule, self.source, self.events) == (other.schedule, other.source,
                                                              other.events)

    __hash__ = None  # type: ignore[assignment]  (mutable-free but compared by value)

    # ------------------------------------------------------------------ time and bubbles

    @property
    def p(self) -> int:
        """Number of ranks."""
        return self.schedule.p

    @property
    def start(self) -> float:
        """Earliest event start (0 for a simulated timeline)."""
        return float(self._starts.min()) if self._starts.size else 0.0

    @property
    def step_time(self) -> float:
        """Wall time of the step: last end minus first start, over all ranks."""
        if not self._ends.size:
            return 0.0
        return float(self._ends.max()) - self.start

    def _bounds(self) -> list[int]:
        return np.searchsorted(self._ranks, np.arange(self.p + 1)).tolist()

    def busy_per_rank(self) -> list[float]:
        """Time each rank spends computing (sum of its event durations)."""
        b, durations = self._bounds(), self._ends - self._starts
        return [float(np.cumsum(durations[b[r]:b[r + 1]])[-1]) if b[r + 1] > b[r] else 0.0
                for r in range(self.p)]

    def busy(self, rank: int) -> float:
        """Time ``rank`` spends computing."""
        return self.busy_per_rank()[rank]

    def idle(self, rank: int) -> float:
        """Time ``rank`` waits during the step: ``step_time - busy(rank)``."""
        return self.step_time - self.busy(rank)

    def idle_per_rank(self) -> list[float]:
        """``step_time - busy`` for every rank."""
        step = self.step_time
        return [step - b for b in self.busy_per_rank()]

    @property
    def bubble_fraction(self) -> float:
        """Share of the step the ranks wait: total idle / (p · step_time).

        What a stopwatch measures; ``(p − 1)/(m + p − 1)`` for GPipe and 1F1B on equal stages.
        """
        step = self.step_time
        return sum(self.idle_per_rank()) / (self.p * step) if step > 0 else 0.0

    @property
    def bubble_fraction_per_rank(self) -> list[float]:
        """Idle / step_time, rank by rank."""
        step = self.step_time
        return [i / step if step > 0 else 0.0 for i in self.idle_per_rank()]

    @property
    def bubble_overhead(self) -> float:
        """Idle time relative to useful work: total idle / total busy (can exceed 1).

        Megatron-LM's "bubble time fraction"; ``(p − 1)/m`` for GPipe and 1F1B on equal stages.
        """
        busy = sum(self.busy_per_rank())
        return sum(self.idle_per_rank()) / busy if busy > 0 else 0.0

    @property
    def bubble_overhead_per_rank(self) -> list[float]:
        """Idle / busy, rank by rank (``inf`` for a rank that never computes)."""
        step = self.step_time
        return [(step - b) / b if b > 0 else float("inf") for b in self.busy_per_rank()]

    # ------------------------------------------------------------------ memory and messages

    def rank_events(self, rank: int) -> list[Event]:
        """``rank``'s events in start order."""
        b = self._bounds()
        return self.events[b[rank]:b[rank + 1]]

    def _peak(self, release: Kind) -> list[int]:
        """Per rank, the most (chunk, micro-batch) with F run and the ``release`` action not yet."""
        b = self._bounds()
        held = np.cumsum((self._kinds == 0).astype(np.int64) - (self._kinds == _KIND[release]))
        base = np.concatenate(([0], held))
        return [max(0, int((held[b[r]:b[r + 1]] - base[b[r]]).max())) if b[r + 1] > b[r] else 0
                for r in range(self.p)]

    @property
    def peak_inflight(self) -> list[int]:
        """Per rank, the most (chunk, micro-batch) whose F has run and whose B has not finished.

        Activations a rank must keep for its backward: ``m`` per rank for GPipe,
        ``min(p − r, m)`` on rank ``r`` for 1F1B.
        """
        return self._peak(Kind.B)

    @property
    def peak_pending_w(self) -> list[int]:
        """Per rank, the most (chunk, micro-batch) whose F has run and whose W has not.

        The memory figure for split-backward schedules (the weight gradient still needs the
        stage's input); equals :attr:`peak_inflight` when the schedule has no W actions.
        """
        return self._peak(Kind.W if self.schedule.split_backward else Kind.B)

    @property
    def messages(self) -> int:
        """Point-to-point messages per step (activations forward, gradients backward): two per
        micro-batch on every stage boundary that crosses ranks (none between stages that the
        placement puts on one rank)."""
        return messages_per_step(self.schedule)

    # ------------------------------------------------------------------ reports

    def summary(self) -> dict[str, Any]:
        """The timeline's figures as a dict (for a table, a notebook checkpoint or JSON)."""
        s = self.schedule
        return {
            "schedule": s.name,
            "source": self.source,
            "p": s.p,
            "m": s.m,
            "v": s.v,
            "step_time": self.step_time,
            "busy": self.busy_per_rank(),
            "bubble_fraction": self.bubble_fraction,
            "bubble_overhead": self.bubble_overhead,
            "bubble_fraction_per_rank": self.bubble_fraction_per_rank,
            "peak_inflight": self.peak_inflight,
            "peak_pending_w": self.peak_pending_w,
            "messages": self.messages,
        }

    def title(self) -> str:
        """One line: name, sizes, step time and both bubbles (used by plots and ``str``)."""
        s = self.schedule
        where = "" if s.placement_name == "loop" else f" {s.placement_name}-placed"
        return (f"{s.name} p={s.p} m={s.m} v={s.v}{where} ({self.source}): "
                f"step {self.step_time:.4g}, "
                f"bubble {self.bubble_fraction:.1%} of step, {self.bubble_overhead:.1%} of work")

    def __str__(self) -> str:

        return self.title() + "\n" + text_timeline(self)

    def __repr__(self) -> str:
        s = self.schedule
        return (f"Timeline({s.name} p={s.p} m={s.m} v={s.v}, {len(self._starts)} events, "
                f"source={self.source!r}, step_time={self.step_time:.4g})")

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the text timeline
        printer.text(str(self))

    def to_chrome_trace(self, scale: float = 1e6) -> list[dict[str, Any]]:
        """Events in the Chrome / Perfetto trace format (complete events, ``"ph": "X"``).

        Save with ``json.dump({"traceEvents": tl.to_chrome_trace()}, f)`` and open the file in
        https://ui.perfetto.dev or ``chrome://tracing``: one row (``tid``) per rank.

        Args:
            scale: microseconds per timeline time unit (default 1e6: event times in seconds).
        """
        show = self.schedule.v > 1
        t0 = self.start
        return [
            {
                "name": e.action.label(show),
                "cat": e.action.kind.value,
                "ph": "X",
                "ts": (e.start - t0) * scale,
                "dur": (e.end - e.start) * scale,
                "pid": 0,
                "tid": e.rank,
                "args": {"mb": e.action.mb, "chunk": e.action.chunk,
                         "stage": self.schedule.stage(e.rank, e.action.chunk)},
            }
            for e in self.events
        ]



def text_timeline(timeline: Timeline, width: int = 100) -> str:
    """The timeline as ``p`` lines of text, one per rank, ``width`` characters of time each.

    Legend: each character is ``step_time / width`` of time. An action starts with its label
    in capitals (``F3`` forward of micro-batch 3, ``B3`` backward, ``W3`` weight gradient;
    ``1F3`` on chunk 1) and goes on in lower case (``F3fff``); an action too short for its
    label shows its letter alone. ``.`` is idle.

    Example: ``text_timeline(simulate(one_f_one_b(2, 2), t_f=1, t_b=2), width=27)``::

        0 |F0fF1f......B0bbbb...B1bbbb|
        1 |...F0fB0bbbbF1fB1bbbb......|
    """
    p, t0, step = timeline.p, timeline.start, timeline.step_time
    rows = [["."] * width for _ in range(p)]
    if step > 0:
        scale = width / step
        show_chunk = timeline.schedule.v > 1
        for e in sorted(timeline.events, key=lambda e: e.start):
            row = rows[e.rank]
            a = min(round((e.start - t0) * scale), width - 1)
            b = min(max(round((e.end - t0) * scale), a + 1), width)
            if b - a == 1 and row[a] != ".":
                continue  # a sliver that rounds onto a cell already drawn
            label = e.action.label(show_chunk)
            if b - a < len(label):
                label = e.action.kind.value
            fill = e.action.kind.value.lower()
            row[a:b] = list(label + fill * (b - a - len(label)))
    digits = len(str(p - 1))
    return "\n".join(f"{r:>{digits}} |{''.join(row)}|" for r, row in enumerate(rows))


def _events(schedule: Schedule, starts: list[float], ends: list[float]) -> list[Event]:
    """``[Event(r, a, s, e) ...]`` for every action of ``schedule`` in its order, fast.

    Fills the slots column by column from C (``map`` over the slot setters, which a frozen
    dataclass does not intercept) instead of calling ``Event.__init__`` once per action.
    """
    actions = [a for order in schedule.ranks for a in order]
    ranks = [r for r, order in enumerate(schedule.ranks) for _ in order]
    events = list(map(object.__new__, repeat(Event, len(actions))))
    for name, values in (("rank", ranks), ("action", actions), ("start", starts), ("end", ends)):
        deque(map(getattr(Event, name).__set__, events, values), maxlen=0)
    return events
