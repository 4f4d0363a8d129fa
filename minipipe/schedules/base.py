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

With ``pipelines = P > 1`` (bidirectional DualPipe) the ``S`` stages form ``P`` consecutive
groups of ``S' = S / P``; micro-batch ``i`` travels group ``i // (m / P)`` only, and stage
``g·S' + k`` holds the same layers as stage ``k`` (a replica, its gradients summed).
"""


from __future__ import annotations

import enum
import functools
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any

__all__ = ["Kind", "Action", "action", "F", "B", "W", "Schedule", "parse_actions", "check_sizes",
           "make_placement"]


class Kind(str, enum.Enum):
    """What a compute action does."""

    F = "F"  #: forward
    B = "B"  #: backward (input gradient only when the schedule also has W actions)
    W = "W"  #: weight gradient (split backward, zero-bubble schedules)


_KIND_INDEX = {Kind.F: 0, Kind.B: 1, Kind.W: 2}
CHUNK_BITS = 16  #: an action's ``code``: ``mb << 18 | chunk << 2 | kind`` (F 0, B 1, W 2)


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
        if self.chunk >= 1 << CHUNK_BITS:
            raise ValueError(f"chunk {self.chunk} is too large (at most {(1 << CHUNK_BITS) - 1})")
        # the action as one integer (see Schedule.columns): read in C when a schedule is compiled
        object.__setattr__(self, "code", ((self.mb << CHUNK_BITS | self.chunk) << 2)
                           | _KIND_INDEX[self.kind])

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


_CODE = attrgetter("code")


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
        pipelines: ``P`` pipelines side by side (default 1): the stages split into ``P``
            consecutive groups of ``S / P``, micro-batch ``i`` travels group
            :meth:`group_of` ``(i)`` only, and stage ``g·S/P + k`` is a replica of stage
            ``k`` (same layers). DualPipe: ``placement="v", v=2, pipelines=2``.

    Raises:
        ValueError: ``pipelines`` does not divide both the stages and ``m``.

    Example:
        >>> Schedule(["F0 F1 B0 B1", "F0 B0 F1 B1"], name="mine").p
        2
    """

    ranks: tuple[tuple[Action, ...], ...]
    m: int
    v: int
    name: str
    placement: tuple[tuple[int, int], ...]  #: ``(rank, chunk)`` of each stage, in stage order
    pipelines: int  #: groups of stages, each travelled by ``m / pipelines`` micro-batches

    def __init__(
        self,
        ranks: Sequence[Iterable[Action | str] | str],
        m: int | None = None,
        v: int | None = None,
        name: str = "custom",
        placement: str | Sequence[tuple[int, int]] = "loop",
        pipelines: int = 1,
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
        if (isinstance(pipelines, bool) or not isinstance(pipelines, numbers.Integral)
                or pipelines < 1 or (len(orders) * self.v) % pipelines or m % pipelines):
            raise ValueError(f"pipelines={pipelines!r} must be an int >= 1 dividing both the "
                             f"{len(orders) * self.v} stages and the m={m} micro-batches")
        object.__setattr__(self, "pipelines", int(pipelines))

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

    def memo(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, worked out once per schedule and kept (a schedule never changes).

        The fast checks and the simulator keep what they derive from the orders alone (the
        integer columns, the compiled dependencies) here, so validating and then simulating a
        schedule of half a million actions derives them once. Not pickled.
        """
        memos = self.__dict__.setdefault("_memo", {})
        if name not in memos:
            memos[name] = compute()
        return memos[name]

    def columns(self) -> tuple:
        """The actions of every rank as integer columns (computed once, :meth:`memo`).

        Returns ``(kind, chunk, mb, bounds)``: numpy arrays over all ranks' actions, rank 0's
        order first (kind 0 = F, 1 = B, 2 = W); rank ``r``'s actions are
        ``bounds[r]:bounds[r + 1]``. This is what the fast checks and the simulator read.
        """
        return self.memo("columns", self._columns)

    def _columns(self) -> tuple:
        import numpy as np  # noqa: PLC0415 (numpy only for the fast path)

        lengths = [len(order) for order in self.ranks]
        codes = np.fromiter(map(_CODE, chain.from_iterable(self.ranks)), np.int64, sum(lengths))
        bounds = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=bounds[1:])
        return (codes & 3, (codes >> 2) & ((1 << CHUNK_BITS) - 1), codes >> (CHUNK_BITS + 2),
                bounds)

    @classmethod
    def from_columns(cls, kind, chunk, mb, bounds, m: int, v: int, **kwargs) -> Schedule:
        """The schedule whose :meth:`columns` are these (how the fast generators build one).

        ``kind``, ``chunk``, ``mb``: integer numpy arrays, every rank's actions in order, rank
        ``r``'s at ``bounds[r]:bounds[r + 1]``; other keyword arguments go to the constructor.
        """
        table = [action(k, i, c) for k in Kind for c in range(v) for i in range(m)]
        index, b = ((kind * v + chunk) * m + mb).tolist(), bounds.tolist()
        ranks = [list(map(table.__getitem__, index[b[r]:b[r + 1]])) for r in range(len(b) - 1)]
        schedule = cls.__new__(cls)
        schedule.memo("columns", lambda: (kind, chunk, mb, bounds))  # known before __init__
        schedule.__init__(ranks, m=m, v=v, **kwargs)
        return schedule

    def __getstate__(self) -> dict:  # what is kept in memo is rebuilt on demand, not shipped
        state = dict(self.__dict__)
        state.pop("_memo", None)
        return state

    def stage(self, rank: int, chunk: int) -> int:
        """Pipeline stage run by ``chunk`` of ``rank`` (loop placement: ``chunk * p + rank``)."""
        return self._stage_of[rank][chunk]

    def place(self, stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` that runs ``stage``."""
        return self.placement[stage]

    # -- pipelines (groups of stages; 1 except for bidirectional DualPipe) ---------------
    @property
    def group_stages(self) -> int:
        """``S' = S / pipelines``: stages of one group, the model's stages."""
        return self.num_stages // self.pipelines

    @property
    def group_mbs(self) -> int:
        """``m / pipelines``: micro-batches travelling each group."""
        return self.m // self.pipelines

    def group_of(self, mb: int) -> int:
        """The group of stages micro-batch ``mb`` travels: ``mb // (m / pipelines)``."""
        return mb // self.group_mbs

    def group_of_stage(self, stage: int) -> int:
        """The group ``stage`` belongs to."""
        return stage // self.group_stages

    def stages_of_group(self, group: int) -> range:
        """The stages of ``group``, in pipeline order."""
        return range(group * self.group_stages, (group + 1) * self.group_stages)

    def mbs_of_stage(self, stage: int) -> range:
        """The micro-batches that visit ``stage`` (all ``m`` when ``pipelines == 1``)."""
        g = self.group_of_stage(stage)
        return range(g * self.group_mbs, (g + 1) * self.group_mbs)

    def first_stage(self, mb: int) -> int:
        """The stage where micro-batch ``mb`` enters (reads its input)."""
        return self.group_of(mb) * self.group_stages

    def last_stage(self, mb: int) -> int:
        """The stage where micro-batch ``mb`` leaves (its loss is computed there)."""
        return (self.group_of(mb) + 1) * self.group_stages - 1

    def is_first(self, stage: int) -> bool:
        """Whether ``stage`` is the first of its group (reads the input)."""
        return stage % self.group_stages == 0

    def is_last(self, stage: int) -> bool:
        """Whether ``stage`` is the last of its group (computes the loss)."""
        return stage % self.group_stages == self.group_stages - 1

    def model_stage(self, stage: int) -> int:
        """The model stage whose layers ``stage`` holds: ``stage mod S'`` (itself when
        ``pipelines == 1``)."""
        return stage % self.group_stages

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return self.p

    def __getitem__(self, rank: int) -> tuple[Action, ...]:
        return self.ranks[rank]

    def __str__(self) -> str:
        show = self.v > 1
        width = len(str(self.p - 1))
        both = f" pipelines={self.pipelines}" if self.pipelines != 1 else ""
        lines = [f"{self.name}: p={self.p} m={self.m} v={self.v}{both}"]
        for r, order in enumerate(self.ranks):
            lines.append(f"rank {r:>{width}}: " + " ".join(a.label(show) for a in order))
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the grid
        printer.text(str(self))

    def __repr__(self) -> str:
        body = ", ".join(repr(" ".join(a.label(self.v > 1) for a in o)) for o in self.ranks)
        where = self.placement_name
        extra = "" if where == "loop" else f", placement={where if where != 'custom' else list(self.placement)!r}"
        extra += f", pipelines={self.pipelines}" if self.pipelines != 1 else ""
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
