"""What a pipeline run measured, as the caller sees it: :class:`RunResult`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..schedules import Schedule
from ..timeline import Event, Timeline
from .autograd import predict_live, predict_peak

__all__ = ["RunResult"]


@dataclass
class RunResult:
    """What a pipeline run measured. ``ranks`` holds each rank's raw report."""

    schedule: Schedule
    ranks: list[dict[str, Any]]
    dp: int = 1
    wall_time: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        """Loss of each step on the whole batch (sum of the weighted micro-batch losses)."""
        steps = len(self.ranks[0]["steps"])
        return [sum(sum(r["steps"][k]["losses"]) for r in self.ranks) for k in range(steps)]

    def timelines(self, replica: int = 0) -> list:
        """One measured :class:`~minipipe.timeline.Timeline` per step (seconds)."""
        mine = [r for r in self.ranks if r["replica"] == replica]
        out = []
        for k in range(len(mine[0]["steps"])):
            events = [Event(r["rank"], a, s, e) for r in mine for (a, s, e) in r["steps"][k]["events"]]
            out.append(Timeline(self.schedule, sorted(events, key=lambda e: (e.rank, e.start)),
                                source="measured"))
        return out

    @property
    def timeline(self):
        """The last step's measured timeline (earlier steps include warm-up effects)."""
        return self.timelines()[-1]

    @property
    def step_times(self) -> list[float]:
        return [t.step_time for t in self.timelines()]

    @property
    def step_time(self) -> float:
        """Median step time in seconds, leaving out the first step (warm-up) when there are more."""
        times = self.step_times
        return statistics.median(times[1:] if len(times) > 1 else times)

    def _by_rank(self, key: str, replica: int = 0) -> list:
        return [r[key] for r in self._reports(replica)]

    def _reports(self, replica: int = 0) -> list[dict[str, Any]]:
        """The raw reports of one replica's ranks, in rank order."""
        return sorted((r for r in self.ranks if r["replica"] == replica), key=lambda r: r["rank"])

    @property
    def memory_mode(self) -> str:
        """``"observed"`` (live saved storages sampled after each action) or ``"counted"``."""
        return self.ranks[0]["steps"][0].get("act_mode", "counted")

    @property
    def peak_activation_bytes(self) -> list[int]:
        """Peak bytes saved for backward, per rank, over all steps: observed (the default: the
        storages autograd saved that were still alive, sampled after every action) or counted,
        as :attr:`memory_mode` says."""
        return self._by_rank("act_peak_bytes")

    @property
    def cuda_peak_bytes(self) -> list[int] | None:
        """``torch.cuda.max_memory_allocated`` per rank in the last step (None on CPU).

        Everything the CUDA allocator held at its high point: weights, gradients, optimizer
        state, received buffers, backward's temporaries and the allocator's rounding, as well
        as the saved activations that :attr:`peak_activation_bytes` observes.
        """
        peaks = [r["steps"][-1].get("cuda_peak_bytes") for r in self._reports()]
        return None if None in peaks else peaks

    @property
    def activation_bytes_per_mb(self) -> list[dict[int, int]]:
        """Bytes the first micro-batch's forward saved, per rank and chunk (observed or counted)."""
        return self._by_rank("act_bytes_per_mb")

    def activation_bytes(self, step: int = -1) -> list[dict[tuple[int, int], int]]:
        """Bytes each micro-batch's forward saved in ``step``, per rank: ``{(chunk, mb): bytes}``."""
        return [r["steps"][step]["act_bytes"] for r in self._reports()]

    def activation_trace(self, rank: int, step: int = -1) -> list[tuple[str, int, dict]]:
        """``(action, live bytes after it, {(chunk, mb): bytes still alive})`` for each action
        of ``rank`` in ``step`` (counted mode: what the bookkeeping says)."""
        return list(self._reports()[rank]["steps"][step]["act_trace"])

    def predicted_activation_trace(self, rank: int, step: int = -1) -> list[tuple[str, int]]:
        """``(action, live bytes predicted after it)`` for each action of ``rank`` in ``step``:
        the prediction beside :meth:`activation_trace`'s observation, action by action."""
        order = self.schedule.ranks[rank]
        live = predict_live(order, self._reports()[rank]["steps"][step]["act_spans"])
        return [(a.label(self.schedule.v > 1), n) for a, n in zip(order, live)]

    @property
    def predicted_activation_bytes(self) -> list[int]:
        """Peak per rank predicted from the schedule order and what each forward saved.

        One rule for every schedule (:func:`~minipipe.runtime.autograd.predict_peak`): a
        storage is alive from the ``F`` that saved it until the last of its holders lets go —
        the chunk's graph at its backward (split: at ``W``), the loss's saved tensors at ``B``,
        the stage input and output the runtime keeps at ``B``, so that a boundary tensor two
        chunks share on one rank (the turn of a V) is counted once and lives as long as the
        longer of the two. The facts (bytes, who saved them, who holds them) are recorded at
        each ``F``; the largest peak over the steps is the prediction.
        """
        out = []
        for r, order in enumerate(self.schedule.ranks):
            steps = self._reports()[r]["steps"]
            out.append(max(predict_peak(order, step["act_spans"]) for step in steps))
        return out

    @property
    def messages(self) -> int:
        """Point-to-point activation/gradient messages per step, all ranks of one replica."""
        steps = len(self.ranks[0]["steps"])
        return sum(self._by_rank("messages_sent")) // steps

    @property
    def bytes_sent(self) -> list[int]:
        """Bytes each rank sent per step."""
        steps = len(self.ranks[0]["steps"])
        return [b // steps for b in self._by_rank("bytes_sent")]

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        """Gradients of the last step (after tied and data-parallel sums), by parameter name."""
        return self._merge("grads", lambda r: r["steps"][-1].get("grads"))

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Weights after the last step, by parameter name (tied: the lowest rank's copy)."""
        return self._merge("params", lambda r: r.get("params"))

    def copies(self, name: str) -> list[torch.Tensor]:
        """Each rank's copy of parameter ``name`` after the run (tied weights: several)."""
        return [r["params"][name] for r in self.ranks if r["replica"] == 0 and name in r.get("params", {})]

    def _merge(self, what: str, get: Callable) -> dict[str, torch.Tensor]:
        merged: dict[str, torch.Tensor] = {}
        for r in sorted(self.ranks, key=lambda r: (r["replica"], r["rank"])):
            part = get(r)
            if part is None:
                raise ValueError(f"this run did not keep {what}: pass return_{what}=True to train()")
            for n, t in part.items():
                merged.setdefault(n, t)
        return merged

    def summary(self) -> str:
        """A few readable lines: configuration, step time, bubbles, memory, messages."""
        tl = self.timeline
        i = self.info
        lines = [
            f"{self.schedule.name}: p={self.schedule.p} m={self.schedule.m} v={self.schedule.v}"
            f" dp={self.dp} | backend {i.get('backend')} on {i.get('device')}"
            + (" (CUDA tensors staged through host memory: shows correctness and memory, "
               "not speed-up)" if i.get("staged") else ""),
            f"median step time {self.step_time * 1e3:.1f} ms | bubble {tl.bubble_fraction:.1%} of "
            f"the step, {tl.bubble_overhead:.1%} of useful work (measured, last step)",
            f"peak activation bytes per rank: {self.memory_mode} {self.peak_activation_bytes}, "
            f"predicted from the schedule order {self.predicted_activation_bytes}"
            + (f" | CUDA max allocated {self.cuda_peak_bytes}" if self.cuda_peak_bytes else ""),
            f"messages per step: {self.messages}; losses: " + ", ".join(f"{l:.4f}" for l in self.losses),
        ]
        if i.get("ranks_exceed_cores"):
            lines.append(f"note: {i['world_size']} ranks on {i['cores']} cores: wall-clock timings "
                         "mix the schedule with CPU contention")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
