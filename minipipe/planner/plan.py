"""Choose p, v, dp, t, micro-batch size and count, schedule and recomputation for a real run.

:func:`plan` enumerates every configuration of ``gpus = t · p · dp`` devices for one global
batch, keeps those whose every rank fits in memory (and says for each rejected one which rank
runs out, by how much), and ranks the others by predicted step time. Two predictions:

- **closed form** (every configuration): :func:`minipipe.formulas.step_time` on the busiest
  rank's costs, plus one message per stage boundary each way to fill and drain,
  ``2(p·v − 1)·comm``, plus the data-parallel gradient reduction;
- **simulated** (the ``simulate_top`` best by the closed form, and :func:`evaluate` by
  default): :func:`minipipe.simulate` of the schedule with every stage's own ``t_f, t_b, t_w``
  from the cost model and the message time as ``comm``, plus the same reduction.

Each :class:`Estimate` says which one it holds (``source``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .. import formulas
from ..partition import split_evenly
from ..schedules import make_schedule
from ..simulate import simulate
from .costmodel import (
    RECOMPUTE,
    Hardware,
    Model,
    StageCost,
    message_bytes,
    message_time,
    stage_costs,
    state_bytes_per_param,
)

__all__ = ["Config", "Estimate", "Plan", "evaluate", "plan"]

SCHEDULES = ("1f1b", "interleaved", "zb-h1")


@dataclass(frozen=True)
class Config:
    """One way to run: ``t·p·dp`` devices, micro-batches of ``b`` sequences, ``m`` per step."""

    p: int
    dp: int
    t: int
    b: int
    m: int
    schedule: str = "1f1b"
    v: int = 1
    recompute: str = "none"
    zero: int = 0  # 1 (or True): optimizer state sharded over dp (Megatron's distributed
    # optimizer, ZeRO-1); 2: the fp32 gradients too (ZeRO-2); see state_bytes_per_param
    bounds: tuple[int, ...] | None = None  # blocks per stage as boundaries; None: equal counts

    def __str__(self) -> str:
        sched = f"{self.schedule} v={self.v}" if self.schedule == "interleaved" else self.schedule
        return (f"t={self.t} p={self.p} dp={self.dp} b={self.b} m={self.m} {sched} "
                f"recompute={self.recompute}{self._zero()}")

    def _zero(self) -> str:
        return "" if not self.zero else " zero" if int(self.zero) == 1 else f" zero{int(self.zero)}"


@dataclass
class Estimate:
    """What the cost model predicts for one :class:`Config`.

    ``memory`` is the peak bytes of each pipeline rank (states + activations); ``fits`` is
    False when one exceeds the device, and ``reason`` says which and by how much.
    ``step_time`` (seconds) includes the data-parallel gradient reduction; ``bubble`` is the
    idle share of the pipeline part; ``mfu`` counts model FLOPs only (no recomputation),
    ``hfu`` counts the recomputed ones too. ``source``: ``"simulated"`` or ``"closed form"``.
    """

    config: Config
    memory: list[float]
    fits: bool
    reason: str
    step_time: float = float("nan")
    pipeline_time: float = float("nan")
    dp_time: float = 0.0
    bubble: float = float("nan")
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    hfu: float = float("nan")
    source: str = ""
    stages: list[StageCost] = field(default_factory=list, repr=False)


def _bounds(model: Model, cfg: Config, stages: int) -> list[int]:
    if cfg.bounds is None:
        return split_evenly(model.layers, stages)
    b = list(cfg.bounds)
    if len(b) != stages + 1 or b[0] != 0 or b[-1] != model.layers or any(
            x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"bounds {b} must rise from 0 to {model.layers} in {stages} steps")
    return b


def _rank_costs(costs: list[StageCost], p: int) -> list[list[StageCost]]:
    """Stages of each rank: stage ``c·p + r`` runs on rank ``r`` (loop placement)."""
    return [costs[r::p] for r in range(p)]


def _memory(model: Model, hw: Hardware, cfg: Config, costs: list[StageCost]) -> list[float]:
    per_rank = _rank_costs(costs, cfg.p)
    if cfg.schedule == "zb-h1":
        held = formulas.peak_pending_w("zb-h1", cfg.p, cfg.m)
    else:
        held = formulas.peak_inflight(cfg.schedule, cfg.p, cfg.m, cfg.v)
    per_param = state_bytes_per_param(cfg.zero, cfg.dp)
    out = []
    for r, chunks in enumerate(per_rank):
        states = per_param * sum(c.params for c in chunks)
        # held[r] chunk-micro-batches, spread over the rank's chunks (about held/v each)
        acts = held[r] / cfg.v * sum(c.activation_bytes for c in chunks)
        out.append(states + acts)
    return out


def _dp_time(hw: Hardware, cfg: Config, costs: list[StageCost]) -> float:
    """Ring all-reduce (or reduce-scatter + all-gather) of the busiest rank's 4-byte gradients
    over the network, ``2(dp − 1)/dp · bytes / bandwidth``; not overlapped with the pipeline."""
    if cfg.dp == 1:
        return 0.0
    params = max(sum(c.params for c in chunks) for chunks in _rank_costs(costs, cfg.p))
    return 2 * (cfg.dp - 1) / cfg.dp * 4 * params / hw.inter_bw + 2 * hw.latency


def _comm(model: Model, hw: Hardware, cfg: Config) -> float:
    """One boundary message: across nodes once a pipeline group spans more than one node."""
    if cfg.p == 1:
        return 0.0
    cross = cfg.t * cfg.p > hw.gpus_per_node
    return message_time(hw, message_bytes(model, cfg.b, cfg.t), cross)


def evaluate(model: Model, hw: Hardware, cfg: Config, simulated: bool = True) -> Estimate:
    """Memory, step time, throughput and utilisation of one configuration.

    Raises:
        ValueError: a configuration that cannot be built (more stages than layers, interleaved
            with ``m % p != 0``, an unknown schedule or recomputation).
    """
    if cfg.recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {cfg.recompute!r}")
    v = cfg.v if cfg.schedule == "interleaved" else 1
    cfg = replace(cfg, v=v)
    stages = cfg.p * v
    if stages > model.layers:
        raise ValueError(f"{stages} stages need at least {stages} layers; {model.name} has "
                         f"{model.layers}")
    costs = stage_costs(model, hw, _bounds(model, cfg, stages), cfg.b, cfg.t, cfg.recompute)
    memory = _memory(model, hw, cfg, costs)
    worst = max(range(cfg.p), key=memory.__getitem__)
    over = memory[worst] - hw.memory
    reason = "" if over <= 0 else (f"rank {worst} of the pipeline needs {memory[worst] / 2**30:.1f}"
                                   f" GiB, {over / 2**30:.1f} GiB more than the "
                                   f"{hw.memory / 2**30:.0f} GiB of a {hw.name}")
    est = Estimate(cfg, memory, over <= 0, reason, stages=costs)
    comm = _comm(model, hw, cfg)
    split = cfg.schedule == "zb-h1"
    if simulated:
        sched = make_schedule(cfg.schedule, cfg.p, cfg.m, v)
        tl = simulate(sched, [c.t_f for c in costs], [c.t_b if split else c.t_b + c.t_w
                                                      for c in costs],
                      [c.t_w for c in costs] if split else None, comm=comm)
        est.pipeline_time, est.bubble, est.source = tl.step_time, tl.bubble_fraction, "simulated"
    else:
        ranks = _rank_costs(costs, cfg.p)
        busiest = max(ranks, key=lambda cs: sum(c.t_f + c.t_b + c.t_w for c in cs))
        tf, tb, tw = (sum(getattr(c, k) for c in busiest) for k in ("t_f", "t_b", "t_w"))
        if not split:
            tb, tw = tb + tw, 0.0
        est.pipeline_time = (formulas.step_time(cfg.schedule, cfg.p, cfg.m, tf, tb, tw, v)
                             + 2 * (stages - 1) * comm)
        work = cfg.m * sum(c.t_f + c.t_b + c.t_w for cs in ranks for c in cs) / cfg.p
        est.bubble, est.source = 1 - work / est.pipeline_time, "closed form"
    est.dp_time = _dp_time(hw, cfg, costs)
    est.step_time = est.pipeline_time + est.dp_time
    gpus = cfg.p * cfg.dp * cfg.t
    model_flops = cfg.dp * cfg.m * sum(c.flops for c in costs)
    est.tokens_per_s = cfg.dp * cfg.m * cfg.b * model.seq / est.step_time
    est.mfu = model_flops / (est.step_time * gpus * hw.peak_flops)
    hw_flops = model_flops + cfg.dp * cfg.m * sum(c.recompute_flops for c in costs)
    est.hfu = hw_flops / (est.step_time * gpus * hw.peak_flops)
    return est


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Plan:
    """The outcome of :func:`plan`: ``feasible`` fastest first, ``rejected`` with reasons."""

    model: Model
    hardware: Hardware
    gpus: int
    global_batch: int
    feasible: list[Estimate]
    rejected: list[Estimate]

    @property
    def best(self) -> Estimate:
        if not self.feasible:
            raise ValueError(f"no configuration of {self.model.name} fits on {self.gpus} × "
                             f"{self.hardware.name}; first rejection: {self.rejected[0].reason}")
        return self.feasible[0]

    def table(self, top: int = 10) -> str:
        head = (f"{self.model.name} ({self.model.params / 1e9:.1f} B parameters) on {self.gpus} × "
                f"{self.hardware.name}, global batch {self.global_batch} sequences of "
                f"{self.model.seq} tokens: {len(self.feasible)} configurations fit, "
                f"{len(self.rejected)} do not")
        rows = [head, f"{'#':>3} {'configuration':<66} {'step s':>8} {'bubble':>7} {'MFU':>6} "
                      f"{'max GiB':>8}  source"]
        for i, e in enumerate(self.feasible[:top]):
            rows.append(f"{i + 1:>3} {str(e.config):<66} {e.step_time:>8.3f} {e.bubble:>7.1%} "
                        f"{e.mfu:>6.1%} {max(e.memory) / 2**30:>8.1f}  {e.source}")
        return "\n".join(rows)

    def plot(self, ax: Any = None, top: int = 10) -> Any:
        """Bars of the top configurations' step time, split into compute, bubble and DP."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(8, 0.4 * top + 1.2), layout="constrained").add_subplot()
        shown = self.feasible[:top][::-1]
        y = range(len(shown))
        busy = [e.pipeline_time * (1 - e.bubble) for e in shown]
        idle = [e.pipeline_time * e.bubble for e in shown]
        ax.barh(y, busy, color="#4c72b0", label="compute")
        ax.barh(y, idle, left=busy, color="#dd8452", label="pipeline bubble")
        ax.barh(y, [e.dp_time for e in shown], left=[a + b for a, b in zip(busy, idle)],
                color="#8c8c8c", label="data-parallel reduction")
        ax.set_yticks(list(y), [f"{e.config} ({e.mfu:.0%} MFU)" for e in shown], fontsize=7)
        ax.set_xlabel("predicted step time (s), " + ", ".join(sorted({e.source for e in shown})))
        ax.set_title(f"{self.model.name} on {self.gpus} × {self.hardware.name}, batch "
                     f"{self.global_batch}", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="lower right")
        return ax


def plan(model: Model, hardware: Hardware, global_batch: int, gpus: int, *,
         schedules: tuple[str, ...] = SCHEDULES, recompute: tuple[str, ...] = RECOMPUTE,
         chunks: tuple[int, ...] = (2, 4), micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
         zero: bool = True, simulate_top: int = 5, max_tensor: int | None = None) -> Plan:
    """Every configuration of ``gpus`` devices for ``global_batch`` sequences, ranked.

    ``t`` runs over the divisors of ``gpus_per_node`` (or ``max_tensor``) that divide the heads;
    ``p`` over the divisors of ``gpus / t`` up to the layer count; ``dp = gpus / (t·p)`` must
    divide the batch and ``b`` the per-replica batch; interleaved needs ``m % p == 0`` and
    ``p·v`` layers at least. Feasible ones are ranked by the closed form, and the
    ``simulate_top`` best are re-estimated by the simulator (then re-sorted). With the device
    count and the global batch fixed, step time, throughput (tokens/s) and MFU rank alike.
    """
    if gpus < 1 or global_batch < 1:
        raise ValueError("gpus and global_batch must be >= 1")
    feasible, rejected = [], []
    tmax = max_tensor or hardware.gpus_per_node
    for t in (d for d in _divisors(gpus)
              if d <= tmax and model.heads % d == 0 and model.kv % d == 0):
        for p in (d for d in _divisors(gpus // t) if d <= model.layers):
            dp = gpus // (t * p)
            if global_batch % dp:
                continue
            for b in micro_batch_sizes:
                if (global_batch // dp) % b:
                    continue
                m = global_batch // dp // b
                for name in (schedules if p > 1 else ("1f1b",)):
                    vs = chunks if name == "interleaved" else (1,)
                    for v in vs:
                        if name == "interleaved" and (m % p or p * v > model.layers):
                            continue
                        for rc in recompute:
                            cfg = Config(p, dp, t, b, m, name, v, rc, zero and dp > 1)
                            est = evaluate(model, hardware, cfg, simulated=False)
                            (feasible if est.fits else rejected).append(est)
    feasible.sort(key=lambda e: e.step_time)
    top = [evaluate(model, hardware, e.config, simulated=True) for e in feasible[:simulate_top]]
    feasible = sorted(top, key=lambda e: e.step_time) + feasible[simulate_top:]
    rejected.sort(key=lambda e: max(e.memory) - hardware.memory)
    return Plan(model, hardware, gpus, global_batch, feasible, rejected)
