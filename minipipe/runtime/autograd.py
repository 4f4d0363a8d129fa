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
from torch.multiprocessing.reductions import StorageWeakRef

from ..models import backward_phase

__all__ = ["ActivationMeter", "backward_input", "backward_weight"]

_CASTS = {"ToCopyBackward0", "TBackward0", "TransposeBackward0", "ViewBackward0", "PermuteBackward0"}


class ActivationMeter:
    """Bytes autograd saves for backward on one rank: per micro-batch, live, and at peak.

    ``mode="observed"`` (the default) watches the memory itself. A ``saved_tensors_hooks``
    pack hook sees every tensor a forward saves and registers its *storage* (the memory, not
    the tensor object autograd holds: a view dies with the graph even while something else
    keeps the memory alive) through a weak reference, the one torch keeps for its own
    multiprocessing (:class:`torch.multiprocessing.reductions.StorageWeakRef`). Each storage
    counts once, parameters never, and the meter itself holds no storage. :meth:`sample`, called
    after every action, adds up the registered storages still alive: that total drops when the
    memory is really freed (by autograd, or never, if something still holds it), not when the
    runtime says it should. The peak is the largest sample; between two actions memory can
    only be allocated inside an action, so samples at action boundaries see every peak of what
    forwards saved.

    ``mode="counted"`` is the cheap bookkeeping for benchmarks: it measures the first
    micro-batch of each ``key`` (chunk and shapes), adds that figure at every ``F`` and
    subtracts it when the runtime calls :meth:`release`. It cannot see a leak or memory whose
    size depends on the data, so it is named *counted* wherever it is shown.
    """

    MODES = ("observed", "counted")

    def __init__(self, params: Sequence[nn.Parameter], mode: str = "observed") -> None:
        if mode not in self.MODES:
            raise ValueError(f"memory must be one of {self.MODES}, not {mode!r}")
        self.mode = mode
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.per_mb: dict[int, int] = {}  # chunk -> bytes its first micro-batch saved
        self.bytes: dict[tuple[int, int], int] = {}  # (chunk, mb) -> bytes saved, this step
        self.trace: list[tuple[str, int, dict]] = []  # (action, live bytes, held()) this step
        self.live = 0
        self.peak = 0  # over every sample of every step
        self._alive: dict[int, tuple[StorageWeakRef, int, tuple[int, int]]] = {}  # observed
        self._held: dict[tuple[int, int], int] = {}  # counted
        self._known: dict[Any, int] = {}  # counted: key -> bytes measured for it

    def start_step(self) -> None:
        """A new step: per-micro-batch figures and the trace start again (the peak does not)."""
        self.bytes, self.trace = {}, []

    @contextlib.contextmanager
    def record(self, chunk: int, mb: int, key: Any = None):
        """Watch what the forward run inside this block saves for backward."""
        if self.mode == "counted" and key is not None and key in self._known:
            yield
            self._count(chunk, mb, self._known[key])
            return
        tag, sizes, seen = (chunk, mb), [], set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ident = storage._cdata  # the storage itself, whichever tensor views it
            if storage.data_ptr() not in self.param_storages and ident not in seen \
                    and not self._cast(t):  # autocast's low-precision weight copies: weights
                seen.add(ident)
                if self.mode == "observed":
                    old = self._alive.get(ident)
                    if old is None or old[0].expired():  # an address can be reused once freed
                        self._alive[ident] = (StorageWeakRef(storage), storage.nbytes(), tag)
                        sizes.append(storage.nbytes())
                else:
                    sizes.append(storage.nbytes())
            # a detached alias: autograd would hold ``t`` itself as a Python object, in a
            # cycle with its grad_fn that the garbage collector cannot see, so graph parts
            # no backward frees (a split backward's input-only nodes) would leak
            return t.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
        total = sum(sizes)
        if self.mode == "observed":
            self.bytes[tag] = total
            self.per_mb.setdefault(chunk, total)
            return
        if key is not None:
            self._known[key] = total
        self._count(chunk, mb, total)

    def _count(self, chunk: int, mb: int, total: int) -> None:
        self.bytes[(chunk, mb)] = total
        self.per_mb.setdefault(chunk, total)
        self._held[(chunk, mb)] = total
        self.live += total
        self.peak = max(self.peak, self.live)

    def _cast(self, t: torch.Tensor) -> bool:
        """A low-precision copy of a parameter made by autocast (weights, not activations)."""
        fn = t.grad_fn
        for _ in range(4):
            name = type(fn).__name__
            if name == "AccumulateGrad":
                return fn.variable.untyped_storage().data_ptr() in self.param_storages
            if fn is None or name not in _CASTS:
                return False
            fn = fn.next_functions[0][0]
        return False

    def release(self, chunk: int, mb: int) -> None:
        """Counted mode: the runtime says this micro-batch's saved tensors are gone now."""
        if self.mode == "counted":
            self.live -= self._held.pop((chunk, mb))

    def sample(self, label: str) -> int:
        """Live bytes now (observed: storages still alive); recorded in the trace and peak."""
        held = self.held()
        self.live = sum(held.values())
        self.peak = max(self.peak, self.live)
        self.trace.append((label, self.live, held))
        return self.live

    def held(self) -> dict[tuple[int, int], int]:
        """Live bytes now by the (chunk, micro-batch) whose forward saved them."""
        if self.mode == "counted":
            return dict(self._held)
        for ident in [i for i, (ref, _, _) in self._alive.items() if ref.expired()]:
            del self._alive[ident]
        out: dict[tuple[int, int], int] = {}
        for _, n, tag in self._alive.values():
            out[tag] = out.get(tag, 0) + n
        return out

    def report(self) -> dict[str, Any]:
        """What this step's record keeps: bytes per micro-batch, the trace, the mode."""
        return {"act_bytes": dict(self.bytes), "act_trace": list(self.trace),
                "act_mode": self.mode}


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


# ---------------------------------------------------------------- split backward (B, then W)


def backward_input(out: Any, grad: Any, inp: Any,
                   params: list[nn.Parameter]) -> tuple[Any, tuple]:
    """B of a split backward: the gradient for the stage input now; W's part is kept for later.

    torch's pipelining helpers record the gradients arriving at the nodes that feed the
    weights, so :func:`backward_weight` computes only weight gradients. Without an input
    gradient to compute (stage 0), W walks the kept graph from the output: that is the whole
    backward, and it is W's to do. ``out``, ``grad`` and ``inp`` are tensors or lists of them
    (a stage boundary carrying several tensors); the gradient comes back in ``inp``'s form.

    Returns:
        ``(input gradient(s) or None, kept)``; pass ``kept`` to :func:`backward_weight`.
    """
    try:  # imported here: torch.distributed.pipelining costs each rank ~1 s to import
        from torch.distributed.pipelining._backward import stage_backward_input
    except ImportError:  # pragma: no cover - a torch without it: W re-walks the graph
        stage_backward_input = None
    many = isinstance(inp, (list, tuple))
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    grads = None if grad is None else list(grad) if isinstance(grad, (list, tuple)) else [grad]
    ins = None if inp is None else list(inp) if many else [inp]
    if not any(o.requires_grad for o in outs) or (not ins and not params):
        return None, ("none", params, None)  # no trainable weight up to here
    with backward_phase("input"):
        if ins and stage_backward_input is not None:
            g_in, groups = stage_backward_input(outs, grads, ins, iter(params))
            kept: tuple = ("groups", params, groups)
        else:
            g_in = torch.autograd.grad(outs, ins, grads, retain_graph=True,
                                       allow_unused=True) if ins else None
            kept = ("graph", params, (outs, grads))
    if g_in is None:
        return None, kept
    return (list(g_in) if many else g_in[0]), kept


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


