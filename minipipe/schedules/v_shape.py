"""V-shape schedules: two chunks per rank, chunk 0 runs stage ``r`` and chunk 1 stage ``2p − 1 − r``.

With that placement (``Schedule(..., placement="v")``) the first and the last stage sit on
rank 0: a micro-batch goes down the ranks on chunk 0, turns on rank ``p − 1`` without a
message, and comes back up on chunk 1. Each chunk is half of a rank's layers, so one
(chunk, micro-batch) stash is half of a 1F1B micro-batch; the peaks below count stashes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Schedule, check_sizes
from .patterns import B0, B1, F0, F1, W0, W1, numbered

__all__ = ["OverlapSchedule", "zb_v", "dualpipev"]


@dataclass(frozen=True, init=False)
class OverlapSchedule(Schedule):
    """A schedule whose ranks run some forward and backward actions as overlapped pairs.

    ``overlapped[r]`` lists the positions ``k`` in rank ``r``'s order where ``F`` at ``k`` and
    the whole backward (``B`` at ``k + 1``, ``W`` at ``k + 2``) of another chunk form one
    "F&B" unit (DualPipe). On a GPU the two halves run on separate streams, so one
    micro-batch's forward computes while the other's backward communicates (DeepSeek-V3
    hides its expert-parallel all-to-all that way). On one CPU core overlapping means
    nothing: the runtime and :func:`~minipipe.simulate.simulate` run the three actions one
    after the other, so an F&B unit costs ``t_f + t_b + t_w`` there.
    """

    overlapped: tuple[tuple[int, ...], ...]

    def __init__(self, ranks, overlapped=None, **kwargs) -> None:
        super().__init__(ranks, **kwargs)
        pairs = tuple(tuple(k) for k in (overlapped or [()] * self.p))
        if len(pairs) != self.p:
            raise ValueError(f"overlapped lists {len(pairs)} ranks, the schedule has {self.p}")
        kind, chunk, mb, bounds = self.columns()
        for r, ks in enumerate(pairs):
            k = np.array(ks, np.int64)
            if not k.size:
                continue
            ok = (k >= 0) & (k + 2 < bounds[r + 1] - bounds[r])
            if ok.all():
                at = bounds[r] + k  # F at k, B at k + 1, W at k + 2
                ok &= ((kind[at] == 0) & (kind[at + 1] == 1) & (kind[at + 2] == 2)
                       & (mb[at + 1] == mb[at + 2]) & (chunk[at + 1] == chunk[at + 2])
                       & (chunk[at + 1] != chunk[at]))
            if not ok.all():
                raise ValueError(f"rank {r}, position {ks[int(np.argmin(ok))]}: an overlapped "
                                 "pair is an F followed by the B and W of another chunk")
        object.__setattr__(self, "overlapped", pairs)


def zb_v(p: int, m: int) -> Schedule:
    """ZB-V (Qi et al. 2024, "Pipeline parallelism with controllable memory"): V placement.

    Rank ``r`` warms up with ``2(p − r) − 1`` forwards on chunk 0, then ``r`` pairs of
    forwards (chunk 1, chunk 0), then ``p − r`` rounds of ``F B W`` on chunk 1; in the steady
    state it runs ``F B W`` on chunk 0 then on chunk 1; in the drain the ``B`` actions go
    first and the ``W`` actions fill the gaps. For ``m < 2p − 1`` the order for ``2p − 1``
    micro-batches is cut down to the first ``m`` (as torch does).

    With ``t_f = t_b = t_w`` (per chunk) and ``m >= 2p`` the step is
    ``m·(t_f + t_b + t_w)·2 + (p − 1)·... `` — see :func:`minipipe.formulas.step_time`: the
    bubble is ``(p − 1)(t_f + t_b − 2t_w)`` per rank, zero for equal costs... 

    Memory: rank 0 holds up to ``2p`` (chunk, micro-batch) stashes, each half a rank's
    layers: ``p`` micro-batches' worth, 1F1B's peak.
    """
    check_sizes(p, m)
    n = max(m, 2 * p - 1)
    ranks = []
    for r in range(p):
        order = [F0] * (2 * (p - r) - 1) + [F1, F0] * r + [F1, B1, W1] * (p - r)
        order += [F0, B0, W0, F1, B1, W1] * (n - (2 * p - r - 1))  # steady, chunk 0 not done
        order += [B0, W0, F1, B1, W1] * (p - r - 1)  # steady, chunk 1 catching up
        order += [B0, B1] * r + [B0, W0] * (p - r)  # drain: input gradients first, then the
        order += [W1] * (order.count(B1) - order.count(W1))  # weight gradients fill the gaps
        ranks.append(order + [W0] * (order.count(B0) - order.count(W0)))
    return numbered(ranks, m, 2, name="zb-v", placement="v")


def dualpipev(p: int, m: int) -> OverlapSchedule:
    """DualPipeV (DeepSeek's V-shape "cut-in-half" DualPipe; torch's ``ScheduleDualPipeV``).

    V placement, ``m >= 2p`` micro-batches. Rank ``r``: ``2(p − r − 1)`` forwards on chunk 0,
    ``r + 1`` pairs of forwards (chunk 0, chunk 1), ``p − r − 1`` rounds of ``B W F`` on
    chunk 1; then the main phase of overlapped F&B units — the forward of one chunk beside
    the whole backward of the other (:class:`OverlapSchedule`) — then the drain, whose
    second half splits ``B`` from ``W`` to fill the gaps (zero-bubble style). A whole backward
    that is not split is written as ``B`` directly followed by ``W``.

    Bubble (DeepSeek-V3 report, for DualPipe): ``(p/2 − 1)(t_{F&B} + t_B − 3t_W)``, where
    ``t_{F&B}`` is the cost of one overlapped unit; the V-shaped half halves the ranks, see
    :func:`minipipe.formulas.step_time`. Memory: up to ``2p`` (chunk, micro-batch) stashes
    on rank 0 (``p`` micro-batches' worth, 1F1B's peak), parameters once.

    Raises:
        ValueError: ``m < 2p`` (torch's requirement: at least as many micro-batches as stages).
    """
    check_sizes(p, m)
    if m < 2 * p:
        raise ValueError(f"DualPipeV needs at least as many micro-batches as stages: m={m} < 2p={2 * p}")
    ranks, pairs = zip(*(_dualpipev_rank(p, m, r) for r in range(p)), strict=True)
    return numbered(ranks, m, 2, cls=OverlapSchedule, overlapped=pairs, name="dualpipev",
                    placement="v")


def _dualpipev_rank(p: int, m: int, r: int) -> tuple[list[int], list[int]]:
    """Rank ``r``'s DualPipeV order (tokens) and the positions of its overlapped F&B units."""
    order = [F0] * (2 * (p - r - 1))  # 1: forwards on chunk 0
    order += [F0, F1] * (r + 1)  # 2: forwards on both chunks
    order += [B1, W1, F1] * (p - r - 1)  # 3: zero-bubble rounds on chunk 1
    # 4: the main phase, F&B units: F of one chunk beside the whole backward of the other; on
    # the last rank the first is kept apart (the turn of the V), which shortens the bubble
    start, rounds = len(order), m - 2 * p + r + 1
    order += [F0, B1, W1, F1, B0, W0] * rounds
    pairs = sorted([start + 6 * i for i in range(rounds) if i or r < p - 1]
                   + [start + 6 * i + 3 for i in range(rounds)])
    start = len(order)
    order += [B1, W1, F1, B0, W0] * (p - r - 1)  # 5: a backward, then an F&B unit
    pairs += [start + 5 * i + 2 for i in range(p - r - 1)]
    deferred: list[int] = []  # W owed, oldest first
    split = False
    for i in range(r + 1):  # 6: backwards; from the middle on, W is split off and deferred
        split = split or (i == (r + 1) // 2 and r % 2 == 1)
        order.append(B1)
        (deferred if split else order).append(W1)
        split = split or (i == (r + 1) // 2 and r % 2 == 0)
        order.append(B0)
        (deferred if split else order).append(W0)
    for _ in range(p - r - 1):  # 7: a deferred W, then a backward on chunk 0
        if deferred:
            order.append(deferred.pop(0))
        order.append(B0)
        (deferred if split else order).append(W0)
    return order + deferred, pairs  # 8: the deferred weight gradients
