"""A timeline of one optimizer step, simulated or measured, and every figure read off it.

:func:`~minipipe.simulate.simulate` produces one; the runtime builds the same type from what it
measures on real ranks (``source="measured"``). Every figure (step time, both bubbles, peak
in-flight micro-batches) is computed from the events alone, so predicted and measured timelines
are read the same way. :func:`text_timeline` draws one as text (no matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schedules import Action, Kind, Schedule
from .validate import messages_per_step

__all__ = ["Event", "Timeline", "text_timeline"]


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


@dataclass(repr=False)
class Timeline:
    """Timed events of one optimizer step, simulated or measured, and the figures read off them.

    Every figure is computed from ``events`` and ``schedule`` only, so a timeline the runtime
    measured (``source="measured"``) is read exactly like a simulated one.

    Attributes:
        schedule: the schedule that was run.
        events: one :class:`Event` per action, any order.
        source: ``"simulated"`` or ``"measured"`` (shown in plots and summaries).
    """

    schedule: Schedule
    events: list[Event]
    source: str = "simulated"

    # ------------------------------------------------------------------ time and bubbles

    @property
    def p(self) -> int:
        """Number of ranks."""
        return self.schedule.p

    @property
    def start(self) -> float:
        """Earliest event start (0 for a simulated timeline)."""
        return min((e.start for e in self.events), default=0.0)

    @property
    def step_time(self) -> float:
        """Wall time of the step: last end minus first start, over all ranks."""
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - self.start

    def busy_per_rank(self) -> list[float]:
        """Time each rank spends computing (sum of its event durations)."""
        busy = [0.0] * self.p
        for e in self.events:
            busy[e.rank] += e.end - e.start
        return busy

    def busy(self, rank: int) -> float:
        """Time ``rank`` spends computing."""
        return sum(e.end - e.start for e in self.events if e.rank == rank)

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
        return sorted((e for e in self.events if e.rank == rank), key=lambda e: (e.start, e.end))

    def _by_rank(self) -> list[list[Event]]:
        out: list[list[Event]] = [[] for _ in range(self.p)]
        for e in self.events:
            out[e.rank].append(e)
        for evs in out:
            evs.sort(key=lambda e: (e.start, e.end))
        return out

    def _peak(self, release: Kind) -> list[int]:
        """Per rank, the most (chunk, micro-batch) with F run and the ``release`` action not yet."""
        peaks = []
        for evs in self._by_rank():
            held = peak = 0
            for e in evs:
                kind = e.action.kind
                if kind is Kind.F:
                    held += 1
                    peak = max(peak, held)
                elif kind is release:
                    held -= 1
            peaks.append(peak)
        return peaks

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
        return (f"Timeline({s.name} p={s.p} m={s.m} v={s.v}, {len(self.events)} events, "
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
