"""minipipe next to ``torch.distributed.pipelining``: same model, split, schedule and batch.

Each row trains one model for ``warmup + steps`` SGD steps with minipipe and with torch's
``PipelineStage`` + schedule class, on ``p`` ranks that :func:`minipipe.runtime.launch.launch` starts
(gloo on CPU, one thread per rank; NCCL when there is a GPU per rank). Both start from the
same weights (one seed), split them the same way (:func:`minipipe.partition.split_evenly`,
stage ``c·p + r`` on rank ``r``) and see the same batch, so their losses agree step by step;
the script asserts they do to 1e-5 — the check that both did the same work. It also records
the order in which torch ran its actions and says whether it is minipipe's order.

Losses: minipipe weights each micro-batch loss by its share of the batch; torch calls
``loss_fn`` per micro-batch and divides the gradients by ``m`` (``scale_grads=True``) — with
equal micro-batches both are the gradient of the whole-batch mean loss. Torch's reported loss
is the mean of its micro-batch losses.

Timing, two ways, both from inside the ranks, from the exit of a barrier to the end of the
step's last compute action, the maximum over ranks, without the optimizer step:

* separate runs: :func:`minipipe.runtime.train` (its ``RunResult`` timelines: the latest
  event end) and a torch run (around ``schedule.step``), alternating, ``--rounds`` each;
  median over the timed steps of all rounds.
* paired: one set of ranks holds a minipipe :class:`~minipipe.runtime.StageWorker` (what
  ``train`` runs on each rank) and the torch stages, and alternates their steps; the ratio
  is the median of the per-step ratios. Load from other programs hits both alike, so this
  ratio is the steadier one on a busy machine.

Activation memory: bytes autograd saved for backward, peak per rank: minipipe's own
``RunResult.peak_activation_bytes`` in its cheap *counted* mode (``train(..., memory="counted")``:
each shape measured once, then bookkept; the default observed mode follows every storage and
costs time); for torch a ``saved_tensors_hooks`` meter with the same
rules (a storage counts once, parameters never) that follows each saved tensor until autograd
frees it, on warm-up steps 1.. (step 0 runs torch's shape inference; timed steps run unhooked).

Run::

    python benchmarks/bench_vs_torch.py                 # all rows on CPU (+ CUDA if 2 GPUs)
    python benchmarks/bench_vs_torch.py --quick         # one tiny row: the CI smoke test
    python benchmarks/bench_vs_torch.py --steps 30 --markdown --p4
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minipipe.models import gpt, gpt_loss, mlp, mlp_batch
from minipipe.runtime import Job, StageWorker, split_evenly, train
from minipipe.runtime.interpreter import run_step
from minipipe.runtime.launch import Context, launch
from minipipe.schedules import make_schedule

LOSS_TOL = 1e-5
LR = 0.05

# minipipe schedule name -> torch.distributed.pipelining class name
TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved": "ScheduleInterleaved1F1B",
    "zb-h1": "ScheduleInterleavedZeroBubble",  # one stage per rank: ZB-H1 (the paper's ZB1P)
}

# model kwargs and batch size per model and size
SIZES: dict[str, dict[str, tuple[dict[str, int], int]]] = {
    "mlp": {
        "tiny": (dict(layers=4, width=32, d_in=32, d_out=32), 16),
        "small": (dict(layers=8, width=128, d_in=128, d_out=128), 64),
        "medium": (dict(layers=8, width=256, d_in=256, d_out=256), 128),
    },
    "gpt": {
        "tiny": (dict(vocab=64, context=16, width=32, layers=2, heads=2), 8),
        "small": (dict(vocab=128, context=32, width=64, layers=6, heads=4), 16),
        "medium": (dict(vocab=256, context=64, width=128, layers=6, heads=4), 16),
    },
}


@dataclass(frozen=True)
class Row:
    """One comparison: a model and size, a schedule and its shape, the device."""

    model: str  # "mlp" or "gpt"
    size: str  # a key of SIZES[model]
    schedule: str  # a key of TORCH_SCHEDULES
    p: int
    m: int
    v: int = 1
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl)
    seed: int = 0

    @property
    def label(self) -> str:
        v = f" v={self.v}" if self.v > 1 else ""
        return f"{self.model}-{self.size} {self.schedule} p={self.p} m={self.m}{v}"

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


def build(row: Row) -> tuple[nn.Sequential, Callable, tuple[torch.Tensor, torch.Tensor]]:
    """The model (seeded, untied), its loss function and one batch ``(x, y)``."""
    kwargs, batch = SIZES[row.model][row.size]
    if row.model == "mlp":
        x, y = mlp_batch(batch, kwargs["d_in"], kwargs["d_out"], seed=row.seed)
        return mlp(seed=row.seed, **kwargs), F.mse_loss, (x, y)
    g = torch.Generator().manual_seed(row.seed + 1)
    tokens = torch.randint(kwargs["vocab"], (batch, kwargs["context"] + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # next-token targets
    return gpt(seed=row.seed, tie=False, **kwargs), gpt_loss, (x, y)


# ------------------------------------------------------------------ the torch side


class SavedBytes:
    """Bytes autograd holds for backward, now and at peak, as ``saved_tensors_hooks`` see them.

    Each saved tensor is wrapped in a holder; when autograd frees the holder (after the
    backward that used it, or with the graph) its bytes are released. A storage counts once
    however many saved tensors view it, parameters not at all: the rules of minipipe's
    ``ActivationMeter``. The holder keeps a detached alias: holding the tensor itself would
    tie it to its ``grad_fn`` in a cycle that Python's garbage collector cannot see, and any
    part of a graph that no backward releases (after a split backward) would never be freed.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.param_ptrs = {q.untyped_storage().data_ptr() for q in params}
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.param_ptrs:
            return t
        ref = self.refs.get(ptr)
        if ref is None:
            self.refs[ptr] = [1, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            ref[0] += 1
        return _Held(self, ptr, t.detach())  # detached: no cycle through the tensor's grad_fn

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.t if isinstance(held, _Held) else held

    def drop(self, ptr: int) -> None:
        ref = self.refs[ptr]
        ref[0] -= 1
        if ref[0] == 0:
            self.live -= ref[1]
            del self.refs[ptr]

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    __slots__ = ("meter", "ptr", "t")

    def __init__(self, meter: SavedBytes, ptr: int, t: torch.Tensor) -> None:
        self.meter, self.ptr, self.t = meter, ptr, t

    def __del__(self) -> None:
        self.meter.drop(self.ptr)


def _record_actions(stages: list[Any], p: int, log: list[str]) -> Callable[[], None]:
    """Log each compute action the stages run (``F0``, ``1B3``, ``W2``); returns an undo."""
    names = {"forward_one_chunk": "F", "backward_one_chunk": "B", "backward_weight_one_chunk": "W"}
    for st in stages:
        for name, kind in names.items():
            def wrapped(mb: int, *a: Any, _f: Callable = getattr(st, name), _k: str = kind,
                        _c: int = st.stage_index // p, **k: Any) -> Any:
                log.append(f"{_c or ''}{_k}{mb}")
                return _f(mb, *a, **k)
            setattr(st, name, wrapped)  # an instance attribute shadows the method

    def undo() -> None:
        for st in stages:
            for name in names:
                delattr(st, name)
    return undo


class TorchPipe:
    """This rank's ``PipelineStage`` objects and torch's schedule for ``row``."""

    def __init__(self, ctx: Context, row: Row, model: nn.Sequential, loss_fn: Callable) -> None:
        from torch.distributed import pipelining

        layers, p, v = list(model), row.p, row.v
        bounds = split_evenly(len(layers), p * v)
        self.stages, params = [], []
        for c in range(v):  # chunk c of rank r is stage c·p + r, as in minipipe
            s = c * p + ctx.rank
            part = nn.Sequential(*layers[bounds[s]:bounds[s + 1]]).to(ctx.device)
            params += list(part.parameters())
            self.stages.append(pipelining.PipelineStage(part, s, p * v, ctx.device))
        cls = getattr(pipelining, TORCH_SCHEDULES[row.schedule])
        single = row.schedule in ("gpipe", "1f1b")  # PipelineScheduleSingle takes one stage
        self.sched = cls(self.stages[0] if single else self.stages, row.m, loss_fn=loss_fn)
        self.opt = torch.optim.SGD(params, lr=LR)
        self.meter = SavedBytes(params)
        self.first = any(st.is_first for st in self.stages)
        self.last = any(st.is_last for st in self.stages)
        self.p, self.dev = p, ctx.device
        self.order: list[str] = []
        self.peak = 0

    def step(self, k: int, x: torch.Tensor, y: torch.Tensor,
             measure: bool) -> tuple[float, float | None]:
        """One optimizer step; returns (seconds from the barrier to the end, loss or None)."""
        undo = _record_actions(self.stages, self.p, self.order) if k == 0 else None
        self.opt.zero_grad(set_to_none=True)
        mb_losses: list[torch.Tensor] = []
        args = (x,) if self.first else ()
        kw: dict[str, Any] = {"target": y, "losses": mb_losses} if self.last else {}
        hooks = self.meter.hooks() if measure else contextlib.nullcontext()
        self.meter.peak = base = self.meter.live
        dist.barrier()
        _sync(self.dev)
        t0 = time.perf_counter()
        with hooks:
            self.sched.step(*args, return_outputs=False, **kw)
        _sync(self.dev)
        elapsed = time.perf_counter() - t0
        if measure:
            self.peak = max(self.peak, self.meter.peak - base)
        if undo:
            undo()
        self.opt.step()
        loss = float(torch.stack([l.detach() for l in mb_losses]).mean()) if self.last else None
        return elapsed, loss


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _torch_rank(ctx: Context, row: Row, steps: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(row.seed)
    model, loss_fn, (x, y) = build(row)
    pipe = TorchPipe(ctx, row, model, loss_fn)
    x, y = x.to(ctx.device), y.to(ctx.device)
    times, losses = [], []
    for k in range(steps):
        t, loss = pipe.step(k, x, y, measure=0 < k < warmup)
        times.append(t)
        if loss is not None:
            losses.append(loss)
    return {"times": times, "losses": losses, "peak": pipe.peak, "order": pipe.order}


def run_torch(row: Row, steps: int, warmup: int) -> dict[str, Any]:
    ranks = launch(_torch_rank, row.p, row, steps, warmup, backend=row.backend, timeout=900)
    return {"step_times": [max(r["times"][k] for r in ranks) for k in range(steps)],
            "losses": next(r["losses"] for r in ranks if r["losses"]),
            "peak": [r["peak"] for r in ranks], "order": [r["order"] for r in ranks]}


# ------------------------------------------------------------------ the minipipe side


def run_minipipe(row: Row, steps: int) -> dict[str, Any]:
    model, loss_fn, batch = build(row)
    sched = make_schedule(row.schedule, row.p, row.m, row.v)
    res = train(model, loss_fn, sched, batch, steps=steps, lr=LR, backend=row.backend, timeout=900,
                memory="counted")  # the cheap meter: timings stay comparable
    # the events are relative to each rank's barrier exit: the latest end is the torch measure
    return {"step_times": [max(e.end for e in tl.events) for tl in res.timelines()],
            "losses": res.losses, "peak": res.peak_activation_bytes,
            "order": [[a.label() for a in actions] for actions in sched.ranks]}


# ------------------------------------------------------------------ paired


@contextlib.contextmanager
def _bookkeeping_only(meter: Any):
    """Let minipipe's ActivationMeter count micro-batches from its first step, without hooks.

    Its own hooks would hide the saved tensors from an outer meter (the innermost
    ``saved_tensors_hooks`` wins); the counts it keeps stay the same.
    """
    @contextlib.contextmanager
    def record(chunk: int, mb: int, *args: Any, **kwargs: Any):
        yield
        meter._count(chunk, mb, meter.per_mb[chunk])

    meter.record = record
    try:
        yield
    finally:
        del meter.record


def _paired_rank(ctx: Context, row: Row, steps: int, warmup: int) -> dict[str, Any]:
    """Alternate a minipipe step and a torch step on the same ranks (who goes first alternates).

    Warm-up steps 1.. also measure minipipe's saved bytes with torch's meter (``SavedBytes``).
    """
    torch.manual_seed(row.seed)
    model, loss_fn, (x, y) = build(row)
    sched = make_schedule(row.schedule, row.p, row.m, row.v)
    bounds = split_evenly(len(model), sched.num_stages)
    worker = StageWorker(ctx, Job(copy.deepcopy(model), loss_fn, sched, [(x, y)], bounds, lr=LR,
                                    memory="counted"))
    pipe = TorchPipe(ctx, row, model, loss_fn)
    xd, yd = x.to(ctx.device), y.to(ctx.device)
    mp_times, tc_times, mp_losses, tc_losses = [], [], [], []
    same_meter = SavedBytes(list(worker.params.values()))
    mp_peak = 0

    def minipipe_step(k: int) -> None:
        nonlocal mp_peak
        measure = 0 < k < warmup
        with contextlib.ExitStack() as stack:
            if measure:
                stack.enter_context(_bookkeeping_only(worker.meter))
                stack.enter_context(same_meter.hooks())
                same_meter.peak = base = same_meter.live
            t0 = time.perf_counter()
            record = run_step(worker, k, (x, y))
            _sync(ctx.device)
            elapsed = time.perf_counter() - t0
        if measure:
            mp_peak = max(mp_peak, same_meter.peak - base)
        # on CPU the timeline is exact and leaves out the optimizer step; on CUDA its host
        # times do not wait for the GPU, so the whole synchronized step is timed instead
        events_end = max(e for _, _, e in record["events"])
        mp_times.append(elapsed if ctx.device.type == "cuda" else events_end)
        mp_losses.append(sum(record["losses"]))

    def torch_step(k: int) -> None:
        t, loss = pipe.step(k, xd, yd, measure=0 < k < warmup)
        tc_times.append(t)
        tc_losses.append(loss)

    for k in range(steps):
        for run in ((minipipe_step, torch_step) if k % 2 == 0 else (torch_step, minipipe_step)):
            run(k)
    return {"mp": mp_times, "tc": tc_times, "mp_losses": mp_losses, "tc_losses": tc_losses,
            "mp_peak": mp_peak, "tc_peak": pipe.peak}


def run_paired(row: Row, steps: int, warmup: int) -> dict[str, Any]:
    ranks = launch(_paired_rank, row.p, row, steps, warmup, backend=row.backend, timeout=900)
    mp = [max(r["mp"][k] for r in ranks) for k in range(steps)][warmup:]
    tc = [max(r["tc"][k] for r in ranks) for k in range(steps)][warmup:]
    mp_losses = [sum(r["mp_losses"][k] for r in ranks) for k in range(steps)]
    tc_losses = next(r["tc_losses"] for r in ranks if r["tc_losses"][0] is not None)
    return {"ratio": statistics.median(a / b for a, b in zip(mp, tc)),
            "mp_ms": statistics.median(mp) * 1e3, "tc_ms": statistics.median(tc) * 1e3,
            "loss_diff": max(abs(a - b) for a, b in zip(mp_losses, tc_losses)),
            "mp_peak": [r["mp_peak"] for r in ranks], "tc_peak": [r["tc_peak"] for r in ranks]}


# ------------------------------------------------------------------ one row


@dataclass
class Measured:
    row: Row
    mp_ms: float
    torch_ms: float
    paired: dict[str, Any] | None
    mp_peak: list[int]
    torch_peak: list[int]
    mp_loss: float
    torch_loss: float
    max_loss_diff: float
    same_order: bool

    @property
    def ratio(self) -> float:
        return self.mp_ms / self.torch_ms


def _check_losses(row: Row, a: list[float], b: list[float], what: str) -> float:
    diff = max(abs(x - y) for x, y in zip(a, b))
    if not diff <= LOSS_TOL:  # also catches NaN
        raise AssertionError(f"{row.label} ({what}): minipipe and torch losses differ by "
                             f"{diff:.3g} > {LOSS_TOL}:\n  minipipe {a}\n  torch    {b}")
    return diff


def measure(row: Row, steps: int, warmup: int, rounds: int, paired: bool) -> Measured:
    total = warmup + steps
    mp_times: list[float] = []
    tc_times: list[float] = []
    diff = 0.0
    for r in range(rounds):  # alternate who goes first, so a slow spell hits both
        runs = (run_minipipe, run_torch) if r % 2 == 0 else (run_torch, run_minipipe)
        out = {}
        for run in runs:
            out[run] = run(row, total) if run is run_minipipe else run(row, total, warmup)
        mp, tc = out[run_minipipe], out[run_torch]
        diff = max(diff, _check_losses(row, mp["losses"], tc["losses"], "separate runs"))
        mp_times += mp["step_times"][warmup:]
        tc_times += tc["step_times"][warmup:]
    pair = None
    if paired:
        pair = run_paired(row, total, warmup)
        if not pair["loss_diff"] <= LOSS_TOL:
            raise AssertionError(f"{row.label} (paired): losses differ by {pair['loss_diff']:.3g}")
        diff = max(diff, pair["loss_diff"])
    return Measured(row, statistics.median(mp_times) * 1e3, statistics.median(tc_times) * 1e3,
                    pair, mp["peak"], tc["peak"], mp["losses"][-1], tc["losses"][-1], diff,
                    mp["order"] == tc["order"])


# ------------------------------------------------------------------ the table


def rows_for(args: argparse.Namespace) -> list[Row]:
    if args.quick:
        return [Row("mlp", "tiny", "1f1b", 2, 4)]
    devices = ["cpu"]
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        devices.append("cuda")  # NCCL: one GPU per rank
    rows = []
    for dev in devices:
        for model in args.models:
            for size in args.sizes:
                for sched in args.schedules:
                    v = 2 if sched == "interleaved" else 1
                    rows.append(Row(model, size, sched, 2, args.m, v, dev))
        if args.p4 and (dev == "cpu" or torch.cuda.device_count() >= 4):
            for model in args.models:
                rows.append(Row(model, args.sizes[0], "1f1b", 4, max(args.m, 4), 1, dev))
    return rows


def table(results: list[Measured], markdown: bool) -> str:
    head = ["row", "dev", "minipipe ms", "torch ms", "ratio", "paired ratio",
            "act KiB/rank minipipe (counted)", "same meter: minipipe", "same meter: torch",
            "loss minipipe", "loss torch", "max |Δloss|", "same order"]
    kib = lambda values: "/".join(f"{b / 1024:.1f}" for b in values)  # noqa: E731
    body = []
    for r in results:
        cores = os.cpu_count() or 1
        flag = " *" if r.row.device == "cpu" and r.row.p > cores else ""
        body.append([r.row.label + flag, r.row.device, f"{r.mp_ms:.2f}", f"{r.torch_ms:.2f}",
                     f"{r.ratio:.2f}", f"{r.paired['ratio']:.2f}" if r.paired else "-",
                     kib(r.mp_peak), kib(r.paired["mp_peak"]) if r.paired else "-",
                     kib(r.paired["tc_peak"] if r.paired else r.torch_peak),
                     f"{r.mp_loss:.6f}", f"{r.torch_loss:.6f}",
                     f"{r.max_loss_diff:.1e}", "yes" if r.same_order else "no"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    gpu = (f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else "no GPU (CUDA rows not run)")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python "
            f"{platform.python_version()}; load average {load}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one tiny row (the CI smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 2)")
    ap.add_argument("--rounds", type=int, default=None, help="separate runs per side (default 2)")
    ap.add_argument("--no-paired", action="store_true", help="skip the paired measurement")
    ap.add_argument("--m", type=int, default=4, help="micro-batches (default 4)")
    ap.add_argument("--models", nargs="+", default=["mlp", "gpt"], choices=["mlp", "gpt"])
    ap.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(SIZES["mlp"]))
    ap.add_argument("--schedules", nargs="+", default=list(TORCH_SCHEDULES),
                    choices=list(TORCH_SCHEDULES))
    ap.add_argument("--p4", action="store_true",
                    help="add 4-rank 1F1B rows (more ranks than cores on a 2-core machine)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 20)
    warmup = 2 if args.quick else max(args.warmup, 2)
    rounds = args.rounds or (1 if args.quick else 2)
    print(machine(), flush=True)
    print(f"median step time over {steps} timed steps after {warmup} warm-up steps; separate "
          f"runs: {rounds} per side; backend gloo on CPU with 1 thread per rank", flush=True)
    results = []
    for row in rows_for(args):
        start = time.perf_counter()
        r = measure(row, steps, warmup, rounds, paired=not args.no_paired)
        results.append(r)
        paired = f", paired {r.paired['ratio']:.2f}" if r.paired else ""
        print(f"  {row.label} [{row.device}]: minipipe {r.mp_ms:.2f} ms, torch {r.torch_ms:.2f} ms,"
              f" ratio {r.ratio:.2f}{paired} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
    print(table(results, args.markdown))
    if any(r.row.p > (os.cpu_count() or 1) and r.row.device == "cpu" for r in results):
        print("* more ranks than cores: the ranks take turns on the CPU, so these times mix the "
              "schedule with contention")
    print(f"after the run: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
