"""What autograd does for a pipeline stage: the activation meter and the split backward.

:class:`ActivationMeter` sees every tensor a stage's forward saves for backward.
:func:`backward_input` and :func:`backward_weight` split one backward into zero-bubble ``B``
(the gradient for the stage input, needed by the previous stage now) and ``W`` (the weight
gradients, which can wait).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from ..models import backward_phase

__all__ = ["ActivationMeter", "backward_input", "backward_weight"]


class ActivationMeter:
    """Bytes autograd saves for backward, per (chunk, micro-batch), live and at peak.

    A ``saved_tensors_hooks`` pack hook sees every tensor saved during a forward; each storage
    is counted once, parameters not at all. Exact and deterministic on CPU. The hooks cost a
    few microseconds per saved tensor in forward and again in backward, so a micro-batch whose
    ``key`` (its chunk and shapes) was measured before reuses that count: exact for models
    whose saved tensors depend only on the input shapes (every model in :mod:`minipipe.models`).
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.held: dict[tuple[int, int], int] = {}
        self.per_mb: dict[int, int] = {}  # chunk -> bytes of one micro-batch
        self.known: dict[Any, int] = {}  # key -> bytes measured for it
        self.live = 0
        self.peak = 0

    @contextlib.contextmanager
    def record(self, chunk: int, mb: int, key: Any = None):
        total = self.known.get(key) if key is not None else None
        if total is None:
            seen: set[int] = set()
            sizes: list[int] = []

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self.param_storages and ptr not in seen:
                    seen.add(ptr)
                    sizes.append(storage.nbytes())
                # a detached alias: autograd would hold ``t`` itself as a Python object, in a
                # cycle with its grad_fn that the garbage collector cannot see, so graph parts
                # no backward frees (a split backward's input-only nodes) would leak
                return t.detach()

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
            total = sum(sizes)
            if key is not None:
                self.known[key] = total
        else:
            yield
        self.held[(chunk, mb)] = total
        self.per_mb.setdefault(chunk, total)
        self.live += total
        self.peak = max(self.peak, self.live)

    def release(self, chunk: int, mb: int) -> None:
        self.live -= self.held.pop((chunk, mb))


# ---------------------------------------------------------------- split backward (B, then W)


def backward_input(out: torch.Tensor, grad: torch.Tensor | None, inp: torch.Tensor | None,
                   params: list[nn.Parameter]) -> tuple[torch.Tensor | None, tuple]:
    """B of a split backward: the gradient for the stage input now; W's part is kept for later.

    torch's pipelining helpers record the gradients arriving at the nodes that feed the
    weights, so :func:`backward_weight` computes only weight gradients. Without an input
    gradient to compute (stage 0), W walks the kept graph from the output: that is the whole
    backward, and it is W's to do.

    Returns:
        ``(input gradient or None, kept)``; pass ``kept`` to :func:`backward_weight`.
    """
    try:  # imported here: torch.distributed.pipelining costs each rank ~1 s to import
        from torch.distributed.pipelining._backward import stage_backward_input
    except ImportError:  # pragma: no cover - a torch without it: W re-walks the graph
        stage_backward_input = None
    if not out.requires_grad or (inp is None and not params):  # no trainable weight up to here
        return None, ("none", params, None)
    with backward_phase("input"):
        if inp is not None and stage_backward_input is not None:
            (g_in,), groups = stage_backward_input([out], None if grad is None else [grad],
                                                   [inp], iter(params))
            return g_in, ("groups", params, groups)
        g_in = torch.autograd.grad(out, inp, grad, retain_graph=True)[0] if inp is not None else None
    return g_in, ("graph", params, (out, grad))


def backward_weight(kept: tuple) -> None:
    """W of a split backward: accumulate the weight gradients kept by :func:`backward_input`."""
    how, params, what = kept
    if how == "none" or not params:
        return
    with backward_phase("weight"):
        if how == "groups":
            from torch.distributed.pipelining._backward import stage_backward_weight

            stage_backward_weight(iter(params), what)
        else:
            out, grad = what
            torch.autograd.backward(out, grad, inputs=params)


# ------------------------------------------------------------------------------- the job


