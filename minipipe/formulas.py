"""Closed forms for step time, bubbles, memory and messages of the schedules in ``schedules``.

Basis of every formula: ``p`` equal stages on ``p`` equal ranks, ``m`` micro-batches, no
communication time, and the cost convention of :mod:`minipipe.simulate`: ``t_f`` forward,
``t_b`` input-gradient backward, ``t_w`` weight-gradient backward (0: not split out), all per
micro-batch for a rank's whole share of the model. An unsplit backward costs ``t_b + t_w``.

For ``interleaved`` the costs are still per rank: each of the ``v`` chunks costs ``t_f/v``,
``t_b/v``, ``t_w/v`` (the model is cut into ``p·v`` equal stages). Simulate it with
``simulate(schedule, t_f / v, t_b / v, t_w / v)`` to compare. The same holds for the two
V-shape schedules ``zb-v`` and ``dualpipev`` (``v = 2``: simulate with ``t / 2``), whose
memory figures count (chunk, micro-batch) stashes, each half a rank's layers. ``dualpipe``
is the exception: each of its two chunks is a whole stage (``1/p`` of the model, held twice),
so its costs are per stage and chunk: simulate it with ``t_f``, ``t_b``, ``t_w`` as given.

The tests check each formula against :func:`~minipipe.simulate.simulate`; where the two
differ (ZB-H1 with ``m < p`` or ``t_w > min(t_f, t_b)``), the docstring says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from .schedules.base import make_placement

__all__ = [
    "activation_memory_ratio_interleaved", "bubble_fraction", "bubble_overhead", "gpipe_step_time",
    "ideal_time", "messages", "peak_inflight", "peak_pending_w", "step_time", "utilization",
]

_NAMES = {"naive", "gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "dualpipev",
          "dualpipe"}


def _name(schedule_name: str) -> str:
    key = schedule_name.lower().replace("_", "-")
    key = {"zbh1": "zb-h1", "zbh2": "zb-h2", "zbv": "zb-v", "dualpipe-v": "dualpipev",
           "one-f-one-b": "1f1b", "pipedream-flush": "1f1b"}.get(key, key)
    if key not in _NAMES:
        raise ValueError(f"unknown schedule {schedule_name!r}; choose one of {sorted(_NAMES)}")
    return key


def ideal_time(m: int, t_f: float, t_b: float, t_w: float = 0) -> float:
    """Useful work of one rank per step, the step time with no bubble.

    ``m·(t_f + t_b + t_w)``
    """
    return m * (t_f + t_b + t_w)


def step_time(schedule_name: str, p: int, m: int, t_f: float, t_b: float, t_w: float = 0,
              v: int = 1) -> float:
    """Step time of a schedule on equal stages, without communication.

    - ``naive``: ``m·p·(t_f + t_b + t_w)``: each micro-batch goes all the way through the
      pipeline and back before the next starts.
    - ``gpipe``, ``1f1b``: ``(m + p − 1)(t_f + t_b + t_w)``, for every ``m``.
    - ``interleaved``: ``(m + (p − 1)/v)(t_f + t_b + t_w)``, costs per rank (a chunk costs
      ``t/v``); needs ``m % p == 0``.
    - ``zb-h1``: ``m(t_f + t_b + t_w) + (p − 1)(t_f + t_b − t_w)`` for ``m >= p``, i.e.
      ``(m + p − 1)(t_f + t_b) + (m − p + 1)·t_w``; for ``m < p`` the last W cannot hide and
      it is ``(m + p − 1)(t_f + t_b) + t_w``. Exact when ``t_w <= min(t_f, t_b)`` (each
      deferred W fits in a gap the length of an F or a B); for a larger ``t_w`` the order,
      built for equal costs, loses time and the simulator is slower than this.
    - ``zb-h2``: ``m(t_f + t_b + t_w) + (p − 1)·t_f``: no bubble in the steady state, only the
      ramp of the flush. Exact for ``m >= 2p − 1`` and ``t_b <= 2·min(t_f, t_w)``; otherwise
      the simulator is slower.
    - ``zb-v``, ``dualpipev`` (costs per rank, each chunk ``t/2``):
      ``m(t_f + t_b + t_w) + (p − 1)(t_f + t_b − t_w)/2``. For ``zb-v`` exact with
      ``t_f = t_b = t_w`` and ``m >= 2p − 1`` (the paper's setting; other ratios can go either
      way); for ``dualpipev`` exact when ``t_w <= t_b <= t_f <= t_b + t_w`` (``m >= 2p``), the
      F&B units run one action after the other, as on one CPU core. DeepSeek state
      ``(PP/2 − 1)(F&B + B − 3W)`` with ``PP = 2p`` stages and ``B`` a whole backward: with
      ``F&B = F + B`` (no overlap) that is ``(p − 1)(t_f + 2t_b − t_w)/2``, ``(p − 1)·t_b/2``
      more than the simulator finds for these orders: it bounds the bubble from above.
    - ``dualpipe`` (bidirectional; each chunk a whole stage, costs per chunk, ``m`` micro-batches
      in all, ``m/2`` per direction): ``m(t_f + t_b + t_w) + (p/2 − 1)(t_f + t_b − t_w)``,
      exact under the same condition as ``dualpipev`` (``m >= 2p``): it is DualPipeV's order
      for ``p/2`` ranks and ``m/2`` micro-batches per direction. DeepSeek's
      ``(p/2 − 1)(F&B + B − 3W)`` is ``(p/2 − 1)·t_b`` more (F&B run one after the other).

    Args:
        schedule_name: ``naive``, ``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``, ``zb-h2``,
            ``zb-v`` or ``dualpipev``.
        p: ranks. m: micro-batches. v: chunks per rank (``interleaved``).
        t_f, t_b, t_w: per micro-batch and rank, see the module docstring.

    Example:
        >>> step_time("1f1b", p=4, m=16, t_f=1, t_b=2)
        57
    """
    name = _name(schedule_name)
    work = t_f + t_b + t_w
    if name == "naive":
        return m * p * work
    if name in ("gpipe", "1f1b"):
        return (m + p - 1) * work
    if name == "interleaved":
        return (m + (p - 1) / v) * work
    if name == "zb-h2":
        return m * work + (p - 1) * t_f
    if name in ("zb-v", "dualpipev"):
        return m * work + (p - 1) * (t_f + t_b - t_w) / 2
    if name == "dualpipe":
        return m * work + (p // 2 - 1) * (t_f + t_b - t_w)
    return (m + p - 1) * (t_f + t_b) + max(1, m - p + 1) * t_w  # zb-h1


def gpipe_step_time(t_f: list[float], t_b: list[float], m: int) -> float:
    """GPipe's step time with unequal stages (``t_f[s]``, ``t_b[s]`` per stage, no ``W``):
    ``Σ_s (t_f[s] + t_b[s]) + (m − 1)·(max_s t_f[s] + max_s t_b[s])``.

    The forwards flow through the stages at the pace of the slowest forward, the backwards at
    the pace of the slowest backward, and a rank starts its backwards only after its last
    forward. ``(m − 1)·max_s (t_f[s] + t_b[s])`` instead is right only when one stage is the
    slowest in both passes (for 1F1B it is the cost of each extra micro-batch in the steady
    state, not a closed form for the step).

    Example:
        >>> gpipe_step_time([1, 3, 1, 1], [2, 2, 2, 6], m=8)
        81
    """
    if len(t_f) != len(t_b) or not t_f or m < 1:
        raise ValueError("t_f and t_b need one cost per stage, and m >= 1")
    return sum(t_f) + sum(t_b) + (m - 1) * (max(t_f) + max(t_b))


def utilization(schedule_name: str, p: int, m: int, t_f: float, t_b: float, t_w: float = 0,
                v: int = 1) -> float:
    """Share of the step the ranks compute: ``ideal_time / step_time``; ``1/p`` for naive.

    ``1 − utilization`` is the bubble fraction of any of the schedules.
    """
    return ideal_time(m, t_f, t_b, t_w) / step_time(schedule_name, p, m, t_f, t_b, t_w, v)


def bubble_fraction(p: int, m: int, v: int = 1) -> float:
    """Bubble as a share of the step (what a stopwatch measures): idle / (p · step time).

    ``(p − 1) / (v·m + p − 1)`` for GPipe, 1F1B (``v = 1``) and interleaved 1F1B, whatever
    the ratio ``t_b / t_f``. 4 stages, 16 micro-batches: 3/19 ≈ 15.8%.
    """
    return (p - 1) / (v * m + p - 1)


def bubble_overhead(p: int, m: int, v: int = 1) -> float:
    """Bubble relative to useful work (Megatron-LM's "bubble time fraction"): idle / busy.

    ``(p − 1) / (v·m)`` for GPipe, 1F1B (``v = 1``) and interleaved 1F1B; can exceed 1.
    4 stages, 16 micro-batches: 3/16 = 18.75%.
    """
    return (p - 1) / (v * m)


def peak_inflight(schedule_name: str, p: int, m: int, v: int = 1) -> list[int]:
    """Per rank, the most (chunk, micro-batch) whose F has run and whose B has not finished.

    - ``naive``: 1 everywhere. ``gpipe``: ``m`` everywhere.
    - ``1f1b`` and ``zb-h1``: ``min(p − r, m)`` on rank ``r``.
    - ``interleaved``: ``min(w_r + 1, v·m)`` chunk-micro-batches with Megatron-LM's warm-up
      ``w_r = 2(p − r − 1) + (v − 1)p`` (all ``v·m`` forwards first when ``m == p``). Each
      is a chunk, ``1/v`` of the rank's layers.
    - ``zb-h2``: ``min(2(p − r) − 1, m)``: its longer warm-up.
    - ``zb-v``: ``min(2p, m + 1 + r, 2m)`` chunk stashes (``W`` follows ``B`` closely, so this
      is also its :func:`peak_pending_w`); ``2p`` is ``p`` micro-batches' worth, 1F1B's peak.
    - ``dualpipev``: ``2p + 1`` chunk stashes on every rank (``m >= 2p``), DeepSeek's
      "PP + 1" with ``PP = 2p`` stages.
    - ``dualpipe``: ``p + 1`` stage stashes on every rank (``m >= 2p``), DeepSeek's "PP + 1";
      each stash is one stage's (1F1B's unit), so one more than 1F1B's first rank.

    For the split-backward schedules see also :func:`peak_pending_w`.
    """
    name = _name(schedule_name)
    if name == "zb-h2":
        return [min(2 * (p - r) - 1, m) for r in range(p)]
    if name == "zb-v":
        return [min(2 * p, m + 1 + r, 2 * m) for r in range(p)]
    if name == "dualpipev":
        return [2 * p + 1] * p
    if name == "dualpipe":
        return [p + 1] * p
    if name == "naive":
        return [1] * p
    if name == "gpipe":
        return [m] * p
    if name in ("1f1b", "zb-h1"):
        return [min(p - r, m) for r in range(p)]
    total = v * m
    warmup = [total if m == p and v > 1 else min(2 * (p - r - 1) + (v - 1) * p, total)
              for r in range(p)]
    return [min(w + 1, total) for w in warmup]


def peak_pending_w(schedule_name: str, p: int, m: int, v: int = 1) -> list[int]:
    """Per rank, the most (chunk, micro-batch) whose F has run and whose W has not yet.

    The activation memory of a split-backward schedule (W needs the stage input):
    ``min(p, m)`` on every rank for ``zb-h1``, 1F1B's first-stage peak; ``min(2p − 1, m)`` on
    every rank for ``zb-h2``, about twice that; for ``zb-v``, ``dualpipev``, ``dualpipe`` and the
    schedules without W, this is :func:`peak_inflight`.
    """
    if _name(schedule_name) == "zb-h1":
        return [min(p, m)] * p
    if _name(schedule_name) == "zb-h2":
        return [min(2 * p - 1, m)] * p
    return peak_inflight(schedule_name, p, m, v)


def activation_memory_ratio_interleaved(p: int, v: int) -> float:
    """First rank's activation memory, interleaved over 1F1B, when ``m`` is large enough.

    ``1 + (p − 1)/(p·v)``: rank 0 holds ``(v − 1)p + 2(p − 1) + 1`` chunk-micro-batches of
    ``1/v`` of its layers, against 1F1B's ``p`` micro-batches of all of them.
    """
    return 1 + (p - 1) / (p * v)


def messages(p: int, m: int, v: int = 1,
             placement: str | Sequence[tuple[int, int]] = "loop", pipelines: int = 1) -> int:
    """Point-to-point messages per step: ``2·(p·v − 1)·m`` placed as a loop (0 when ``p = 1``).

    Each of the ``p·v − 1`` stage boundaries carries one activation forward and one gradient
    back per micro-batch, and with the loop placement and ``p > 1`` every boundary crosses
    ranks: ``(p·v − 1)/(p − 1)`` times 1F1B's for interleaved (at least ``v``; 3× at
    ``p = v = 2``). The V placement keeps the ``v − 1`` turns of the V on one rank (stage
    ``p − 1`` hands over to stage ``p`` in memory): ``2·v·(p − 1)·m``. Any other placement: two messages per micro-batch per boundary whose
    two stages sit on different ranks. With ``pipelines`` groups (DualPipe: 2) no message
    crosses from one group to the next and each boundary carries ``m / pipelines``
    micro-batches: DualPipe sends ``2·(p − 1)·m``, as many as 1F1B.
    """
    place, per = make_placement(placement, p, v), p * v // pipelines
    return 2 * (m // pipelines) * sum(place[s][0] != place[s + 1][0] and (s + 1) % per > 0
                                      for s in range(p * v - 1))
