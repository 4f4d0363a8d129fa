"""No flush: 1F1B run without a pause over a stream of micro-batches, with stale weights.

A flushed pipeline (GPipe, 1F1B) drains after every ``m`` micro-batches so that the optimizer
step sees gradients computed with one set of weights. Without the flush the pipeline stays
full across optimizer steps: the stream of ``steps · m`` micro-batches runs as one long 1F1B
(:func:`stream_schedule`), and each rank updates its own stage while later micro-batches are
already in flight. Which weights a micro-batch sees is the *weight policy*:

- ``"stash"`` (PipeDream, Narayanan et al. 2019): a stage updates after every backward; the
  backward of a micro-batch uses exactly the weights its forward used (a stashed version).
  On 1F1B rank ``r`` holds up to ``p − r`` versions.
- ``"2bw"`` (PipeDream-2BW, Narayanan et al. 2021): gradients are summed over the ``m``
  micro-batches of a batch and the stage updates once per batch; batch ``t`` runs on version
  ``t − 1`` everywhere, so two versions suffice (needs ``m ≥ p``). The rule is gradient
  descent with a delay of one: ``w(t+1) = w(t) − η·∇f_t(w(t−1))``.
- ``"none"``: updates like ``stash`` but keeps no versions: a backward runs with weights that
  changed since its forward (the Jacobians of the new weights, the activations of the old):
  the gradient of no function at all. Shown to see what stashing prevents.

Every micro-batch loss is weighted by its share of its batch (as with a flush), so the three
policies and flushed 1F1B take steps of the same size per sample at one learning rate.
:func:`emulate` runs the ``stash`` and ``2bw`` rules in one process: the reference the
runtime must match. Plain SGD only; no tied weights, data parallelism or recomputation.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from ..errors import ConfigError
from ..models import backward_phase
from ..partition import split_evenly
from ..schedules import Kind, Schedule, one_f_one_b
from ..state import param_names
from ..validate import validate
from .interpreter import _recv, _send, rank_report
from .job import Batch, Job
from .launch import launch
from .result import RunResult
from .stage import StageWorker

__all__ = ["POLICIES", "stream_schedule", "versions_used", "versions_held", "emulate",
           "train_async", "AsyncResult"]

POLICIES = ("stash", "2bw", "none")


def stream_schedule(p: int, m: int, steps: int) -> Schedule:
    """1F1B over all ``steps · m`` micro-batches at once: warm-up once, cool-down once."""
    s = one_f_one_b(p, m * steps)
    return Schedule(s.ranks, m=s.m, name="1f1b-noflush")


def versions_used(schedule: Schedule, policy: str, m: int) -> list[list[int]]:
    """Per rank, per micro-batch: the weight version (updates so far) its forward and backward use.

    ``stash``/``none``: the backwards this rank ran before the forward, read off the schedule
    (``max(0, i − (p − r − 1))`` on 1F1B). ``2bw``: ``max(0, i // m − 1)`` on every rank.
    """
    out = []
    for order in schedule.ranks:
        done, used = 0, [0] * schedule.m
        for a in order:
            if a.kind is Kind.F:
                used[a.mb] = max(0, a.mb // m - 1) if policy == "2bw" else done
            else:
                done += 1
        out.append(used)
    return out


def versions_held(schedule: Schedule, policy: str, m: int) -> list[int]:
    """Predicted peak of weight versions a rank holds at once (bookkept from the schedule):
    the live weights plus every older version an in-flight micro-batch still needs."""
    if policy == "none":
        return [1] * schedule.p
    used = versions_used(schedule, policy, m)
    peaks = []
    for r, order in enumerate(schedule.ranks):
        flight: set[int] = set()
        backs = peak = 0
        for a in order:
            if a.kind is Kind.F:
                flight.add(a.mb)
            else:
                flight.discard(a.mb)
                backs += 1
            peak = max(peak, len({used[r][i] for i in flight} | _kept(policy, backs, m)))
        peaks.append(peak)
    return peaks


def _kept(policy: str, backs: int, m: int) -> set[int]:
    """Versions kept whether or not a micro-batch uses them: the newest (2BW: and the one
    before, which the next batch runs on)."""
    if policy == "2bw":
        return {backs // m, max(0, backs // m - 1)}
    return {backs}


# ------------------------------------------------------------------ the rule in one process


def _micro(batches: Sequence[Batch], m: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Every batch split in ``m``: ``(x, y, share of its batch)`` in stream order."""
    out = []
    for x, y in batches:
        for xc, yc in zip(x.tensor_split(m), y.tensor_split(m)):
            out.append((xc, yc, yc.shape[0] / y.shape[0]))
    return out


def emulate(model: nn.Sequential, loss_fn: Callable, data: Sequence[Batch], *, p: int, m: int,
            weights: str = "stash", lr: float = 0.05,
            bounds: list[int] | None = None) -> dict[str, Any]:
    """The update rule of a weight policy in one process: what :func:`train_async` must give.

    ``stash``: stage ``s`` computes micro-batch ``i`` with its version ``versions_used[s][i]``
    and then takes ``w_s ← w_s − η·∇_s loss_i`` (gradient at the versions used). ``2bw``:
    ``w(t+1) = w(t) − η·Σ_i ∇loss_i(w(t−1))`` over the ``m`` micro-batches of batch ``t``.

    Returns:
        ``{"losses": [per batch], "params": {name: tensor}}``, names as in :class:`RunResult`.
    """
    if weights not in ("stash", "2bw"):
        raise ConfigError(f"emulate() knows the rules 'stash' and '2bw'; {weights!r} has no rule")
    model = copy.deepcopy(model)
    layers = list(model)
    bounds = bounds or split_evenly(len(layers), p)
    names = param_names(layers)
    stages = [[(names[id(q)], q) for layer in layers[bounds[s]:bounds[s + 1]]
               for q in layer.parameters()] for s in range(p)]
    mbs = _micro(data, m)
    used = versions_used(stream_schedule(p, m, len(data)), weights, m)
    hist = [[{n: q.detach().clone() for n, q in st}] for st in stages]  # per stage: versions
    acc: list[dict[str, torch.Tensor]] = [{} for _ in range(p)]
    losses = []
    for i, (x, y, share) in enumerate(mbs):
        with torch.no_grad():
            for s, st in enumerate(stages):  # load each stage's version for micro-batch i
                for n, q in st:
                    q.copy_(hist[s][used[s][i]][n])
        loss = loss_fn(model(x), y) * share
        model.zero_grad(set_to_none=True)
        loss.backward()
        losses.append(loss.item())
        for s, st in enumerate(stages):
            for n, q in st:
                acc[s][n] = acc[s].get(n, 0) + q.grad
            if weights == "stash" or (i + 1) % m == 0:  # the update: latest − η·gradient
                hist[s].append({n: hist[s][-1][n] - lr * acc[s][n] for n, _ in st})
                acc[s] = {}
    per_batch = [sum(losses[t * m:(t + 1) * m]) for t in range(len(data))]
    params = {n: t for s in range(p) for n, t in hist[s][-1].items()}
    return {"losses": per_batch, "params": params}


# ------------------------------------------------------------------ on real ranks


class _Versions:
    """This rank's weight versions under one policy: which one each micro-batch uses, updates."""

    def __init__(self, module: nn.Module, policy: str, m: int, lr: float) -> None:
        self.policy, self.m, self.lr = policy, m, lr
        live = {n: q for n, q in module.named_parameters()}
        self.versions: dict[int, dict[str, torch.Tensor]] = {0: live}
        self.latest = 0
        self.users: Counter[int] = Counter()  # version -> micro-batches in flight using it
        self.acc: dict[str, torch.Tensor] = {}
        self.backs = 0
        self.peak_bytes = self.peak_count = 0
        self._measure()

    def for_forward(self, mb: int) -> int:
        ver = max(0, mb // self.m - 1) if self.policy == "2bw" else self.latest
        if ver not in self.versions:
            raise RuntimeError(f"micro-batch {mb} needs weight version {ver}, which was freed")
        self.users[ver] += 1
        return ver

    def after_backward(self, ver: int, grads: Sequence[torch.Tensor]) -> None:
        """Count the backward; update the weights when the policy says so; free unused versions."""
        self.users[ver] -= 1
        self.backs += 1
        names = list(self.versions[ver])
        for n, g in zip(names, grads):
            self.acc[n] = self.acc[n] + g if n in self.acc else g
        if self.policy == "2bw" and self.backs % self.m:
            return self._free()
        newest = self.versions[self.latest]
        with torch.no_grad():
            if self.policy == "none":  # in place, behind autograd's back: old graphs see it
                for n in names:
                    newest[n].data.sub_(self.lr * self.acc[n])
            else:
                self.latest += 1
                self.versions[self.latest] = {
                    n: (newest[n] - self.lr * self.acc[n]).requires_grad_() for n in names}
        self.acc = {}
        self._free()

    def _free(self) -> None:
        keep = _kept(self.policy, self.backs, self.m) if self.policy != "none" else {0}
        for ver in [v for v in self.versions if v not in keep and self.users[v] <= 0]:
            del self.versions[ver]
        self._measure()

    def _measure(self) -> None:
        """Observed: bytes of the distinct storages of every version held now."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for ver in self.versions.values() for t in ver.values()}
        self.peak_bytes = max(self.peak_bytes, sum(storages.values()))
        self.peak_count = max(self.peak_count, len(self.versions))

    def finish(self, module: nn.Module) -> None:
        """Leave the newest version in the module's parameters (what the run reports)."""
        with torch.no_grad():
            for n, q in module.named_parameters():
                q.copy_(self.versions[self.latest][n])


def _run_stream(w: StageWorker, policy: str, m: int) -> dict[str, Any]:
    """This rank's whole stream: receive, compute with the policy's version, send."""
    s, module = w.rank, w.chunks[0]
    # each micro-batch in storage of its own (a view would keep its whole batch alive)
    mbs = [(x.to(w.ctx.device, copy=True), y.to(w.ctx.device, copy=True), share)
           for x, y, share in _micro(w.job.data.batches(), m)]
    vers = _Versions(module, policy, m, w.job.lr)
    stash: dict[int, tuple] = {}
    losses, events = [], []
    w.meter.start_step()
    weights = set(w.meter.param_storages)  # the module's parameters: never activations
    w.p2p.step = 0
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for step in w.plan:
        a = step.action
        w.ctx.status(f"stream: waiting to run {a.label()}")
        got = {msg.kind: _recv(w, msg) for msg in step.recvs}
        start = time.perf_counter() - t0
        if a.kind is Kind.F:
            (x, y, share), mbs[a.mb] = mbs[a.mb], None  # the stream no longer holds it
            inp = x if s == 0 else got["activation"].detach().requires_grad_()
            ver = vers.for_forward(a.mb)
            w.meter.param_storages = weights | {  # nor are the weight versions alive now
                t.untyped_storage().data_ptr() for v in vers.versions.values() for t in v.values()}
            with w.meter.record(0, a.mb, key=(tuple(inp.shape), inp.dtype)):
                out = functional_call(module, vers.versions[ver], (inp,))
                if s == w.last:
                    out = w.job.loss_fn(out, y) * share
                    losses.append(out.detach())
            stash[a.mb] = (inp, out, ver)
            to_send = out.detach()
        else:
            inp, out, ver = stash.pop(a.mb)
            params = list(vers.versions[ver].values())
            wrt = ([inp] if s > 0 else []) + params
            with backward_phase("full"):
                gs = torch.autograd.grad(out, wrt, None if s == w.last else got["gradient"],
                                         allow_unused=True)
            gs = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, gs)]
            to_send = [gs[0]] if s > 0 else None  # gradients travel as a list (one per leaf)
            w.meter.release(0, a.mb)
            vers.after_backward(ver, gs[1:] if s > 0 else gs)
        events.append((a, start, time.perf_counter() - t0))
        for msg in step.sends:
            _send(w, msg, to_send)
        inp = out = to_send = got = gs = params = wrt = None  # autograd's saved tensors go now
        w.meter.sample(a.label())
    w.p2p.flush()
    vers.finish(module)
    return {"events": events, "losses": [float(v) for v in losses], **w.meter.report(),
            "version_peak_bytes": vers.peak_bytes, "versions_peak": vers.peak_count,
            "stage_param_bytes": sum(q.numel() * q.element_size() for q in module.parameters())}


def _rank_main(ctx: Any, job: Job, policy: str, m: int) -> dict[str, Any]:
    ctx.status("building its stage")
    worker = StageWorker(ctx, job)
    return rank_report(ctx, worker, [_run_stream(worker, policy, m)])


class AsyncResult(RunResult):
    """A no-flush run: the stream is one long "step" whose losses are grouped per batch."""

    @property
    def m(self) -> int:
        return self.info["m"]

    @property
    def losses(self) -> list[float]:
        """Loss of each batch: the sum of its ``m`` weighted micro-batch losses."""
        mb = [x for r in self.ranks for x in r["steps"][0]["losses"]]
        return [sum(mb[t * self.m:(t + 1) * self.m]) for t in range(len(mb) // self.m)]

    @property
    def version_bytes(self) -> list[int]:
        """Observed peak bytes of weight versions held, per rank (storages counted once)."""
        return [r["steps"][0]["version_peak_bytes"] for r in self._reports()]

    @property
    def predicted_version_bytes(self) -> list[int]:
        """:func:`versions_held` × the bytes of the rank's stage parameters."""
        held = versions_held(self.schedule, self.info["weights"], self.m)
        return [n * r["steps"][0]["stage_param_bytes"] for n, r in zip(held, self._reports())]


def train_async(model: nn.Sequential | Sequence[nn.Module], loss_fn: Callable,
                data: Sequence[Batch], *, p: int, m: int, weights: str = "stash",
                lr: float = 0.05, bounds: list[int] | None = None, return_params: bool = False,
                backend: str = "auto", timeout: float = 300.0, threads: int = 1) -> AsyncResult:
    """Train on ``p`` ranks without a flush: 1F1B over every batch's micro-batches in one stream.

    Args:
        model, loss_fn: as for :func:`~minipipe.runtime.caller.train` (no tied weights).
        data: one ``(inputs, targets)`` batch per optimizer step, each split in ``m``.
        weights: ``"stash"``, ``"2bw"`` (needs ``m ≥ p``) or ``"none"`` (see the module).
        lr: plain SGD's rate. bounds: stage boundaries (default: equal layer counts).

    Raises:
        ConfigError: before any process starts. WorkerError, PipelineTimeout: as for ``train``.
    """
    model = model if isinstance(model, nn.Sequential) else nn.Sequential(*model)
    data = list(data)
    schedule = stream_schedule(p, m, len(data))
    validate(schedule)
    bounds = bounds or split_evenly(len(model), p)
    _check(model, data, p, m, weights, bounds)
    job = Job(model, loss_fn, schedule, data, bounds, lr=lr, tie_sync=False,
              return_params=return_params)
    start = time.perf_counter()
    ranks = launch(_rank_main, p, job, weights, m, backend=backend, timeout=timeout,
                   threads=threads)
    cores = os.cpu_count() or 1
    info = {"backend": ranks[0]["backend"], "device": ranks[0]["device"].split(":")[0],
            "world_size": p, "cores": cores, "bounds": bounds, "m": m, "weights": weights,
            "ranks_exceed_cores": p > cores and ranks[0]["device"] == "cpu"}
    return AsyncResult(schedule, ranks, 1, time.perf_counter() - start, info)


def _check(model: nn.Sequential, data: list[Batch], p: int, m: int, weights: str,
           bounds: list[int]) -> None:
    if weights not in POLICIES:
        raise ConfigError(f"weights must be one of {POLICIES}, not {weights!r}")
    if weights == "2bw" and m < p:
        raise ConfigError(f"2bw needs m >= p (a batch at least as long as the pipeline) so that "
                          f"two weight versions suffice; got m={m}, p={p}")
    if not data:
        raise ConfigError("no batches given")
    if len(bounds) != p + 1 or any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ConfigError(f"bounds must split {len(model)} layers into {p} non-empty stages, "
                          f"got {bounds}")
    owner: dict[int, int] = {}
    for s in range(p):
        for layer in list(model)[bounds[s]:bounds[s + 1]]:
            for q in layer.parameters():
                if owner.setdefault(id(q), s) != s:
                    raise ConfigError("tied weights across stages are not supported without a "
                                      "flush (each copy would have its own versions)")
    for k, (x, y) in enumerate(data):
        if x.shape[0] % m or x.shape != data[0][0].shape or y.shape[0] != x.shape[0]:
            raise ConfigError(f"batch {k}: every batch needs one shape and a multiple of m={m} "
                              f"rows, got {tuple(x.shape)} and {tuple(y.shape)}")
