"""Pipeline schedules as plain data: actions, per-rank orders and the generators.

A schedule says, for every rank, the order in which it runs its compute actions:
forward ``F``, backward ``B`` and (when the backward is split, zero-bubble style) the
weight-gradient part ``W`` of micro-batch ``i`` on model chunk ``c``. Nothing here imports
``torch``: the same object feeds the validator, the simulator, the plots and the runtime.

Notation (used everywhere): ``p`` ranks, ``m`` micro-batches, ``v`` chunks per rank. Chunk
``c`` of rank ``r`` is pipeline stage ``s = c * p + r`` of ``S = p * v`` stages (Megatron-LM's
virtual stages). An action prints as ``F3`` (micro-batch 3, chunk 0) or ``1B3`` (chunk 1).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "Kind", "Action", "F", "B", "W", "Schedule", "parse_actions",
    "naive", "gpipe", "one_f_one_b", "interleaved", "zb_h1", "SCHEDULES", "make_schedule",
]


class Kind(str, enum.Enum):
    """What a compute action does."""

    F = "F"  #: forward
    B = "B"  #: backward (input gradient only when the schedule also has W actions)
    W = "W"  #: weight gradient (split backward, zero-bubble schedules)


@dataclass(frozen=True)
class Action:
    """One compute action: ``kind`` of micro-batch ``mb`` on this rank's chunk ``chunk``."""

    kind: Kind
    mb: int
    chunk: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.mb < 0 or self.chunk < 0:
            raise ValueError(f"micro-batch and chunk must be >= 0, got {self.mb}, {self.chunk}")

    def label(self, show_chunk: bool = False) -> str:
        """``F3``, or ``1F3`` for chunk 1 (the chunk is shown when non-zero or asked for)."""
        prefix = f"{self.chunk}" if (show_chunk or self.chunk) else ""
        return f"{prefix}{self.kind.value}{self.mb}"

    def __str__(self) -> str:
        return self.label()

    def __repr__(self) -> str:
        return self.label()

    def describe(self) -> str:
        """Plain words, for error messages: ``B of micro-batch 3`` (``… chunk 1``)."""
        chunk = f" (chunk {self.chunk})" if self.chunk else ""
        return f"{self.kind.value} of micro-batch {self.mb}{chunk}"


def F(mb: int, chunk: int = 0) -> Action:
    """Forward of micro-batch ``mb`` on chunk ``chunk``."""
    return Action(Kind.F, mb, chunk)


def B(mb: int, chunk: int = 0) -> Action:
    """Backward (input gradient if the schedule splits backward) of ``mb`` on ``chunk``."""
    return Action(Kind.B, mb, chunk)


def W(mb: int, chunk: int = 0) -> Action:
    """Weight-gradient part of the backward of ``mb`` on ``chunk``."""
    return Action(Kind.W, mb, chunk)


_TOKEN = re.compile(r"^(\d*)([FBW])(\d+)$")


def parse_actions(text: str) -> tuple[Action, ...]:
    """Parse ``"F0 F1 B0 1F2"`` (spaces or commas) into actions.

    Raises:
        ValueError: a token is not of the form ``[chunk]{F,B,W}micro_batch``.
    """
    actions = []
    for token in text.replace(",", " ").split():
        match = _TOKEN.match(token.strip())
        if not match:
            raise ValueError(f"cannot read action {token!r}: write e.g. F3, B3, W3 or 1F3 (chunk 1)")
        chunk, kind, mb = match.groups()
        actions.append(Action(Kind(kind), int(mb), int(chunk or 0)))
    return tuple(actions)


def _as_actions(rank: Iterable[Action | str] | str) -> tuple[Action, ...]:
    if isinstance(rank, str):
        return parse_actions(rank)
    out: list[Action] = []
    for a in rank:
        out.extend(parse_actions(a) if isinstance(a, str) else [a])
    if not all(isinstance(a, Action) for a in out):
        raise TypeError("a rank's order must hold Action objects (F(0), B(0), ...) or strings")
    return tuple(out)


@dataclass(frozen=True, init=False)
class Schedule:
    """Per-rank ordered lists of actions; immutable, printable, comparable, picklable.

    Args:
        ranks: one order per rank: a list of actions, or a string such as ``"F0 F1 B0 B1"``.
        m: micro-batches per step (default: read off the actions).
        v: chunks per rank (default: read off the actions).
        name: shown in plots and summaries.

    Example:
        >>> Schedule(["F0 F1 B0 B1", "F0 B0 F1 B1"], name="mine").p
        2
    """

    ranks: tuple[tuple[Action, ...], ...]
    m: int
    v: int
    name: str

    def __init__(
        self,
        ranks: Sequence[Iterable[Action | str] | str],
        m: int | None = None,
        v: int | None = None,
        name: str = "custom",
    ) -> None:
        orders = tuple(_as_actions(r) for r in ranks)
        if not orders:
            raise ValueError("a schedule needs at least one rank")
        every = [a for order in orders for a in order]
        object.__setattr__(self, "ranks", orders)
        object.__setattr__(self, "m", m if m is not None else 1 + max((a.mb for a in every), default=-1))
        object.__setattr__(self, "v", v if v is not None else 1 + max((a.chunk for a in every), default=0))
        object.__setattr__(self, "name", name)

    @property
    def p(self) -> int:
        """Number of ranks (pipeline stages when ``v == 1``)."""
        return len(self.ranks)

    @property
    def num_stages(self) -> int:
        """``S = p * v`` pipeline stages."""
        return self.p * self.v

    @property
    def split_backward(self) -> bool:
        """True when backward is split into ``B`` (input grad) and ``W`` (weight grad)."""
        return any(a.kind is Kind.W for order in self.ranks for a in order)

    def stage(self, rank: int, chunk: int) -> int:
        """Pipeline stage run by ``chunk`` of ``rank``: ``chunk * p + rank``."""
        return chunk * self.p + rank

    def place(self, stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` that runs ``stage``."""
        return stage % self.p, stage // self.p

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return self.p

    def __getitem__(self, rank: int) -> tuple[Action, ...]:
        return self.ranks[rank]

    def __str__(self) -> str:
        show = self.v > 1
        width = len(str(self.p - 1))
        lines = [f"{self.name}: p={self.p} m={self.m} v={self.v}"]
        for r, order in enumerate(self.ranks):
            lines.append(f"rank {r:>{width}}: " + " ".join(a.label(show) for a in order))
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the grid
        printer.text(str(self))

    def __repr__(self) -> str:
        body = ", ".join(repr(" ".join(a.label(self.v > 1) for a in o)) for o in self.ranks)
        return f"Schedule([{body}], m={self.m}, v={self.v}, name={self.name!r})"


# ---------------------------------------------------------------------------- generators


def _check(p: int, m: int) -> None:
    if not (isinstance(p, int) and isinstance(m, int)) or p < 1 or m < 1:
        raise ValueError(f"need p >= 1 stages and m >= 1 micro-batches, got p={p}, m={m}")


def naive(p: int, m: int = 1) -> Schedule:
    """Naive model parallelism: one micro-batch at a time through the whole pipeline.

    Each rank runs ``F0 B0 F1 B1 …``, so micro-batch ``i + 1`` enters only after ``i`` has
    finished its backward everywhere: one rank works at a time.
    Step time ``m·p·(t_f + t_b)``; utilization ``1/p``. Peak in-flight micro-batches: 1.
    """
    _check(p, m)
    order = [a for i in range(m) for a in (F(i), B(i))]
    return Schedule([order] * p, m=m, v=1, name="naive")


def gpipe(p: int, m: int) -> Schedule:
    """GPipe (fill–drain; Huang et al. 2019): all forwards, then all backwards.

    Step time ``(m + p − 1)(t_f + t_b)``; bubble ``(p − 1)/(m + p − 1)`` of the step,
    ``(p − 1)/m`` relative to useful work. Peak in-flight micro-batches: ``m`` on every rank.
    """
    _check(p, m)
    order = [F(i) for i in range(m)] + [B(i) for i in range(m)]
    return Schedule([order] * p, m=m, v=1, name="gpipe")


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B, PipeDream-Flush (Narayanan et al. 2021): warm-up, steady one-forward-one-backward, cool-down.

    Same step time and bubble as GPipe; peak in-flight micro-batches on rank ``r`` is
    ``min(p − r, m)`` instead of ``m``.
    """
    _check(p, m)
    ranks = []
    for r in range(p):
        warmup = min(p - r - 1, m)  # forwards before the first backward
        order = [F(i) for i in range(warmup)]  # warm-up
        for i in range(m - warmup):  # steady state: F of the newest, B of the oldest
            order += [F(warmup + i), B(i)]
        order += [B(i) for i in range(m - warmup, m)]  # cool-down
        ranks.append(order)
    return Schedule(ranks, m=m, v=1, name="1f1b")


def interleaved(p: int, m: int, v: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): ``v`` model chunks per rank.

    Micro-batches go through the chunks in groups of ``p``; rank ``r`` warms up with
    ``2(p − r − 1) + (v − 1)p`` forwards. Bubble ``(p − 1)/(v·m)`` relative to useful work
    (``(p − 1)/(v·m + p − 1)`` of the step). Peak in-flight (chunk, micro-batch) stashes on
    rank 0: ``min(v·m, (v − 1)p + 2(p − 1) + 1)``; ``v×`` more messages than 1F1B.

    Raises:
        ValueError: ``m % p != 0`` (Megatron-LM's requirement) or ``v < 1``.
    """
    _check(p, m)
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
        return Action(Kind.F if forward else Kind.B, mb, chunk if forward else v - 1 - chunk)

    ranks = []
    for r in range(p):
        warmup = total if m == p and v > 1 else min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [nth(k, True) for k in range(warmup)]  # warm-up
        for k in range(total - warmup):  # steady state
            order += [nth(warmup + k, True), nth(k, False)]
        order += [nth(k, False) for k in range(total - warmup, total)]  # cool-down
        ranks.append(order)
    return Schedule(ranks, m=m, v=v, name="interleaved")


def zb_h1(p: int, m: int) -> Schedule:
    """Zero-bubble ZB-H1 (Qi et al. 2024): 1F1B with backward split into ``B`` and ``W``.

    ``F`` and ``B`` (input gradient) keep 1F1B's order. A ``W`` (weight gradient) runs when
    its rank would otherwise wait for input, or as soon as rank ``r`` has more than ``r``
    deferred. The order is found by playing that rule on unit costs (``t_f = t_b = t_w``).
    Bubble ``(p − 1)(t_f + t_b − t_w)`` instead of 1F1B's ``(p − 1)(t_f + t_b + t_w)`` (for
    ``m >= p``). Peak in-flight forwards awaiting ``B`` on rank ``r``: ``min(p − r, m)``, as
    1F1B; counting those that still wait for ``W``, ``min(p, m)`` on every rank: 1F1B's peak.
    """
    _check(p, m)
    todo = [list(order) for order in one_f_one_b(p, m).ranks]  # 1F1B's F/B order
    ranks: list[list[Action]] = [[] for _ in range(p)]
    free = [0] * p  # when each rank is next idle
    finish: dict[tuple[int, Action], int] = {}
    waiting_w: list[list[int]] = [[] for _ in range(p)]  # micro-batches whose W is deferred

    def ready(r: int, a: Action) -> int | None:  # when a's input is there (None: not yet known)
        if a.kind is Kind.F:
            return 0 if r == 0 else finish.get((r - 1, a))
        return 0 if r == p - 1 else finish.get((r + 1, a))

    while any(todo) or any(waiting_w):
        best: tuple[int, int, bool] | None = None
        for r in range(p):
            t = ready(r, todo[r][0]) if todo[r] else None
            must_w = len(waiting_w[r]) > r or not todo[r]
            if waiting_w[r] and (must_w or t is None or t > free[r]):
                cand = (free[r], r, True)  # fill the wait with a deferred W
            elif todo[r] and t is not None:
                cand = (max(free[r], t), r, False)
            else:
                continue
            best = cand if best is None or cand < best else best
        start, r, do_w = best  # type: ignore[misc]
        a = W(waiting_w[r].pop(0)) if do_w else todo[r].pop(0)
        if a.kind is Kind.B:
            waiting_w[r].append(a.mb)
        free[r] = finish[(r, a)] = start + 1
        ranks[r].append(a)
    return Schedule(ranks, m=m, v=1, name="zb-h1")


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "naive": naive,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
    "zb-h1": zb_h1,
}


def make_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """Build a schedule by name: ``make_schedule("1f1b", p=4, m=8)``.

    Args:
        name: one of ``naive``, ``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``.
        p: ranks. m: micro-batches. v: chunks per rank (``interleaved`` only; default 2 there).

    Raises:
        ValueError: unknown name, or ``v > 1`` for a schedule without chunks.
    """
    key = name.lower().replace("_", "-")
    key = {"zbh1": "zb-h1", "one-f-one-b": "1f1b", "pipedream-flush": "1f1b"}.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if key == "interleaved":
        return interleaved(p, m, v if v > 1 else 2)
    if v != 1:
        raise ValueError(f"schedule {key!r} has one chunk per rank; v={v} needs 'interleaved'")
    return SCHEDULES[key](p, m)
