"""The per-rank interpreter: run one step of this rank's schedule, action by action.

For each action of its list a rank does three things, in this order:

1. **receive** what the action needs from a neighbouring rank (an activation for ``F``, a
   gradient for ``B``), as :func:`~minipipe.validate.comm_plan` says;
2. **compute**: ``F`` runs the chunk's forward (and the loss on the last stage), ``B`` runs the
   backward (or only its input-gradient half, for a split backward), ``W`` the weight half;
3. **send** the result on (the activation downstream, the input gradient upstream).

A stage whose neighbour sits on the same rank (the schedule's placement says where each
stage runs: ``p = 1``, or the turn of a V) hands the tensor over in memory.
After the last action the rank syncs tied and data-parallel gradients and steps its optimizer
(the flush). Everything that outlives one step lives in the
:class:`~minipipe.runtime.stage.StageWorker`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from ..models import backward_phase
from ..schedules import Action, Kind
from ..validate import Message
from .autograd import backward_input, backward_weight
from .comm import TensorMeta
from .config import check_boundary
from .job import Batch
from .stage import StageWorker

__all__ = ["run_step", "rank_main", "rank_report"]


def run_step(w: StageWorker, k: int, batch: Batch) -> dict[str, Any]:
    """Run step ``k`` on rank ``w.rank``; returns its events, losses and (last step) gradients."""
    sched, dev = w.sched, w.ctx.device
    w.p2p.step = k
    xs, ys, total = _micro_batches(w, batch)
    y_shapes = [tuple(y.shape) for y in ys]
    w.meter.start_step()
    for q in w.params.values():
        q.grad = None
    stash: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (input, output or loss)
    wait_w: dict[tuple[int, int], tuple] = {}  # split backward: waiting for W
    local: dict[tuple[str, int, int], torch.Tensor] = {}  # same-rank stage hand-off
    losses, events = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    dist.barrier()
    t0 = time.perf_counter()
    for step in w.plan:
        a = step.action
        s = sched.stage(w.rank, a.chunk)
        w.ctx.status(f"step {k}: waiting to run {a.label(sched.v > 1)}")
        got = {m.kind: _recv(w, m) for m in step.recvs}  # 1. receive
        w.ctx.status(f"step {k}: running {a.label(sched.v > 1)}")
        start = time.perf_counter() - t0
        if a.kind is Kind.F:  # 2. compute
            inp = _use(xs, a.mb) if s == 0 else _take(got, local, "activation", s - 1, a.mb)
            if s > 0:
                inp = inp.detach().requires_grad_(inp.is_floating_point())
            shapes = (a.chunk, tuple(inp.shape), inp.dtype, y_shapes[a.mb])
            with w.meter.record(a.chunk, a.mb, key=shapes):
                out = w.forward(a.chunk, s, inp)
                if s == w.last:
                    weight = y_shapes[a.mb][0] / total  # this micro-batch's share of the batch
                    out = w.job.loss_fn(out, _use(ys, a.mb)) * weight
                    losses.append(out.detach())
            if s != w.last:  # stages the caller's trial forward could not run are checked here
                check_boundary(s, out, crosses=bool(step.sends))
            stash[(a.chunk, a.mb)] = (inp, out)
            to_send = out.detach()
        elif a.kind is Kind.B:
            inp, out = stash.pop((a.chunk, a.mb))
            grad = None if s == w.last else _take(got, local, "gradient", s + 1, a.mb)
            needs_in = s > 0 and inp.requires_grad
            if sched.split_backward:  # input gradient now, weight gradient at W
                g_in, wait_w[(a.chunk, a.mb)] = backward_input(
                    out, grad, inp if needs_in else None, w.chunk_params[a.chunk])
            else:
                if out.requires_grad:  # False: no trainable weight up to here, nothing to do
                    with backward_phase("full"):
                        torch.autograd.backward(out, grad)
                g_in = inp.grad if needs_in else None
                w.meter.release(a.chunk, a.mb)
            to_send = g_in if g_in is not None else (torch.zeros_like(inp) if needs_in else None)
        else:  # W: weight gradient of a split backward
            backward_weight(wait_w.pop((a.chunk, a.mb)))
            w.meter.release(a.chunk, a.mb)
            to_send = None
        events.append((a, start, time.perf_counter() - t0))
        for m in step.sends:  # 3. send
            _send(w, m, to_send)
        _hand_over(w, a, s, to_send, local, bool(step.sends))
        inp = out = grad = g_in = to_send = got = None  # what autograd no longer needs is freed now
        w.meter.sample(a.label(sched.v > 1))
    w.p2p.flush()
    return _finish_step(w, k, events, losses)


def _micro_batches(w: StageWorker, batch: Batch) -> tuple[list, list, int]:
    """This replica's share of the batch, split into ``m`` micro-batches on the device."""
    x, y = batch
    share = x.shape[0] // w.job.dp
    x, y = (t[w.replica * share:(w.replica + 1) * share] for t in (x, y))
    xs = [c.to(w.ctx.device, copy=True) for c in x.tensor_split(w.sched.m)]
    ys = [c.to(w.ctx.device, copy=True) for c in y.tensor_split(w.sched.m)]
    return xs, ys, share * w.job.dp


def _use(batches: list, mb: int) -> torch.Tensor:
    """Micro-batch ``mb`` of this step's inputs or targets, which the step no longer holds."""
    t, batches[mb] = batches[mb], None
    return t


def _finish_step(w: StageWorker, k: int, events: list, losses: list) -> dict[str, Any]:
    """The flush: gradient sync and optimizer step; the step's record for the caller."""
    w.ctx.status(f"step {k}: gradient sync and optimizer step")
    w.sync_grads()
    record = {"events": events, "losses": [float(loss) for loss in losses], **w.meter.report()}
    if w.job.return_grads and k == len(w.job.data) - 1:
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
    nxt = s + 1 if a.kind is Kind.F else s - 1
    if 0 <= nxt <= w.last:
        local[("activation" if a.kind is Kind.F else "gradient", s, a.mb)] = tensor


def _take(got: dict[str, torch.Tensor], local: dict, kind: str, stage: int, mb: int) -> torch.Tensor:
    """The tensor received for this action, or the one a stage on this rank handed over."""
    return got[kind] if kind in got else local.pop((kind, stage, mb))


def _recv(w: StageWorker, msg: Message) -> torch.Tensor:
    """Receive one message; an activation's shape and dtype arrive once per stage edge."""
    key = (msg.kind, msg.stage)
    if msg.kind == "gradient":  # same shape as the activation this stage sent
        meta = w.meta[("activation", msg.stage - 1)]
    else:
        if key not in w.meta:
            w.meta[key] = w.p2p.recv_meta(msg)
        meta = w.meta[key]
    return w.p2p.recv(msg, meta)


def _send(w: StageWorker, msg: Message, tensor: torch.Tensor | None) -> None:
    """Send one message; the first activation on a stage edge is preceded by its shape."""
    if tensor is None:
        raise RuntimeError(f"stage {msg.stage} has no {msg.kind} to send for micro-batch "
                           f"{msg.mb}: stage boundaries must be floating-point tensors")
    key = (msg.kind, msg.stage)
    if msg.kind == "activation" and key not in w.meta:
        w.p2p.send_meta(msg, tensor)
        w.meta[key] = TensorMeta(tuple(tensor.shape), tensor.dtype)
    w.p2p.send(msg, tensor)


def rank_main(ctx: Any, job: Any) -> dict[str, Any]:
    """What every rank runs: build its stage, run the steps, save, report to the caller."""
    from ..state import save_rank

    ctx.status("building its stage")
    worker = StageWorker(ctx, job)
    steps = [run_step(worker, k, batch) for k, batch in enumerate(job.data)]
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
        "device": str(ctx.device), "backend": ctx.backend, "staged": ctx.staged,
        "threads": torch.get_num_threads(),
    }
    if job.return_params:
        out["params"] = {n: q.detach().cpu().clone() for n, q in worker.params.items()}
    return out
