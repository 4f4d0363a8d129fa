"""What crosses a stage boundary (and what a batch's inputs and targets may be): a tensor, or a tuple/list/dict of tensors and ``None``.

A boundary value is flattened into its *leaves* (tensors or ``None``, in a fixed order) and a
*tree* that says how to put them back. The tree and each leaf's dtype and shape form its
:class:`Signature`, sent once per stage edge and again only when it changes (see
:mod:`minipipe.runtime.comm`). Floating-point leaves carry gradients back; integer and bool
leaves (token ids, masks) travel forward only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Signature", "flatten", "unflatten", "signature", "split", "rows", "take_rows",
           "as_stage_input", "detach", "differentiable", "cast_floating"]

Leaf = torch.Tensor | None


def flatten(value: Any) -> tuple[Any, list[Leaf]]:
    """``(tree, leaves)``: the tree is nested tuples (``"T"`` a tensor, ``"N"`` None)."""
    leaves: list[Leaf] = []
    return _walk(value, leaves), leaves


def _walk(v: Any, leaves: list[Leaf]) -> Any:
    # a module-level function, not a closure: a recursive closure is a reference cycle that
    # would keep ``leaves`` (this micro-batch's tensors) alive until the garbage collector runs
    if v is None:
        leaves.append(None)
        return "N"
    if isinstance(v, torch.Tensor):
        leaves.append(v)
        return "T"
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_walk(x, leaves) for x in v))
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError("a dict crossing a stage boundary needs string keys")
        return ("dict", tuple((k, _walk(x, leaves)) for k, x in v.items()))
    raise TypeError(f"a stage boundary can carry tensors, None, tuples, lists and dicts "
                    f"of them, not {type(v).__name__}")


def unflatten(tree: Any, leaves: list[Leaf]) -> Any:
    """The inverse of :func:`flatten`."""
    return _build(tree, iter(leaves))


def _build(t: Any, it: Any) -> Any:
    # module-level for the same reason as _walk: no reference cycle holding the tensors
    if t in ("T", "N"):
        return next(it)
    kind, items = t
    if kind == "dict":
        return {k: _build(x, it) for k, x in items}
    out = [_build(x, it) for x in items]
    return tuple(out) if kind == "tuple" else out


@dataclass(frozen=True)
class Signature:
    """The tree of a boundary value and each tensor leaf's ``(dtype name, shape)``."""

    tree: Any
    leaves: tuple[tuple[str, tuple[int, ...]] | None, ...]

    def encode(self) -> bytes:
        return json.dumps([self.tree, self.leaves]).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Signature:
        tree, leaves = json.loads(raw.decode())
        return cls(_tuples(tree), tuple(None if x is None else (x[0], tuple(x[1])) for x in leaves))

    def kinds(self) -> tuple:
        """The tree and each leaf's dtype and number of dimensions: all but the sizes."""
        return self.tree, tuple(None if x is None else (x[0], len(x[1])) for x in self.leaves)

    def metas(self) -> list[tuple[torch.dtype, tuple[int, ...]] | None]:
        return [None if x is None else (getattr(torch, x[0]), x[1]) for x in self.leaves]


def _tuples(tree: Any) -> Any:
    """JSON gives lists back; the tree is made of tuples (hashable, so signatures can be keys)."""
    return tuple(_tuples(x) for x in tree) if isinstance(tree, list) else tree


def signature(value: Any) -> Signature:
    tree, leaves = flatten(value)
    return Signature(tree, tuple(None if t is None else (str(t.dtype)[6:], tuple(t.shape))
                                 for t in leaves))


def split(value: Any, m: int, device: torch.device) -> list[Any]:
    """``value`` cut into ``m`` micro-batches along dim 0 of every tensor, on ``device``."""
    tree, leaves = flatten(value)
    parts = [[None] * m if t is None else [c.to(device, copy=True) for c in t.tensor_split(m)]
             for t in leaves]
    return [unflatten(tree, [p[i] for p in parts]) for i in range(m)]


def rows(value: Any) -> int:
    """Rows (dim 0) of the first tensor in ``value``: its number of samples."""
    first = next((t for t in flatten(value)[1] if t is not None), None)
    if first is None:
        raise TypeError("a batch needs at least one tensor")
    return first.shape[0]


def take_rows(value: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``value``."""
    tree, leaves = flatten(value)
    return unflatten(tree, [None if t is None else t[start:stop] for t in leaves])


def detach(value: Any) -> Any:
    tree, leaves = flatten(value)
    return unflatten(tree, [None if t is None else t.detach() for t in leaves])


def as_stage_input(value: Any) -> Any:
    """A received value as a stage input: floating leaves become leaves of a new graph."""
    tree, leaves = flatten(value)
    return unflatten(tree, [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None
                            for t in leaves])


def differentiable(value: Any) -> list[torch.Tensor]:
    """The floating-point leaves of ``value``, the ones a gradient flows back through."""
    return [t for t in flatten(value)[1] if t is not None and t.is_floating_point()]


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """Floating leaves in ``dtype`` (the compute dtype at a boundary); others unchanged."""
    tree, leaves = flatten(value)
    return unflatten(tree, [t.to(dtype) if t is not None and t.is_floating_point() else t
                            for t in leaves])
