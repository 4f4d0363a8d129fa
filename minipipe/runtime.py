"""Run a schedule on real ranks: each rank interprets its list of actions.

:func:`train` is the entry point: it validates everything before a process starts, launches
``dp × p`` ranks (see :mod:`minipipe.launch`), and returns a :class:`RunResult` with the losses,
the measured timelines, activation memory, messages, and (optionally) gradients and weights to
compare with :func:`reference`, single-process training on the whole batch.

On a rank, :class:`StageWorker` keeps this rank's chunks (stage ``c·p + rank`` for chunk ``c``)
and runs one step as a plain loop over its actions: receive, compute, send.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .comm import P2P, TensorMeta
from .launch import Context, launch
from .models import backward_phase
from .schedules import Action, Kind, Schedule
from .state import prepare_resume, remove_stale, restore_optimizer, save_meta, save_rank
from .validate import Message, comm_plan, validate

__all__ = ["Job", "RunResult", "train", "reference", "split_evenly", "param_names", "StageWorker",
           "ActivationMeter", "ConfigError", "backward_input", "backward_weight"]

Batch = tuple[torch.Tensor, torch.Tensor]


class ConfigError(ValueError):
    """A configuration that cannot run (raised before any process starts)."""


# ------------------------------------------------------------------------- model helpers


def split_evenly(num_layers: int, num_stages: int) -> list[int]:
    """Stage boundaries for contiguous stages of (almost) equal layer count.

    Returns ``bounds`` with ``num_stages + 1`` entries: stage ``s`` holds layers
    ``bounds[s]:bounds[s + 1]``; the first stages get the extra layers.
    """
    if num_stages > num_layers:
        raise ConfigError(f"{num_stages} stages need at least {num_stages} layers (entries of the "
                          f"nn.Sequential); the model has {num_layers} (use fewer stages or "
                          f"chunks, or more layers)")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return bounds


def param_names(layers: Sequence[nn.Module]) -> dict[int, str]:
    """``id(parameter) -> "layer.name"``; a tied parameter gets the name of its first use."""
    names: dict[int, str] = {}
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            names.setdefault(id(p), f"{i}.{name}")
    return names


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
    with backward_phase("weight"):
        if how == "groups":
            from torch.distributed.pipelining._backward import stage_backward_weight

            stage_backward_weight(iter(params), what)
        else:
            out, grad = what
            torch.autograd.backward(out, grad, inputs=params)


# ------------------------------------------------------------------------------- the job


@dataclass
class Job:
    """Everything a rank needs; built by :func:`train`, shipped to every rank."""

    model: nn.Sequential
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    schedule: Schedule
    data: list[Batch]
    bounds: list[int]
    dp: int = 1
    optimizer: str | Callable = "sgd"
    lr: float = 0.05
    checkpoint: bool | Sequence[int] = False
    tie_sync: bool = True
    return_grads: bool = False
    return_params: bool = False
    save_dir: str | None = None  # checkpoint written here at the end (see minipipe.state)
    save_meta: dict | None = None
    opt_state: dict | None = None  # resuming: optimizer state by parameter name


class StageWorker:
    """This rank's chunks, optimizer, tied-weight and data-parallel groups; runs steps."""

    def __init__(self, ctx: Context, job: Job) -> None:
        self.ctx, self.job, self.sched = ctx, job, job.schedule
        p, v = self.sched.p, self.sched.v
        self.replica, self.rank = divmod(ctx.rank, p)
        self.last = self.sched.num_stages - 1
        layers = list(job.model)
        names = param_names(layers)
        self.chunks: dict[int, nn.Module] = {}
        self.chunk_params: dict[int, list[nn.Parameter]] = {}  # for the split backward
        self.params: dict[str, nn.Parameter] = {}
        for c in range(v):
            s = self.sched.stage(self.rank, c)
            part = layers[job.bounds[s]:job.bounds[s + 1]]
            self.chunks[c] = nn.Sequential(*part).to(ctx.device)
            self.chunk_params[c] = [q for q in self.chunks[c].parameters() if q.requires_grad]
            for layer in part:
                for prm in layer.parameters():
                    self.params[names[id(prm)]] = prm
        ckpt = job.checkpoint
        self.ckpt_stages = set(range(self.last + 1)) if ckpt is True else set(ckpt or ())
        self.plan = comm_plan(self.sched)[self.rank]
        self.p2p = P2P(ctx.device, ctx.staged, offset=self.replica * p)
        self.meta: dict[tuple[str, int], TensorMeta] = {}
        self.meter = ActivationMeter(list(self.params.values()))
        self.opt = self._optimizer()
        if job.opt_state and self.opt:  # resuming: weights came in the model, optimizer state by name
            restore_optimizer(self.opt, self.params, job.opt_state)
        self.tie_groups = self._tie_groups(layers, names)
        self.dp_group = self._dp_group()
        if job.tie_sync:  # tied copies start identical: broadcast from the lowest holder
            for name, (group, src) in self.tie_groups.items():
                dist.broadcast(self.params[name].data, src, group=group)

    # -- set-up -------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer | None:
        params = list(self.params.values())
        opt = self.job.optimizer
        if not params or opt == "sgd":  # plain SGD is done in step(): see _sgd_step
            return None
        if callable(opt):
            return opt(params)
        if opt == "sgd":
            return torch.optim.SGD(params, lr=self.job.lr)
        if opt == "adam":
            return torch.optim.Adam(params, lr=self.job.lr)
        raise ConfigError(f"optimizer must be 'sgd', 'adam' or a callable, not {opt!r}")

    def _tie_groups(self, layers: list[nn.Module], names: dict[int, str]) -> dict[str, tuple]:
        """One process group per tied parameter held by several ranks (same order everywhere)."""
        p = self.sched.p
        holders: dict[str, set[int]] = defaultdict(set)
        for s in range(self.last + 1):
            for layer in layers[self.job.bounds[s]:self.job.bounds[s + 1]]:
                for prm in layer.parameters():
                    holders[names[id(prm)]].add(s % p)
        groups = {}
        for name in sorted(n for n, h in holders.items() if len(h) > 1):
            for d in range(self.job.dp):  # every process creates every group, in one order
                ranks = sorted(d * p + r for r in holders[name])
                group = dist.new_group(ranks)
                if d == self.replica and name in self.params:
                    groups[name] = (group, ranks[0])
        return groups

    def _dp_group(self) -> Any:
        if self.job.dp == 1:
            return None
        mine = None
        for r in range(self.sched.p):
            group = dist.new_group([d * self.sched.p + r for d in range(self.job.dp)])
            mine = group if r == self.rank else mine
        return mine

    # -- one step -------------------------------------------------------------------------
    def step(self, k: int, batch: Batch) -> dict[str, Any]:
        sched, dev = self.sched, self.ctx.device
        self.p2p.step = k
        x, y = batch
        share = x.shape[0] // self.job.dp
        x, y = (t[self.replica * share:(self.replica + 1) * share] for t in (x, y))
        xs = [c.to(dev, copy=True) for c in x.tensor_split(sched.m)]
        ys = [c.to(dev, copy=True) for c in y.tensor_split(sched.m)]
        total = share * self.job.dp
        for q in self.params.values():
            q.grad = None
        stash: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (input, output or loss)
        wait_w: dict[tuple[int, int], tuple] = {}  # split backward: waiting for W
        local: dict[tuple[str, int, int], torch.Tensor] = {}  # same-rank stage hand-off
        losses = []
        events = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        dist.barrier()
        t0 = time.perf_counter()
        for step in self.plan:
            a = step.action
            s = sched.stage(self.rank, a.chunk)
            self.ctx.status(f"step {k}: waiting to run {a.label(sched.v > 1)}")
            got = {m.kind: self._recv(m, a) for m in step.recvs}
            self.ctx.status(f"step {k}: running {a.label(sched.v > 1)}")
            start = time.perf_counter() - t0
            if a.kind is Kind.F:
                inp = xs[a.mb] if s == 0 else _take(got, local, "activation", s - 1, a.mb)
                if s > 0:
                    inp = inp.detach().requires_grad_(inp.is_floating_point())
                shapes = (a.chunk, tuple(inp.shape), inp.dtype, tuple(ys[a.mb].shape))
                with self.meter.record(a.chunk, a.mb, key=shapes):
                    out = self._forward(a.chunk, s, inp)
                    if s == self.last:
                        weight = ys[a.mb].shape[0] / total  # this micro-batch's share of the batch
                        out = self.job.loss_fn(out, ys[a.mb]) * weight
                        losses.append(out.detach())
                stash[(a.chunk, a.mb)] = (inp, out)
                to_send = out.detach()
            elif a.kind is Kind.B:
                inp, out = stash.pop((a.chunk, a.mb))
                grad = None if s == self.last else _take(got, local, "gradient", s + 1, a.mb)
                needs_in = s > 0 and inp.requires_grad
                if sched.split_backward:  # input gradient now, weight gradient at W
                    g_in, wait_w[(a.chunk, a.mb)] = backward_input(
                        out, grad, inp if needs_in else None, self.chunk_params[a.chunk])
                else:
                    with backward_phase("full"):
                        torch.autograd.backward(out, grad)
                    g_in = inp.grad if needs_in else None
                    self.meter.release(a.chunk, a.mb)
                to_send = g_in if g_in is not None else (torch.zeros_like(inp) if needs_in else None)
            else:  # W: weight gradient of a split backward
                backward_weight(wait_w.pop((a.chunk, a.mb)))
                self.meter.release(a.chunk, a.mb)
                to_send = None
            events.append((a, start, time.perf_counter() - t0))
            for m in step.sends:
                self._send(m, to_send)
            if to_send is not None and not step.sends and a.kind is not Kind.W:
                nxt = s + 1 if a.kind is Kind.F else s - 1
                if 0 <= nxt <= self.last:  # the next stage is on this rank (p == 1)
                    local[("activation" if a.kind is Kind.F else "gradient", s, a.mb)] = to_send
        self.p2p.flush()
        self.ctx.status(f"step {k}: gradient sync and optimizer step")
        self._sync_grads()
        record = {"events": events, "losses": [float(l) for l in losses]}
        if self.job.return_grads and k == len(self.job.data) - 1:
            record["grads"] = {n: (q.grad.detach().cpu().clone() if q.grad is not None else None)
                               for n, q in self.params.items()}
        if self.opt is not None:
            self.opt.step()
        elif self.job.optimizer == "sgd":
            self._sgd_step()
        if dev.type == "cuda":
            record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        self.ctx.status(f"step {k}: done")
        return record

    @torch.no_grad()
    def _sgd_step(self) -> None:
        """``w -= lr · grad``, as torch.optim.SGD does without momentum (building that
        optimizer imports torch._dynamo: about a second of start-up on every rank)."""
        for q in self.params.values():
            if q.grad is not None:
                q.add_(q.grad, alpha=-self.job.lr)

    def _forward(self, chunk: int, stage: int, inp: torch.Tensor) -> torch.Tensor:
        module = self.chunks[chunk]
        if stage in self.ckpt_stages:  # keep only the stage input; recompute in backward
            return torch_checkpoint(module, inp, use_reentrant=False)
        return module(inp)

    def _recv(self, msg: Message, a: Action) -> torch.Tensor:
        key = (msg.kind, msg.stage)
        if msg.kind == "gradient":  # same shape as the activation this stage sent
            meta = self.meta[("activation", msg.stage - 1)]
        else:
            if key not in self.meta:
                self.meta[key] = self.p2p.recv_meta(msg)
            meta = self.meta[key]
        return self.p2p.recv(msg, meta)

    def _send(self, msg: Message, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            raise RuntimeError(f"stage {msg.stage} has no {msg.kind} to send for micro-batch "
                               f"{msg.mb}: stage boundaries must be floating-point tensors")
        key = (msg.kind, msg.stage)
        if msg.kind == "activation":
            if key not in self.meta:
                self.p2p.send_meta(msg, tensor)
                self.meta[key] = TensorMeta(tuple(tensor.shape), tensor.dtype)
        self.p2p.send(msg, tensor)

    def _sync_grads(self) -> None:
        for name, (group, _) in self.tie_groups.items():  # tied copies: sum their gradients
            if self.job.tie_sync:
                self._all_reduce(self.params[name], group)
        if self.dp_group is not None:  # data parallel: sum the same stage across replicas
            for prm in self.params.values():
                self._all_reduce(prm, self.dp_group)

    def _all_reduce(self, prm: nn.Parameter, group: Any) -> None:
        if prm.grad is None:
            prm.grad = torch.zeros_like(prm)
        if self.ctx.staged:
            host = prm.grad.cpu()
            dist.all_reduce(host, group=group)
            prm.grad.copy_(host)
        else:
            dist.all_reduce(prm.grad, group=group)


def _take(got: dict[str, torch.Tensor], local: dict, kind: str, stage: int, mb: int) -> torch.Tensor:
    """The tensor received for this action, or the one a stage on this rank handed over."""
    return got[kind] if kind in got else local.pop((kind, stage, mb))


def _rank_main(ctx: Context, job: Job) -> dict[str, Any]:
    """What every rank runs: build its stage, run the steps, report."""
    ctx.status("building its stage")
    worker = StageWorker(ctx, job)
    steps = [worker.step(k, batch) for k, batch in enumerate(job.data)]
    if job.save_dir is not None:
        ctx.status("saving its checkpoint")
        save_rank(worker, job.save_dir, job.save_meta)
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


# ------------------------------------------------------------------------ caller side


@dataclass
class RunResult:
    """What a pipeline run measured. ``ranks`` holds each rank's raw report."""

    schedule: Schedule
    ranks: list[dict[str, Any]]
    dp: int = 1
    wall_time: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        """Loss of each step on the whole batch (sum of the weighted micro-batch losses)."""
        steps = len(self.ranks[0]["steps"])
        return [sum(sum(r["steps"][k]["losses"]) for r in self.ranks) for k in range(steps)]

    def timelines(self, replica: int = 0) -> list:
        """One measured :class:`~minipipe.simulate.Timeline` per step (seconds)."""
        from .simulate import Event, Timeline

        mine = [r for r in self.ranks if r["replica"] == replica]
        out = []
        for k in range(len(mine[0]["steps"])):
            events = [Event(r["rank"], a, s, e) for r in mine for (a, s, e) in r["steps"][k]["events"]]
            out.append(Timeline(self.schedule, sorted(events, key=lambda e: (e.rank, e.start)),
                                source="measured"))
        return out

    @property
    def timeline(self):
        """The last step's measured timeline (earlier steps include warm-up effects)."""
        return self.timelines()[-1]

    @property
    def step_times(self) -> list[float]:
        return [t.step_time for t in self.timelines()]

    @property
    def step_time(self) -> float:
        """Median step time in seconds, leaving out the first step (warm-up) when there are more."""
        times = self.step_times
        return statistics.median(times[1:] if len(times) > 1 else times)

    def _by_rank(self, key: str, replica: int = 0) -> list:
        return [r[key] for r in self._reports(replica)]

    def _reports(self, replica: int = 0) -> list[dict[str, Any]]:
        """The raw reports of one replica's ranks, in rank order."""
        return sorted((r for r in self.ranks if r["replica"] == replica), key=lambda r: r["rank"])

    @property
    def peak_activation_bytes(self) -> list[int]:
        """Measured peak bytes saved for backward, per rank."""
        return self._by_rank("act_peak_bytes")

    @property
    def cuda_peak_bytes(self) -> list[int] | None:
        """``torch.cuda.max_memory_allocated`` per rank in the last step (None on CPU)."""
        peaks = [r["steps"][-1].get("cuda_peak_bytes") for r in self._reports()]
        return None if None in peaks else peaks

    @property
    def activation_bytes_per_mb(self) -> list[dict[int, int]]:
        """Measured bytes saved by one micro-batch, per rank and chunk."""
        return self._by_rank("act_bytes_per_mb")

    @property
    def predicted_activation_bytes(self) -> list[int]:
        """Peak per rank predicted from the schedule order × bytes of one micro-batch."""
        out = []
        for r, order in enumerate(self.schedule.ranks):
            per = self.activation_bytes_per_mb[r]
            live = peak = 0
            for a in order:
                freed = Kind.W if self.schedule.split_backward else Kind.B
                live += per[a.chunk] if a.kind is Kind.F else (-per[a.chunk] if a.kind is freed else 0)
                peak = max(peak, live)
            out.append(peak)
        return out

    @property
    def messages(self) -> int:
        """Point-to-point activation/gradient messages per step, all ranks of one replica."""
        steps = len(self.ranks[0]["steps"])
        return sum(self._by_rank("messages_sent")) // steps

    @property
    def bytes_sent(self) -> list[int]:
        """Bytes each rank sent per step."""
        steps = len(self.ranks[0]["steps"])
        return [b // steps for b in self._by_rank("bytes_sent")]

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        """Gradients of the last step (after tied and data-parallel sums), by parameter name."""
        return self._merge("grads", lambda r: r["steps"][-1].get("grads"))

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Weights after the last step, by parameter name (tied: the lowest rank's copy)."""
        return self._merge("params", lambda r: r.get("params"))

    def copies(self, name: str) -> list[torch.Tensor]:
        """Each rank's copy of parameter ``name`` after the run (tied weights: several)."""
        return [r["params"][name] for r in self.ranks if r["replica"] == 0 and name in r.get("params", {})]

    def _merge(self, what: str, get: Callable) -> dict[str, torch.Tensor]:
        merged: dict[str, torch.Tensor] = {}
        for r in sorted(self.ranks, key=lambda r: (r["replica"], r["rank"])):
            part = get(r)
            if part is None:
                raise ValueError(f"this run did not keep {what}: pass return_{what}=True to train()")
            for n, t in part.items():
                merged.setdefault(n, t)
        return merged

    def summary(self) -> str:
        """A few readable lines: configuration, step time, bubbles, memory, messages."""
        tl = self.timeline
        i = self.info
        lines = [
            f"{self.schedule.name}: p={self.schedule.p} m={self.schedule.m} v={self.schedule.v}"
            f" dp={self.dp} | backend {i.get('backend')} on {i.get('device')}"
            + (" (CUDA tensors staged through host memory: shows correctness and memory, "
               "not speed-up)" if i.get("staged") else ""),
            f"median step time {self.step_time * 1e3:.1f} ms | bubble {tl.bubble_fraction:.1%} of "
            f"the step, {tl.bubble_overhead:.1%} of useful work (measured, last step)",
            "peak activation bytes per rank: measured " + str(self.peak_activation_bytes)
            + ", predicted " + str(self.predicted_activation_bytes),
            f"messages per step: {self.messages}; losses: " + ", ".join(f"{l:.4f}" for l in self.losses),
        ]
        if i.get("ranks_exceed_cores"):
            lines.append(f"note: {i['world_size']} ranks on {i['cores']} cores: wall-clock timings "
                         "mix the schedule with CPU contention")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _as_data(data: Batch | Sequence[Batch], steps: int | None) -> list[Batch]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return [data] * (steps or 1)
    batches = list(data)
    if steps is not None:
        if len(batches) < steps:
            raise ConfigError(f"steps={steps} but only {len(batches)} batches were given")
        batches = batches[:steps]
    return batches


def check_config(model: nn.Sequential, schedule: Schedule, data: list[Batch], dp: int,
                 bounds: list[int] | None) -> list[int]:
    """Every check that can fail before a process starts; returns the stage boundaries."""
    validate(schedule)
    layers = list(model)
    if bounds is None:
        bounds = split_evenly(len(layers), schedule.num_stages)
    if len(bounds) != schedule.num_stages + 1 or bounds[0] != 0 or bounds[-1] != len(layers):
        raise ConfigError(f"bounds must have {schedule.num_stages + 1} entries from 0 to "
                          f"{len(layers)}, got {bounds}")
    if any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ConfigError(f"every stage needs at least one layer; bounds {bounds} leave one empty")
    if dp < 1:
        raise ConfigError(f"dp must be >= 1, got {dp}")
    for k, (x, y) in enumerate(data):
        if (x.shape, y.shape) != (data[0][0].shape, data[0][1].shape):
            raise ConfigError(f"batch {k} has shapes {tuple(x.shape)}, {tuple(y.shape)} but batch 0 "
                              f"has {tuple(data[0][0].shape)}, {tuple(data[0][1].shape)}: every "
                              "step must use batches of one shape (stage shapes are sent once)")
        n = x.shape[0]
        if y.shape[0] != n:
            raise ConfigError(f"batch {k}: inputs have {n} rows, targets {y.shape[0]}")
        if n % (dp * schedule.m):
            raise ConfigError(
                f"batch {k} has {n} samples, which {dp} replica(s) × {schedule.m} micro-batches "
                f"do not divide; use a batch size that is a multiple of {dp * schedule.m}")
    return bounds


def train(model: nn.Sequential | Sequence[nn.Module], loss_fn: Callable, schedule: Schedule,
          data: Batch | Sequence[Batch], *, steps: int | None = None, bounds: list[int] | None = None,
          dp: int = 1, optimizer: str | Callable = "sgd", lr: float = 0.05,
          checkpoint: bool | Sequence[int] = False, tie_sync: bool = True,
          return_grads: bool = False, return_params: bool = False, backend: str = "auto",
          timeout: float = 300.0, pg_timeout: float | None = None, check_schedule: bool = True,
          threads: int = 1, save_dir: str | os.PathLike | None = None,
          resume_from: str | os.PathLike | None = None) -> RunResult:
    """Train ``model`` with ``schedule`` on ``dp × p`` real ranks.

    Args:
        model: an ``nn.Sequential`` (or list of layers) split into ``p·v`` contiguous stages.
        loss_fn: ``loss_fn(output, target)``, mean over the samples it gets. Each micro-batch
            loss is weighted by its share of the batch, so the step's loss is the batch mean.
        schedule: any valid :class:`Schedule`, generated or written by hand.
        data: one ``(inputs, targets)`` batch (repeated ``steps`` times) or one per step.
        bounds: stage boundaries (see :mod:`minipipe.partition`); default: equal layer counts.
        dp: pipeline replicas (data parallelism); each takes an equal share of every batch.
        optimizer: ``"sgd"``, ``"adam"`` or ``callable(params) -> Optimizer``. lr: its rate.
        checkpoint: recompute activations in backward for all stages (True) or those listed.
        tie_sync: sum the gradients of tied weights across ranks (turn off to watch drift).
        return_grads / return_params: keep the last gradients / final weights by name.
        backend: ``auto``, ``gloo`` or ``nccl``. timeout: seconds before the run is declared
            hung. pg_timeout: seconds one receive may block. check_schedule: validate first
            (turn off only to watch a bad schedule hang).
        save_dir: at the end, every rank saves its stage there (``rank{global_rank}.pt``).
        resume_from: a checkpoint directory written with any split: start from its weights
            and optimizer state (see :mod:`minipipe.state`).

    Raises:
        ScheduleError, ConfigError, CheckpointError: before any process starts.
        WorkerError, PipelineTimeout: a rank failed or the run hung (see :mod:`minipipe.launch`).
    """
    model = model if isinstance(model, nn.Sequential) else nn.Sequential(*model)
    batches = _as_data(data, steps)
    if check_schedule:
        bounds = check_config(model, schedule, batches, dp, bounds)
    else:
        bounds = bounds or split_evenly(len(model), schedule.num_stages)
    opt_state, start_step = None, 0
    if resume_from is not None:  # merged and checked here, before any process starts
        model, opt_state, start_step = prepare_resume(model, resume_from, optimizer)
    meta = None
    if save_dir is not None:
        save_dir = os.fspath(save_dir)
        os.makedirs(save_dir, exist_ok=True)
        meta = save_meta(model, schedule, bounds, dp, start_step + len(batches), optimizer)
    job = Job(model, loss_fn, schedule, batches, bounds, dp, optimizer, lr, checkpoint, tie_sync,
              return_grads, return_params, save_dir, meta, opt_state)
    world = dp * schedule.p
    start = time.perf_counter()
    ranks = launch(_rank_main, world, job, backend=backend, timeout=timeout, pg_timeout=pg_timeout,
                   threads=threads)
    cores = os.cpu_count() or 1
    info = {"backend": ranks[0]["backend"], "device": ranks[0]["device"].split(":")[0],
            "staged": ranks[0]["staged"], "world_size": world, "cores": cores,
            "ranks_exceed_cores": world > cores and ranks[0]["device"] == "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "bounds": bounds, "start_step": start_step}
    if save_dir is not None:
        remove_stale(save_dir, world)
    return RunResult(schedule, ranks, dp, time.perf_counter() - start, info)


def reference(model: nn.Sequential | Sequence[nn.Module], loss_fn: Callable,
              data: Batch | Sequence[Batch], *, steps: int | None = None,
              optimizer: str | Callable = "sgd", lr: float = 0.05) -> dict[str, Any]:
    """Single-process training on the whole batch: the result every schedule must match.

    Returns:
        ``{"losses": [...], "grads": {name: tensor} (last step), "params": {name: tensor}}``
        with the same parameter names as :class:`RunResult`.
    """
    model = copy.deepcopy(model if isinstance(model, nn.Sequential) else nn.Sequential(*model))
    names = param_names(list(model))
    params = {names[id(q)]: q for q in model.parameters()}
    opt = (optimizer(list(params.values())) if callable(optimizer)
           else {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer](list(params.values()), lr=lr))
    losses, grads = [], {}
    for x, y in _as_data(data, steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads = {n: q.grad.detach().clone() if q.grad is not None else None for n, q in params.items()}
        opt.step()
    return {"losses": losses, "grads": grads,
            "params": {n: q.detach().clone() for n, q in params.items()}}
