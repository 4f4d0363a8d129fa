"""Fill-drain schedules: naive model parallelism and GPipe."""

from __future__ import annotations

from .base import B, F, Schedule, check_sizes

__all__ = ["naive", "gpipe"]


def naive(p: int, m: int = 1) -> Schedule:
    """Naive model parallelism: one micro-batch at a time through the whole pipeline.

    Each rank runs ``F0 B0 F1 B1 …``, so micro-batch ``i + 1`` enters only after ``i`` has
    finished its backward everywhere: one rank works at a time.
    Step time ``m·p·(t_f + t_b)``; utilization ``1/p``. Peak in-flight micro-batches: 1.
    """
    check_sizes(p, m)
    order = [a for i in range(m) for a in (F(i), B(i))]
    return Schedule([order] * p, m=m, v=1, name="naive")


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (fill–drain; Huang et al. 2019): all forwards, then all backwards.

    Step time ``(m + p − 1)(t_f + t_b)``; bubble ``(p − 1)/(m + p − 1)`` of the step,
    ``(p − 1)/m`` relative to useful work. Peak in-flight micro-batches: ``m`` on every rank.
    """
    check_sizes(p, m)
    order = [F(i) for i in range(m)] + [B(i) for i in range(m)]
    return Schedule([order] * p, m=m, v=1, name="gpipe")
