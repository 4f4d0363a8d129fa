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
from ..structure import flatten

__all__ = ["ActivationMeter", "backward_input", "backward_weight", "frees", "predict_live",
           "predict_peak"]

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

    Who holds each storage, and until which action, is recorded beside it (the facts the
    prediction, :func:`predict_peak`, walks the schedule order with): what the chunk's graph
    saved until the action that ends that graph, what the loss saved (:meth:`loss`) until the
    action that backpropagates through it, the stage's input and output kept for the backward
    (:meth:`hold`) until the action that drops them (:func:`frees` says which, for each way a
    backward runs). A storage several holders share — the output a stage hands to the next
    stage on the same rank, saved by that stage's forward — is counted once and held until its
    last holder lets go. These are declarations: the live total is still what is observed.

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
        self._until: dict[int, set] = {}  # observed: storage -> the actions that drop a holder
        self._kept: dict[int, tuple[StorageWeakRef, set]] = {}  # held, not (yet) saved
        self._facts: list[tuple[tuple[int, int], int, set]] = []  # (tag, bytes, until), this step
        self._frees: dict[str, tuple] = {}  # record(): part -> the action that frees it
        self._part = "graph"
        self._held: dict[tuple[int, int], int] = {}  # counted
        self._known: dict[Any, int] = {}  # counted: key -> bytes measured for it

    def start_step(self) -> None:
        """A new step: per-micro-batch figures and the trace start again (the peak does not)."""
        self.bytes, self.trace, self._facts = {}, [], []

    @contextlib.contextmanager
    def record(self, chunk: int, mb: int, key: Any = None,
               backward: str = "whole"):
        """Watch what the forward run inside this block saves for backward; ``backward`` is
        how its backward will run (:func:`frees`), which says when each part is dropped."""
        self._frees = {part: (kind, chunk, mb) for part, kind in frees(backward).items()}
        self._part = "graph"
        if self.mode == "counted" and key is not None and key in self._known:
            yield
            self._count(chunk, mb, self._known[key])
            return
        tag, sizes, seen = (chunk, mb), [], set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ident = storage._cdata  # the storage itself, whichever tensor views it
            if storage.data_ptr() not in self.param_storages \
                    and not self._cast(t):  # autocast's low-precision weight copies: weights
                if self.mode == "observed":
                    self._register(ident, storage, tag, sizes)
                elif ident not in seen:
                    sizes.append(storage.nbytes())
                seen.add(ident)
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

    def _register(self, ident: int, storage: Any, tag: tuple[int, int], sizes: list) -> None:
        """Observed: a saved storage, counted once; every save of it adds its holder."""
        until = self._frees[self._part]
        known = self._holders(ident)
        if known is not None:  # saved before (by this forward or another): one more holder
            known.add(until)
            return
        kept = self._kept.pop(ident, None)  # a kept tensor's memory, saved only now
        holders = {until} | (kept[1] if kept is not None and not kept[0].expired() else set())
        self._alive[ident] = (StorageWeakRef(storage), storage.nbytes(), tag)
        self._until[ident] = holders
        self._facts.append((tag, storage.nbytes(), holders))
        sizes.append(storage.nbytes())

    def _holders(self, ident: int) -> set | None:
        """The holders of a registered storage still alive (an address is reused once freed)."""
        old = self._alive.get(ident)
        return self._until[ident] if old is not None and not old[0].expired() else None

    @contextlib.contextmanager
    def loss(self):
        """Inside :meth:`record`: what the loss saves, dropped when the backward passes it."""
        self._part = "loss"
        try:
            yield
        finally:
            self._part = "graph"

    def hold(self, value: Any) -> None:
        """The runtime keeps ``value`` (tensors) for the backward of the last :meth:`record`ed
        forward: a holder of their storages, saved now or by a later forward, until :func:`frees`
        says (observed mode; the counted mode knows only what :meth:`release` says)."""
        if self.mode != "observed" or not self._frees:
            return
        until = self._frees["kept"]
        for t in flatten(value)[1]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in \
                    self.param_storages:
                continue
            storage = t.untyped_storage()
            ident = storage._cdata
            known = self._holders(ident)
            if known is not None:
                known.add(until)
                continue
            kept = self._kept.get(ident)
            if kept is None or kept[0].expired():
                kept = self._kept[ident] = (StorageWeakRef(storage), set())
            kept[1].add(until)

    def _count(self, chunk: int, mb: int, total: int) -> None:
        until = self._frees.get("graph", ("B", chunk, mb))  # where release() will be called
        self._facts.append(((chunk, mb), total, {until}))
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
            del self._alive[ident], self._until[ident]
        for ident in [i for i, (ref, _) in self._kept.items() if ref.expired()]:
            del self._kept[ident]
        out: dict[tuple[int, int], int] = {}
        for _, n, tag in self._alive.values():
            out[tag] = out.get(tag, 0) + n
        return out

    def report(self) -> dict[str, Any]:
        """What this step's record keeps: bytes per micro-batch, the trace, the mode, and the
        holding facts: ``[((chunk, mb) that saved it, bytes, actions that drop its holders)]``,
        storages with the same facts added up."""
        spans: dict[tuple, int] = {}
        for tag, n, until in self._facts:
            key = (tag, tuple(sorted(until)))
            spans[key] = spans.get(key, 0) + n
        return {"act_bytes": dict(self.bytes), "act_trace": list(self.trace),
                "act_mode": self.mode,
                "act_spans": [(tag, n, until) for (tag, until), n in spans.items()]}


def frees(backward: str) -> dict[str, str]:
    """Which action of a micro-batch drops each part of what its forward left behind.

    Parts: ``graph`` (what the chunk's layers saved), ``loss`` (what the loss saved, last stage
    only), ``kept`` (the stage input and output the runtime keeps for the backward).
    ``backward``: ``"whole"`` — one ``B`` runs the whole backward and drops everything;
    ``"split"`` — ``B`` computes the input gradient (:func:`backward_input`): torch's helper
    then detaches the output, which frees what lies above the last layer with weights (the
    loss), and the runtime drops the input and output, while the graph ``W`` needs stays;
    ``"at-w"`` — a split backward without an input gradient (the first stage): ``B`` does
    nothing and ``W`` runs the whole backward from the kept output.
    """
    if backward == "whole":
        return {"graph": "B", "loss": "B", "kept": "B"}
    if backward == "split":
        return {"graph": "W", "loss": "B", "kept": "B"}
    if backward == "at-w":
        return {"graph": "W", "loss": "W", "kept": "W"}
    raise ValueError(f"backward must be 'whole', 'split' or 'at-w', not {backward!r}")


def predict_live(order: Sequence[Any], spans: Sequence[tuple]) -> list[int]:
    """Saved bytes predicted alive after each action of ``order`` (a rank's actions), from
    :meth:`ActivationMeter.report`'s holding facts: each storage group is alive from the ``F``
    of the micro-batch that saved it until the last action that drops one of its holders (to
    the end of the order if that action is not in it)."""
    at = {(a.kind.value, a.chunk, a.mb): i for i, a in enumerate(order)}
    change = [0] * (len(order) + 1)
    for (chunk, mb), n, until in spans:
        change[at[("F", chunk, mb)]] += n
        change[max((at.get(tuple(u), len(order)) for u in until), default=len(order))] -= n
    live, out = 0, []
    for d in change[:-1]:
        live += d
        out.append(live)
    return out


def predict_peak(order: Sequence[Any], spans: Sequence[tuple]) -> int:
    """The largest of :func:`predict_live`: the predicted peak of one step on one rank."""
    return max(predict_live(order, spans), default=0)


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


