"""V-shape schedules: two chunks per rank, chunk 0 runs stage ``r`` and chunk 1 stage ``2p − 1 − r``.

With that placement (``Schedule(..., placement="v")``) the first and the last stage sit on
rank 0: a micro-batch goes down the ranks on chunk 0, turns on rank ``p − 1`` without a
message, and comes back up on chunk 1. Each chunk is half of a rank's layers, so one
(chunk, micro-batch) stash is half of a 1F1B micro-batch; the peaks below count stashes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Action, Kind, Schedule, action, check_sizes

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
        for r, ks in enumerate(pairs):
            order = self.ranks[r]
            for k in ks:
                ok = (k + 2 < len(order) and order[k].kind is Kind.F
                      and order[k + 1].kind is Kind.B and order[k + 2].kind is Kind.W
                      and order[k + 1].mb == order[k + 2].mb
                      and order[k + 1].chunk == order[k + 2].chunk != order[k].chunk)
                if not ok:
                    raise ValueError(f"rank {r}, position {k}: an overlapped pair is an F followed "
                                     "by the B and W of another chunk")
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
        count = {(kind, c): 0 for kind in Kind for c in (0, 1)}

        def nxt(kind: Kind, c: int) -> Action:
            count[kind, c] += 1
            return action(kind, count[kind, c] - 1, c)

        def fbw(c: int) -> list[Action]:
            return [nxt(Kind.F, c), nxt(Kind.B, c), nxt(Kind.W, c)]

        order = [nxt(Kind.F, 0) for _ in range(2 * (p - r) - 1)]
        for _ in range(r):
            order += [nxt(Kind.F, 1), nxt(Kind.F, 0)]
        for _ in range(p - r):
            order += fbw(1)
        while count[Kind.F, 1] < count[Kind.F, 0] or count[Kind.F, 0] < n:
            if count[Kind.F, 0] < n:
                order.append(nxt(Kind.F, 0))
            order += [nxt(Kind.B, 0), nxt(Kind.W, 0)] + fbw(1)
        for _ in range(r):  # drain: input gradients first, weight gradients fill the gaps
            order += [nxt(Kind.B, 0), nxt(Kind.B, 1)]
        for _ in range(p - r):
            order += [nxt(Kind.B, 0), nxt(Kind.W, 0)]
        order += [nxt(Kind.W, 1) for _ in range(count[Kind.B, 1] - count[Kind.W, 1])]
        order += [nxt(Kind.W, 0) for _ in range(count[Kind.B, 0] - count[Kind.W, 0])]
        ranks.append([a for a in order if a.mb < m])
    return Schedule(ranks, m=m, v=2, name="zb-v", placement="v")


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
    return OverlapSchedule(ranks, overlapped=pairs, m=m, v=2, name="dualpipev", placement="v")


def _dualpipev_rank(p: int, m: int, r: int) -> tuple[list[Action], list[int]]:
    """Rank ``r``'s DualPipeV order and the positions of its overlapped F&B units."""
    order: list[Action] = []
    pairs: list[int] = []
    count = {(kind, c): 0 for kind in Kind for c in (0, 1)}
    deferred: list[Action] = []  # W actions owed, oldest first

    def nxt(kind: Kind, c: int) -> Action:
        count[kind, c] += 1
        return action(kind, count[kind, c] - 1, c)

    def forward(c: int) -> None:
        order.append(nxt(Kind.F, c))

    def backward(c: int, split: bool = False) -> None:  # whole (B then W) unless split
        b = nxt(Kind.B, c)
        order.append(b)
        (deferred if split else order).append(action(Kind.W, b.mb, c))

    def pay_w() -> None:
        if deferred:
            order.append(deferred.pop(0))

    def f_and_b(f_chunk: int) -> None:  # one overlapped unit: F of f_chunk, backward of the other
        pairs.append(len(order))
        forward(f_chunk)
        backward(1 - f_chunk)

    for _ in range(2 * (p - r - 1)):  # 1: forwards on chunk 0
        forward(0)
    for _ in range(r + 1):  # 2: forwards on both chunks
        forward(0), forward(1)
    for _ in range(p - r - 1):  # 3: zero-bubble rounds on chunk 1
        backward(1, split=True), pay_w(), forward(1)
    for i in range(m - 2 * p + r + 1):  # 4: the main phase, F&B units
        if i == 0 and r == p - 1:  # the turn of the V: kept apart, which shortens the bubble
            forward(0), backward(1)
        else:
            f_and_b(0)
        f_and_b(1)
    for _ in range(p - r - 1):  # 5
        backward(1), f_and_b(1)
    split = False
    for i in range(r + 1):  # 6: backwards; from the middle on, W is split off and deferred
        split = split or (i == (r + 1) // 2 and r % 2 == 1)
        backward(1, split)
        split = split or (i == (r + 1) // 2 and r % 2 == 0)
        backward(0, split)
    for _ in range(p - r - 1):  # 7
        pay_w(), backward(0, split)
    for _ in range(r + 1):  # 8: the deferred weight gradients
        pay_w()
    return order, pairs
