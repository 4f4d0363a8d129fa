"""1F1B (PipeDream-Flush): the warm-up, steady-state and cool-down loop, in one function."""

from __future__ import annotations

from .base import B, F, Schedule, check_sizes

__all__ = ["one_f_one_b"]


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B, PipeDream-Flush (Narayanan et al. 2021): warm-up, steady one-forward-one-backward, cool-down.

    Same step time and bubble as GPipe; peak in-flight micro-batches on rank ``r`` is
    ``min(p − r, m)`` instead of ``m``.
    """
    check_sizes(p, m)
    fwd, bwd = [F(i) for i in range(m)], [B(i) for i in range(m)]  # shared by every rank
    ranks = []
    for r in range(p):
        warmup = min(p - r - 1, m)  # forwards before the first backward
        steady = [None] * (2 * (m - warmup))  # steady state: F of the newest, B of the oldest
        steady[0::2], steady[1::2] = fwd[warmup:], bwd[:m - warmup]
        ranks.append(fwd[:warmup] + steady + bwd[m - warmup:])  # warm-up, steady, cool-down
    return Schedule(ranks, m=m, v=1, name="1f1b")
