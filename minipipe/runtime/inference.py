"""Pipelined inference: greedy generation with a model split across ranks, forward only.

Each rank holds a contiguous slice of ``[Embed, Block, …, Head]`` and, for every request
group, the KV cache of its own blocks. A group is a batch of prompts of one length. Its first
pass through the pipeline is the *prefill* (the whole prompt, filling the caches, giving the
first token); every later pass is a *decode* step (one new token per request, attending to
the cache). The last rank picks each next token (argmax) and sends it back to rank 0.

One group alone keeps one stage busy at a time, like naive model parallelism: a token still
passes every stage in order, so its latency does not shrink with ``p``. With ``g ≥ p`` groups
in flight (vLLM's pipeline-parallel engine schedules micro-batches of requests this way) all
stages work at once, so throughput grows with ``p`` while latency does not: "pipelining
improves throughput, not latency". :func:`inference_schedule` is the order as data,
:func:`simulate_inference` its timeline with one unit per stage pass, :func:`generate`
runs it on real ranks, and :func:`generate_reference` is the single-process answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models import Block, Embed
from ..partition import split_evenly
from ..schedules import F, Schedule
from ..timeline import Event, Timeline
from ..validate import Message
from .comm import P2P, TensorMeta
from .launch import launch

__all__ = ["inference_schedule", "simulate_inference", "generate_reference", "generate",
           "GenResult"]


def inference_schedule(p: int, groups: int, new_tokens: int) -> Schedule:
    """Every rank's order: pass ``j`` of every group, then pass ``j + 1`` (``F{g}`` = group ``g``).

    Pass 0 of a group is its prefill, pass ``j ≥ 1`` the decode step giving its token ``j``.
    Rank 0 cannot start pass ``j + 1`` of a group before the last rank sent that group's
    token ``j``: with ``groups ≥ p`` the others fill the wait.
    """
    if p < 1 or groups < 1 or new_tokens < 1:
        raise ConfigError(f"need p, groups and new_tokens >= 1, got {p}, {groups}, {new_tokens}")
    order = [F(g) for _ in range(new_tokens) for g in range(groups)]
    return Schedule([order] * p, m=groups, name="inference")


def simulate_inference(p: int, groups: int, new_tokens: int, t_stage: float = 1.0) -> Timeline:
    """The timeline of :func:`inference_schedule` with every stage pass taking ``t_stage``."""
    sched = inference_schedule(p, groups, new_tokens)
    free = [0.0] * p
    token_ready = [0.0] * groups  # when rank 0 may start the group's next pass
    events = []
    for j in range(new_tokens):
        for g in range(groups):
            ready = token_ready[g]
            for r in range(p):
                start = max(free[r], ready)
                free[r] = ready = start + t_stage
                events.append(Event(r, F(g), start, ready))
            token_ready[g] = ready
    return Timeline(sched, events, source="simulated")


@torch.no_grad()
def generate_reference(model: nn.Sequential, prompts: Sequence[torch.Tensor],
                       new_tokens: int) -> list[torch.Tensor]:
    """Greedy generation in one process, the whole sequence recomputed at every step (no
    cache): ``new_tokens`` ids ``(B_g, new_tokens)`` per prompt group."""
    out = []
    for ids in prompts:
        for _ in range(new_tokens):
            nxt = model(ids)[:, -1].argmax(-1)  # (B_g,)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        out.append(ids[:, -new_tokens:])
    return out


@dataclass
class GenResult:
    """A pipelined generation run: tokens, per-token times (seconds from the common start)."""

    tokens: list[torch.Tensor]  # per group, (B_g, new_tokens)
    token_times: list[list[float]]  # per group, when each token left the last rank
    timeline: Timeline  # measured: one F event per stage pass
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft(self) -> list[float]:
        """Time to first token per group (all requests arrive at time 0)."""
        return [t[0] for t in self.token_times]

    @property
    def tpot(self) -> list[float]:
        """Time per output token after the first, per group."""
        return [(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else float("nan")
                for t in self.token_times]

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (every request of every group) per second of the run."""
        n = sum(t.numel() for t in self.tokens)
        return n / max(max(t) for t in self.token_times)


@dataclass
class _GenJob:
    model: nn.Sequential
    bounds: list[int]
    prompts: list[torch.Tensor]
    new_tokens: int
    width: int


def _run_layers(layers: Sequence[nn.Module], x: torch.Tensor, caches: list[dict],
                start: int) -> torch.Tensor:
    for layer, cache in zip(layers, caches):
        if isinstance(layer, Embed):
            x = layer(x, start=start)
        elif isinstance(layer, Block):
            x = layer(x, cache=cache)
        else:
            x = layer(x)
    return x


@torch.no_grad()
def _rank_main(ctx: Any, job: _GenJob) -> dict[str, Any]:
    r, p, dev = ctx.rank, ctx.world_size, ctx.device
    layers = [layer.to(dev).eval() for layer in list(job.model)[job.bounds[r]:job.bounds[r + 1]]]
    dtype = next(job.model.parameters()).dtype
    p2p = P2P(dev, ctx.staged, lookahead=0)
    caches = [[{} for _ in layers] for _ in job.prompts]  # per group, per layer of this rank
    fed: list[torch.Tensor | None] = [None] * len(job.prompts)  # p == 1: the token kept here
    tokens: list[list[torch.Tensor]] = [[] for _ in job.prompts]
    times: list[list[float]] = [[] for _ in job.prompts]
    events = []
    torch.distributed.barrier()
    t0 = time.perf_counter()
    for j in range(job.new_tokens):
        for g, prompt in enumerate(job.prompts):
            n, t_len = prompt.shape
            ctx.status(f"waiting for pass {j} of group {g}")
            if r == 0:  # the prompt, then the token the last rank sent back
                x = prompt.to(dev) if j == 0 else _token_in(p2p, fed, g, n, p)[:, None]
            else:
                shape = (n, t_len if j == 0 else 1, job.width)
                x = p2p.recv(Message("activation", g, r - 1, r - 1, r), TensorMeta(shape, dtype))
            start = time.perf_counter() - t0
            x = _run_layers(layers, x, caches[g], 0 if j == 0 else t_len + j - 1)
            if r < p - 1:
                p2p.send(Message("activation", g, r, r, r + 1), x)
            else:
                nxt = x[:, -1].argmax(-1)  # (B_g,) greedy
                tokens[g].append(nxt.cpu())
                times[g].append(time.perf_counter() - t0)
                if j < job.new_tokens - 1:
                    if p == 1:
                        fed[g] = nxt
                    else:
                        p2p.send(Message("token", g, r, r, 0), nxt)
            events.append((g, start, time.perf_counter() - t0))
    p2p.flush()
    kv = sum(t.untyped_storage().nbytes() for group in caches for c in group for t in c.values())
    out: dict[str, Any] = {"rank": r, "events": events, "device": str(dev), "backend": ctx.backend,
                           "kv_bytes": kv}
    if r == p - 1:
        out["tokens"] = [torch.stack(t, dim=1) for t in tokens]
        out["times"] = times
    return out


def _token_in(p2p: P2P, fed: list, g: int, n: int, p: int) -> torch.Tensor:
    if p == 1:
        return fed[g]
    return p2p.recv(Message("token", g, p - 1, p - 1, 0), TensorMeta((n,), torch.int64))


def generate(model: nn.Sequential, prompts: Sequence[torch.Tensor], new_tokens: int, *, p: int,
             bounds: list[int] | None = None, backend: str = "auto", timeout: float = 120.0,
             threads: int = 1) -> GenResult:
    """Greedy generation on ``p`` ranks with every prompt group in flight at once.

    Args:
        model: ``[Embed, …blocks…, Head]`` (:func:`~minipipe.models.gpt` or
            :func:`~minipipe.models.stand_in_gpt`), split into ``p`` contiguous stages.
        prompts: one ``(B_g, T_g)`` tensor of token ids per group.
        new_tokens: tokens generated per request; ``T_g + new_tokens`` must fit the context.

    Raises:
        ConfigError: before any process starts.
    """
    prompts = [torch.as_tensor(x) for x in prompts]
    bounds = bounds or split_evenly(len(model), p)
    if not prompts or new_tokens < 1:
        raise ConfigError("need at least one prompt group and one new token")
    if not isinstance(model[0], Embed):
        raise ConfigError(f"the first layer must be an Embed, not {type(model[0]).__name__}")
    context = model[0].pos.num_embeddings
    for g, x in enumerate(prompts):
        if x.dim() != 2 or x.shape[1] + new_tokens - 1 > context:
            raise ConfigError(f"group {g}: prompts must be (B, T) ids with T + new_tokens - 1 <= "
                              f"{context} (the context), got {tuple(x.shape)} and {new_tokens}")
    if len(bounds) != p + 1 or any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ConfigError(f"bounds must split {len(model)} layers into {p} non-empty stages, "
                          f"got {bounds}")
    job = _GenJob(model, bounds, prompts, new_tokens, model[0].tok.embedding_dim)
    start = time.perf_counter()
    ranks = launch(_rank_main, p, job, backend=backend, timeout=timeout, threads=threads)
    wall = time.perf_counter() - start
    sched = inference_schedule(p, len(prompts), new_tokens)
    events = [Event(rep["rank"], F(g), s, e) for rep in ranks for g, s, e in rep["events"]]
    cores = os.cpu_count() or 1
    info = {"p": p, "bounds": bounds, "groups": len(prompts), "new_tokens": new_tokens, "wall_time": wall,
            "backend": ranks[0]["backend"], "device": ranks[0]["device"].split(":")[0],
            "cores": cores, "ranks_exceed_cores": p > cores and ranks[0]["device"] == "cpu",
            "kv_bytes": [rep["kv_bytes"] for rep in ranks]}  # KV cache held per rank at the end
    last = ranks[-1]
    return GenResult(last["tokens"], last["times"], Timeline(sched, events, source="measured"),
                     info)
