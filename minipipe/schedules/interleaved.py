"""Interleaved 1F1B (Megatron-LM): several model chunks per rank."""

from __future__ import annotations

from .base import Action, Kind, Schedule, action, check_sizes

__all__ = ["interleaved"]


def interleaved(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): ``v`` model chunks per rank.

    Micro-batches go through the chunks in groups of ``p``; rank ``r`` warms up with
    ``2(p − r − 1) + (v − 1)p`` forwards. Bubble ``(p − 1)/(v·m)`` relative to useful work
    (``(p − 1)/(v·m + p − 1)`` of the step). Peak in-flight (chunk, micro-batch) stashes on
    rank 0: ``min(v·m, (v − 1)p + 2(p − 1) + 1)`` (later ranks hold fewer, but a larger multiple
    of what they hold under 1F1B). Messages: ``2(p·v − 1)·m`` per step, i.e.
    ``(p·v − 1)/(p − 1)`` times 1F1B's (at least ``v``; 3× for ``p = 2``, ``v = 2``).

    Raises:
        ValueError: ``m % p != 0`` (Megatron-LM's requirement) or ``v < 1``.
    """
    check_sizes(p, m)
    if v < 1:
        raise ValueError(f"need v >= 1 chunks per rank, got v={v}")
    if m % p:
        raise ValueError(
            f"interleaved 1F1B needs the micro-batches to be a multiple of the ranks: "
            f"m={m} is not a multiple of p={p} (try m={m + (p - m % p)})"
        )
    total = m * v  # (chunk, micro-batch) pairs per rank

    def nth(k: int, forward: bool) -> Action:
        chunk = (k // p) % v  # groups of p micro-batches per chunk
        mb = (k // (p * v)) * p + k % p
        return action(Kind.F if forward else Kind.B, mb, chunk if forward else v - 1 - chunk)

    fwd = [nth(k, True) for k in range(total)]  # the k-th forward / backward: same on every rank
    bwd = [nth(k, False) for k in range(total)]
    ranks = []
    for r in range(p):
        warmup = total if m == p and v > 1 else min((p - r - 1) * 2 + (v - 1) * p, total)
        steady: list[Action] = [None] * (2 * (total - warmup))  # type: ignore[list-item]
        steady[0::2], steady[1::2] = fwd[warmup:], bwd[:total - warmup]  # F then B, in turn
        ranks.append(fwd[:warmup] + steady + bwd[total - warmup:])  # warm-up, steady, cool-down
    return Schedule(ranks, m=m, v=v, name="interleaved")
