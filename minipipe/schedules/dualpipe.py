"""DualPipe (DeepSeek-V3, 2024): two pipelines running in opposite directions on the same ranks.

Micro-batches ``0 .. m/2 − 1`` enter at rank 0 and travel to rank ``p − 1`` (group 0);
micro-batches ``m/2 .. m − 1`` enter at rank ``p − 1`` and travel back to rank 0 (group 1). Rank ``r`` holds
stage ``r`` of group 0 on chunk 0 and, on chunk 1, group 1's copy of stage ``p − 1 − r``: so
every stage's layers exist twice, on ranks ``k`` and ``p − 1 − k``, and the two copies'
gradients are summed before the step, as tied weights are. As data:
``Schedule(..., v=2, placement="v", pipelines=2)``.
"""

from __future__ import annotations

from .base import check_sizes
from .patterns import numbered
from .v_shape import OverlapSchedule, _dualpipev_rank

__all__ = ["dualpipe"]


def dualpipe(p: int, m: int) -> OverlapSchedule:
    """DualPipe (DeepSeek-V3 technical report; github.com/deepseek-ai/DualPipe), bidirectional.

    Ranks ``r`` and ``p − 1 − r`` run the same order, mirrored: DeepSeek's eight phases,
    counted with the "half rank" ``h = min(r, p − 1 − r)``; "near" is the direction whose
    input enters on this half of the ranks, "far" the other one.

    1. ``2(p/2 − h − 1)`` forwards, near;  2. ``h + 1`` pairs of forwards (near, far);
    3. ``p/2 − h − 1`` rounds of zero-bubble ``B W F``, far;
    4. ``m/2 − p + h + 1`` pairs of F&B units (F near with the whole backward far, then the
       reverse): the main phase; 5. ``p/2 − h − 1`` rounds of ``B`` far then an F&B unit;
    6. ``h + 1`` pairs of backwards (far, near), the second half with W split off and deferred;
    7. ``p/2 − h − 1`` rounds of a deferred W and a backward, near;  8. ``h + 1`` deferred W.

    This is DualPipeV's order (:func:`~minipipe.schedules.v_shape.dualpipev`) for ``p/2``
    ranks and ``m/2`` micro-batches, with its two chunks mapped onto the two directions: a
    micro-batch's path through the ranks ``h = 0 .. p/2 − 1`` and back is the same.
    The F&B units are an :class:`~minipipe.schedules.v_shape.OverlapSchedule`'s pairs.

    Bubble, as DeepSeek state it: ``(p/2 − 1)(F&B + B − 3W)`` per rank, with ``F&B`` one
    overlapped unit, ``B`` a whole backward, ``W`` its weight half; with ``F&B = F + B`` (no
    overlap, as on one CPU core) that is ``(p/2 − 1)(t_f + 2t_b − t_w)``. The simulator finds
    ``(p/2 − 1)(t_f + t_b − t_w)`` for this order, see :func:`minipipe.formulas.step_time`.
    Memory: 2× parameters (two stages of ``1/p`` of the model per rank) and ``p + 1``
    activation stashes per rank (each a stage's, 1F1B's unit), DeepSeek's "PP + 1".

    Raises:
        ValueError: ``p`` odd, ``m`` odd or ``m < 2p`` (DeepSeek's requirements).
    """
    check_sizes(p, m)
    if p % 2 or m % 2 or m < 2 * p:
        raise ValueError(f"DualPipe needs an even p, an even m and m >= 2p: got p={p}, m={m}")
    half, per = p // 2, m // 2
    rows, pairs = [], []
    for r in range(p):
        order, overlapped = _dualpipev_rank(half, per, min(r, p - 1 - r))
        flip = int(r >= half)  # on the second half of the ranks the near direction is group 1
        rows.append([t ^ flip for t in order])  # token kind·2 + chunk: the chunk flipped
        pairs.append(overlapped)
    kind, chunk, mb, bounds = numbered(rows, per, 2).columns()  # each direction numbered 0..
    return OverlapSchedule.from_columns(kind, chunk, mb + chunk * per, bounds, m, 2,
                                        overlapped=pairs, name="dualpipe", placement="v",
                                        pipelines=2)
