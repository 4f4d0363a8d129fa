"""Long schedules written as patterns of kinds, their micro-batches numbered by numpy.

A generator such as ZB-V's repeats a few steps thousands of times (``F B W`` on chunk 0, then
on chunk 1, ...). Written action by action that is one Python call per action; written as a
pattern of tokens with list arithmetic (``[F0, B0, W0] * n``) and numbered afterwards it costs
a few numpy passes, which keeps ``p = 64, m = 1024`` well under a tenth of a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from .base import Schedule

__all__ = ["numbered", "F0", "F1", "B0", "B1", "W0", "W1"]

#: a (kind, chunk) as a token, ``kind·v + chunk`` for two chunks per rank
F0, F1, B0, B1, W0, W1 = range(6)


def numbered(rows: Sequence[Sequence[int]], m: int, v: int, cls: type | None = None,
             **kwargs) -> Schedule:
    """A schedule from each rank's order of *kinds* only, micro-batches numbered by appearance.

    ``rows[r]`` lists rank ``r``'s actions as tokens ``kind·v + chunk`` (kind 0 = F, 1 = B,
    2 = W); the ``k``-th token of a (kind, chunk) on a rank is micro-batch ``k`` (F, B and W of
    one chunk each run their micro-batches in increasing order in every order built this way).
    Tokens numbered ``m`` or more are dropped, so a generator may write the pattern for more
    micro-batches and cut it down. ``cls``: a subclass of :class:`Schedule` to build (other
    keyword arguments go to its constructor).
    """
    lengths = [len(row) for row in rows]
    total = sum(lengths)
    token = np.fromiter(chain.from_iterable(rows), np.int64, total)
    rank = np.repeat(np.arange(len(rows)), lengths)
    key = rank * 3 * v + token  # (rank, kind, chunk)
    order = np.argsort(key, kind="stable")
    first = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])  # each group's start
    mb = np.empty(total, np.int64)
    mb[order] = np.arange(total) - np.repeat(first, np.diff(np.r_[first, total]))
    keep = mb < m
    bounds = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(np.bincount(rank[keep], minlength=len(rows)), out=bounds[1:])
    token = token[keep]
    return (cls or Schedule).from_columns(token // v, token % v, mb[keep], bounds, m, v, **kwargs)
