"""The per-rank interpreter: run one step of this rank's schedule, action by action.

For each action of its list a rank does three things, in this order:

1. **receive** what the action needs from a neighbouring rank (an activation for ``F``, a
   gradient for ``B``), as :func:`~minipipe.validate.comm_plan` says;
2. **compute**: ``F`` runs the chunk's forward (and the loss on the last stage), ``B`` runs the
   backward (or only its input-gradient half, for a split backward), ``W`` the weight half;
3. **send** the result on (the activation downstream, the input gradient upstream).

What crosses a boundary may be a tensor or a tuple/dict of tensors and ``None``
(:mod:`minipipe.structure`); its signature is sent first on each edge, and again in a step
whose batch has other shapes than the last (the step's start tells every rank). A stage
whose neighbour sits on the same rank (the schedule's placement says where each stage runs:
``p = 1``, or the turn of a V) hands the tensor over in memory.
After the last action the rank syncs tied and data-parallel gradients and steps its optimizer
(the flush). Everything that outlives one step lives in the
:class:`~minipipe.runtime.stage.StageWorker`.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..models import backward_phase
from ..schedules import Action, Kind
from ..structure import (
    as_stage_input,
    detach,
    differentiable,
    flatten,
    rows,
    signature,
    split,
    unflatten,
)
from ..validate import Message
from .autograd import backward_input, backward_weight
from .comm import SENDABLE, TensorMeta
from .config import check_boundary
from .job import Batch
from .stage import StageWorker

__all__ = ["run_step", "rank_main", "rank_report"]


def run_step(w: StageWorker, k: int, batch: Batch) -> dict[str, Any]:
    """Run step ``k`` on rank ``w.rank``; returns its events, losses and (last step) gradients."""
    sched, dev = w.sched, w.ctx.device
    xs, ys, total = _micro_batches(w, batch)
    w.meter.start_step()
    for q in w.params.values():
        q.grad = None
    stash: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (input, output or loss)
    wait_w: dict[tuple[int, int], tuple] = {}  # split backward: waiting for W
    local: dict[tuple[str, int, int], torch.Tensor] = {}  # same-rank stage hand-off
    losses, events = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    w.p2p.start(k, reshape=_shapes_changed(w, xs, ys))  # every rank, in step: a barrier
    t0 = time.perf_counter()
    for step in w.plan:
        a = step.action
        s = sched.stage(w.rank, a.chunk)
        w.ctx.status(f"step {k}: waiting to run {a.label(sched.v > 1)}")
        got = {m.kind: _recv(w, m) for m in step.recvs}  # 1. receive
        w.ctx.status(f"step {k}: running {a.label(sched.v > 1)}")
        start = time.perf_counter() - t0
        if a.kind is Kind.F:  # 2. compute
            first, last = sched.is_first(s), sched.is_last(s)  # of a pipeline (DualPipe: two)
            inp = _use(xs, a.mb) if first else _take(got, local, "activation", s - 1, a.mb)
            if not first:  # a tensor or a structure of them; floating leaves get gradients
                inp = as_stage_input(inp)
            y = _use(ys, a.mb) if last else None
            shapes = (a.chunk, signature(inp), y is not None and signature(y))
            how = _how_backward(sched.split_backward, s, inp)  # when what it saves is freed
            with w.meter.record(a.chunk, a.mb, key=shapes, backward=how), w.autocast():
                out = w.forward(a.chunk, s, inp)
                if last:
                    weight = rows(y) / total  # this micro-batch's share of the batch
                    with w.meter.loss():
                        out = w.job.loss_fn(out, y).float() * weight
                    losses.append(out.detach())
            if not last:  # stages the caller's trial forward could not run are checked here
                check_boundary(s, out, crosses=bool(step.sends))
            stash[(a.chunk, a.mb)] = (inp, out)
            w.meter.hold((inp, out))  # kept for the backward: a holder of their memory
            to_send = detach(out)
        elif a.kind is Kind.B:
            inp, out = stash.pop((a.chunk, a.mb))
            grad = None if sched.is_last(s) else _take(got, local, "gradient", s + 1, a.mb)
            to_send = _backward(w, a, s, inp, out, grad, wait_w)
        else:  # W: weight gradient of a split backward
            backward_weight(wait_w.pop((a.chunk, a.mb)))
            w.meter.release(a.chunk, a.mb)
            to_send = None
        events.append((a, start, time.perf_counter() - t0))
        for m in step.sends:  # 3. send
            _send(w, m, to_send)
        _hand_over(w, a, s, to_send, local, bool(step.sends))
        inp = out = grad = to_send = got = y = None  # what autograd no longer needs is freed now
        w.meter.sample(a.label(sched.v > 1))
    w.p2p.flush()
    return _finish_step(w, k, events, losses)


def _backward(w: StageWorker, a: Action, s: int, inp: Any, out: Any, grad: list | None,
              wait_w: dict) -> list[torch.Tensor] | None:
    """B: backward from the output (the loss, or the floating leaves of the activation sent,
    with the gradients received for them); returns the gradients for the input's floating
    leaves (zeros where none flowed), or None on the first stage."""
    outs = [out] if grad is None else differentiable(out)
    pairs = [(o, g) for o, g in zip(outs, grad or [None]) if o.requires_grad]
    outs, grads = [o for o, _ in pairs], None if grad is None else [g for _, g in pairs]
    first = w.sched.is_first(s)
    ins = [] if first else differentiable(inp)
    if w.sched.split_backward:  # input gradient now, weight gradient at W
        g_in, wait_w[(a.chunk, a.mb)] = backward_input(outs, grads, ins or None,
                                                       w.chunk_params[a.chunk])
    else:
        if outs:  # none: no trainable weight up to here, nothing to do
            with backward_phase("full"):
                torch.autograd.backward(outs, grads)
        g_in = [t.grad for t in ins]
        w.meter.release(a.chunk, a.mb)
    if first:
        return None
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(g_in, ins)]


def _how_backward(split: bool, s: int, inp: Any) -> str:
    """How this micro-batch's backward will run, as :func:`~.autograd.frees` names it (the
    branches of :func:`_backward` and :func:`~.autograd.backward_input`)."""
    if not split:
        return "whole"
    return "split" if s > 0 and differentiable(inp) else "at-w"


def _micro_batches(w: StageWorker, batch: Batch) -> tuple[list, list, int]:
    """This replica's share of the batch (inputs on the first stage's rank, targets on the
    last's, ``None`` elsewhere), split into ``m`` micro-batches on the device."""
    m, dev = w.sched.m, w.ctx.device
    xs, ys = ([None] * m if t is None else split(t, m, dev) for t in batch)
    present = next((t for t in batch if t is not None), None)
    return xs, ys, (rows(present) if present is not None else 0) * w.job.dp


def _shapes_changed(w: StageWorker, xs: list, ys: list) -> bool:
    """Whether this step's batch has other shapes than the last one, on any rank (the ranks
    reading data tell the others in the step's start barrier: an all-reduce of one flag)."""
    sig = (signature(xs[0]) if xs[0] is not None else None,
           signature(ys[0]) if ys[0] is not None else None)
    flag = torch.tensor([int(sig != w.batch_signature)],
                        device="cpu" if w.ctx.staged else w.ctx.device)
    w.batch_signature = sig
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        w.meta.clear()  # every edge hands its new signature over again
    return bool(flag.item())


def _batches(w: StageWorker) -> Iterator[Batch]:
    """This rank's data, step by step: it opens the loader only if it holds the first or
    the last stage, and keeps only the half it needs."""
    first = any(map(w.sched.is_first, w.stages))
    last = any(map(w.sched.is_last, w.stages))
    if not (first or last):
        return itertools.repeat((None, None), w.job.steps)
    feed = w.job.data.open(w.replica, w.job.dp, w.job.steps)
    return ((x if first else None, y if last else None) for x, y in feed)


def _use(batches: list, mb: int) -> Any:
    """Micro-batch ``mb`` of this step's inputs or targets, which the step no longer holds."""
    t, batches[mb] = batches[mb], None
    return t


def _finish_step(w: StageWorker, k: int, events: list, losses: list) -> dict[str, Any]:
    """The flush: gradient sync and optimizer step; the step's record for the caller."""
    w.ctx.status(f"step {k}: gradient sync and optimizer step")
    w.sync_grads()
    record = {"events": events, "losses": [float(loss) for loss in losses], **w.meter.report()}
    if w.job.return_grads and k == w.job.steps - 1:
        record["grads"] = {n: (q.grad.detach().cpu().clone() if q.grad is not None else None)
                           for n, q in w.params.items()}
    w.optimizer_step()
    if w.ctx.device.type == "cuda":
        record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(w.ctx.device)
    w.ctx.status(f"step {k}: done")
    return record


def _hand_over(w: StageWorker, a: Action, s: int, tensor: torch.Tensor | None, local: dict,
               sent: bool) -> None:
    """Keep a result for the next stage when that stage runs on this rank (no message)."""
    if tensor is None or sent or a.kind is Kind.W:
        return
    if not (w.sched.is_last(s) if a.kind is Kind.F else w.sched.is_first(s)):
        local[("activation" if a.kind is Kind.F else "gradient", s, a.mb)] = tensor


def _take(got: dict[str, torch.Tensor], local: dict, kind: str, stage: int, mb: int) -> torch.Tensor:
    """The tensor received for this action, or the one a stage on this rank handed over."""
    return got[kind] if kind in got else local.pop((kind, stage, mb))


def _recv(w: StageWorker, msg: Message) -> Any:
    """Receive one message: an activation (its signature first, once per edge and shape
    change) or the gradients for the floating leaves of the activation this stage sent."""
    if msg.kind == "gradient":
        sent = w.meta[("activation", msg.stage - 1)].metas()
        floating = [m for m in sent if m is not None and m[0].is_floating_point]
        return [w.p2p.recv(msg, TensorMeta(shape, dtype), i)
                for i, (dtype, shape) in enumerate(floating)]
    key = (msg.kind, msg.stage)
    if key not in w.meta:
        w.meta[key] = w.p2p.recv_signature(msg)
    sig = w.meta[key]
    leaves = [None if m is None else w.p2p.recv(msg, TensorMeta(m[1], m[0]), i)
              for i, m in enumerate(sig.metas())]
    return unflatten(sig.tree, leaves)


def _send(w: StageWorker, msg: Message, value: Any) -> None:
    """Send one message; an activation's signature goes first when the edge has none yet."""
    if value is None:
        raise RuntimeError(f"stage {msg.stage} has no {msg.kind} to send for micro-batch "
                           f"{msg.mb}: its input has no floating-point tensor")
    if msg.kind == "gradient":
        for t in value:
            w.p2p.send(msg, t)
        return
    key, sig = (msg.kind, msg.stage), signature(value)
    bad = [d for d, *_ in (x for x in sig.leaves if x is not None) if getattr(torch, d) not in SENDABLE]
    if bad:
        raise RuntimeError(f"stage {msg.stage} returns a {bad[0]} tensor, which cannot be sent")
    if key not in w.meta:
        w.p2p.send_signature(msg, sig)
        w.meta[key] = sig
    elif w.meta[key].kinds() != sig.kinds():  # (uneven micro-batches: the receiver fails)
        raise RuntimeError(
            f"stage {msg.stage} returned {sig} for micro-batch {msg.mb} but {w.meta[key]} before "
            "in this step: the structure and dtypes on a stage boundary must not change")
    for t in flatten(value)[1]:
        if t is not None:
            w.p2p.send(msg, t)


def rank_main(ctx: Any, job: Any) -> dict[str, Any]:
    """What every rank runs: build its stage, run the steps, save, report to the caller."""
    from ..state import save_rank

    ctx.status("building its stage")
    worker = StageWorker(ctx, job)
    steps = [run_step(worker, k, batch) for k, batch in enumerate(_batches(worker))]
    if len(steps) != job.steps:
        raise RuntimeError(f"the data ran out after {len(steps)} of {job.steps} steps")
    if job.save_dir is not None:
        ctx.status("saving its checkpoint")
        save_rank(worker, job.save_dir, job.save_meta)
    return rank_report(ctx, worker, steps)


def rank_report(ctx: Any, worker: StageWorker, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """One rank's report to the caller: its steps, memory and message counters, weights."""
    job = worker.job
    out: dict[str, Any] = {
        "rank": worker.rank, "replica": worker.replica, "steps": steps,
        "act_bytes_per_mb": dict(worker.meter.per_mb), "act_peak_bytes": worker.meter.peak,
        "messages_sent": worker.p2p.messages_sent, "bytes_sent": worker.p2p.bytes_sent,
        "handshakes_sent": worker.p2p.handshakes_sent,
        "device": str(ctx.device), "backend": ctx.backend, "staged": ctx.staged,
        "threads": torch.get_num_threads(), "param_bytes": worker.param_bytes,
        "rss_peak_bytes": _peak_rss(),
    }
    if job.return_params:
        out["params"] = {n: q.detach().cpu().clone() for n, q in worker.params.items()}
    return out


def _peak_rss() -> int | None:
    """This process's peak resident memory in bytes (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
