"""Schedules as plain data: the action, the per-rank orders, and their text form.

A schedule says, for every rank, the order in which it runs its compute actions:
forward ``F``, backward ``B`` and (when the backward is split, zero-bubble style) the
weight-gradient part ``W`` of micro-batch ``i`` on model chunk ``c``. Nothing here imports
``torch``: the same object feeds the validator, the simulator, the plots and the runtime.

Notation (used everywhere): ``p`` ranks, ``m`` micro-batches, ``v`` chunks per rank. The
schedule's ``placement`` says which pipeline stage of ``S = p * v`` each chunk of each rank runs:
by default chunk ``c`` of rank ``r`` is stage ``s = c * p + r`` (Megatron-LM's virtual stages,
the "loop"); ``"v"`` folds the pipeline back so the last stage sits on rank 0. An action prints
as ``F3`` (micro-batch 3, chunk 0) or ``1B3`` (chunk 1).
"""


from __future__ import annotations

import enum
import functools
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter

__all__ = ["Kind", "Action", "action", "F", "B", "W", "Schedule", "parse_actions", "check_sizes",
           "make_placement"]


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


@functools.cache
def action(kind: Kind, mb: int, chunk: int = 0) -> Action:
    """``Action(kind, mb, chunk)``, one shared object per value (generators make millions)."""
    return Action(kind, mb, chunk)


def F(mb: int, chunk: int = 0) -> Action:
    """Forward of micro-batch ``mb`` on chunk ``chunk``."""
    return action(Kind.F, mb, chunk)


def B(mb: int, chunk: int = 0) -> Action:
    """Backward (input gradient if the schedule splits backward) of ``mb`` on ``chunk``."""
    return action(Kind.B, mb, chunk)


def W(mb: int, chunk: int = 0) -> Action:
    """Weight-gradient part of the backward of ``mb`` on ``chunk``."""
    return action(Kind.W, mb, chunk)


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
        actions.append(action(Kind(kind), int(mb), int(chunk or 0)))
    return tuple(actions)


def _as_actions(rank: Iterable[Action | str] | str) -> tuple[Action, ...]:
    if isinstance(rank, str):
        return parse_actions(rank)
    rank = tuple(rank)
    if set(map(type, rank)) <= {Action}:  # the generators' case, checked in C
        return rank
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
        placement: which ``(rank, chunk)`` runs each pipeline stage, in stage order:
            ``"loop"`` (default; Megatron-LM's ``stage = chunk·p + rank``), ``"v"`` (chunk
            ``c`` runs stage ``c·p + rank`` for even ``c`` and ``c·p + p − 1 − rank`` for odd
            ``c``: with two chunks the last stage sits on rank 0, beside the first), or an
            explicit list of ``(rank, chunk)`` pairs, one per stage.

    Example:
        >>> Schedule(["F0 F1 B0 B1", "F0 B0 F1 B1"], name="mine").p
        2
    """

    ranks: tuple[tuple[Action, ...], ...]
    m: int
    v: int
    name: str
    placement: tuple[tuple[int, int], ...]  #: ``(rank, chunk)`` of each stage, in stage order

    def __init__(
        self,
        ranks: Sequence[Iterable[Action | str] | str],
        m: int | None = None,
        v: int | None = None,
        name: str = "custom",
        placement: str | Sequence[tuple[int, int]] = "loop",
    ) -> None:
        orders = tuple(_as_actions(r) for r in ranks)
        if not orders:
            raise ValueError("a schedule needs at least one rank")
        object.__setattr__(self, "ranks", orders)
        if m is None:
            m = 1 + max((max(map(attrgetter("mb"), o), default=-1) for o in orders), default=-1)
        if v is None:
            v = 1 + max((max(map(attrgetter("chunk"), o), default=0) for o in orders), default=0)
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "v", v)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "placement", make_placement(placement, len(orders), self.v))
        stage_of = [[-1] * self.v for _ in orders]
        for st, (r, c) in enumerate(self.placement):
            stage_of[r][c] = st
        object.__setattr__(self, "_stage_of", tuple(map(tuple, stage_of)))

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

    @property
    def placement_name(self) -> str:
        """``"loop"``, ``"v"`` or ``"custom"``."""
        for name in ("loop", "v"):
            if self.placement == make_placement(name, self.p, self.v):
                return name
        return "custom"

    def stage(self, rank: int, chunk: int) -> int:
        """Pipeline stage run by ``chunk`` of ``rank`` (loop placement: ``chunk * p + rank``)."""
        return self._stage_of[rank][chunk]

    def place(self, stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` that runs ``stage``."""
        return self.placement[stage]

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
        where = self.placement_name
        extra = "" if where == "loop" else f", placement={where if where != 'custom' else list(self.placement)!r}"
        return f"Schedule([{body}], m={self.m}, v={self.v}, name={self.name!r}{extra})"


# ---------------------------------------------------------------------------- placement


def make_placement(placement: str | Sequence[tuple[int, int]], p: int,
                   v: int) -> tuple[tuple[int, int], ...]:
    """``(rank, chunk)`` of each of the ``p·v`` stages, for a name or an explicit list.

    Raises:
        ValueError: an unknown name, or a list that is not one stage per ``(rank, chunk)``.
    """
    if placement == "loop":
        return tuple((s % p, s // p) for s in range(p * v))
    if placement == "v":
        return tuple(((s % p) if (s // p) % 2 == 0 else p - 1 - s % p, s // p)
                     for s in range(p * v))
    if isinstance(placement, str):
        raise ValueError(f"unknown placement {placement!r}: use 'loop', 'v' or a list of "
                         "(rank, chunk) pairs, one per stage")
    out = tuple((int(r), int(c)) for r, c in placement)
    every = {(r, c) for r in range(p) for c in range(v)}
    if len(out) != p * v or set(out) != every:
        raise ValueError(f"a placement must list each of the {p * v} (rank, chunk) pairs once "
                         f"(p={p}, v={v}), got {list(out)}")
    return out


# ---------------------------------------------------------------------------- generators


def check_sizes(p: int, m: int) -> None:
    """The generators' common argument check (any integer type, numpy's too, is an int)."""
    for name, x in (("p", p), ("m", m)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {x!r} ({type(x).__name__})")
    if p < 1 or m < 1:
        raise ValueError(f"need p >= 1 stages and m >= 1 micro-batches, got p={p}, m={m}")
