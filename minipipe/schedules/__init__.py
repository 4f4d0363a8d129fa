"""Pipeline schedules as plain data (see :mod:`minipipe.schedules.base` for the notation) and
their generators, one module per family; :func:`make_schedule` builds one by name."""

from __future__ import annotations

import numbers
from typing import Callable

from .base import Action, B, F, Kind, Schedule, W, check_sizes, parse_actions
from .dualpipe import dualpipe
from .fill_drain import gpipe, naive
from .interleaved import interleaved
from .one_f_one_b import one_f_one_b
from .v_shape import OverlapSchedule, dualpipev, zb_v
from .zero_bubble import zb_h1, zb_h2

__all__ = [
    "Kind", "Action", "F", "B", "W", "Schedule", "parse_actions",
    "naive", "gpipe", "one_f_one_b", "interleaved", "zb_h1", "zb_h2",
    "zb_v", "dualpipev", "dualpipe", "OverlapSchedule", "SCHEDULES", "make_schedule",
]


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "naive": naive,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "dualpipev": dualpipev,
    "dualpipe": dualpipe,
}


def make_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """Build a schedule by name: ``make_schedule("1f1b", p=4, m=8)``.

    Args:
        name: one of ``naive``, ``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``, ``zb-h2``,
            ``zb-v``, ``dualpipev``, ``dualpipe``.
        p: ranks. m: micro-batches. v: chunks per rank (``interleaved`` only; default 2 there;
            ``zb-v``, ``dualpipev`` and ``dualpipe`` always have 2, on the V placement;
            ``dualpipe`` runs two pipelines, one per direction).

    Raises:
        ValueError: unknown name, or ``v > 1`` for a schedule without chunks.
    """
    key = name.lower().replace("_", "-")
    key = {"zbh1": "zb-h1", "zbh2": "zb-h2", "zbv": "zb-v", "dualpipe-v": "dualpipev",
           "one-f-one-b": "1f1b", "pipedream-flush": "1f1b"}.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    check_sizes(p, m)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"v (chunks per rank) must be an int >= 1, got {v!r}")
    p, m, v = int(p), int(m), int(v)  # numpy integers too
    if key == "interleaved":
        return interleaved(p, m, v if v > 1 else 2)
    if key in ("zb-v", "dualpipev", "dualpipe"):
        if v not in (1, 2):
            raise ValueError(f"schedule {key!r} has two chunks per rank (V placement), not v={v}")
        return SCHEDULES[key](p, m)
    if v != 1:
        raise ValueError(f"schedule {key!r} has one chunk per rank; v={v} needs 'interleaved'")
    return SCHEDULES[key](p, m)
