"""One rank's stage: its chunks of the model, optimizer, tied-weight and data-parallel groups.

:class:`StageWorker` is built once per rank from the :class:`~minipipe.runtime.job.Job`. It
holds what stays between steps; :mod:`minipipe.runtime.interpreter` runs each step with it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..dataflow import crossing_edges
from ..errors import ConfigError
from ..specs import SpecModel, param_bytes
from ..state import load_stage, param_names, restore_optimizer
from ..structure import Signature, cast_floating, signature
from ..validate import comm_plan
from .autograd import ActivationMeter
from .comm import P2P, channel_groups
from .job import Job
from .launch import Context

__all__ = ["StageWorker"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class StageWorker:
    """This rank's chunks, optimizer, tied-weight and data-parallel groups."""

    def __init__(self, ctx: Context, job: Job) -> None:
        self.ctx, self.job, self.sched = ctx, job, job.schedule
        p, v = self.sched.p, self.sched.v
        self.replica, self.rank = divmod(ctx.rank, p)
        self.last = self.sched.num_stages - 1
        self.stages = [self.sched.stage(self.rank, c) for c in range(v)]
        built, names = self._build()
        self.chunks: dict[int, nn.Module] = {}
        self.chunk_params: dict[int, list[nn.Parameter]] = {}  # for the split backward
        self.params: dict[str, nn.Parameter] = {}
        for c, s in enumerate(self.stages):
            part = [built[i] for i in self.layers(s)]
            self.chunks[c] = nn.Sequential(*part).to(ctx.device)
            self.chunk_params[c] = [q for q in self.chunks[c].parameters() if q.requires_grad]
            for layer in part:
                for prm in layer.parameters():
                    self.params[names[id(prm)]] = prm
        self.param_bytes = param_bytes(built.values())
        ckpt = job.checkpoint
        self.ckpt_stages = set(range(self.last + 1)) if ckpt is True else set(ckpt or ())
        self.plan = comm_plan(self.sched)[self.rank]
        self.p2p = P2P(ctx.device, ctx.staged, offset=self.replica * p,
                       channel_groups=self._channel_groups())
        self.meta: dict[tuple[str, int], Signature] = {}  # what each stage edge carries
        self.batch_signature: Any = None  # the last step's (inputs, targets) structure
        self.meter = ActivationMeter(list(self.params.values()), job.memory)
        self.opt = self._optimizer()
        opt_state = job.opt_state
        if job.resume_from is not None:  # specs: this rank reads only its own layers
            opt_state = load_stage(built, job.resume_from)
        if opt_state and self.opt:  # resuming: optimizer state by parameter name
            restore_optimizer(self.opt, self.params, opt_state)
        self.tie_groups = self._tie_groups()
        self.dp_group = self._dp_group()
        for name, (group, src) in self.tie_groups.items():  # tied copies start identical:
            dist.broadcast(self.params[name].data, src, group=group)  # the first user's values

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

    def _build(self) -> tuple[dict[int, nn.Module], dict[int, str]]:
        """This rank's layers by index, and ``id(parameter) -> name`` for them."""
        mine = [i for s in self.stages for i in self.layers(s)]
        model = self.job.model
        if isinstance(model, SpecModel):  # materialise only this rank's layers
            built = model.build(mine)
            return built, model.names(built)
        layers = list(model)  # an nn.Sequential: every rank was sent all of it
        return {i: layers[i] for i in mine}, param_names(layers)

    def layers(self, stage: int) -> range:
        """The model's layers that ``stage`` holds (a replica's: those of its model stage)."""
        k = self.sched.model_stage(stage)
        return range(self.job.bounds[k], self.job.bounds[k + 1])

    def _holders(self) -> dict[str, set[int]]:
        """Stages holding each parameter held by several (tied layers, or the replicas of
        ``pipelines > 1``); the others are left out."""
        model = self.job.model
        stage_of: dict[int, set[int]] = defaultdict(set)
        for s in range(self.last + 1):
            for i in self.layers(s):
                stage_of[i].add(s)
        if isinstance(model, SpecModel):
            users = model.tied()
            if self.sched.pipelines > 1:  # every layer is held twice: name all (shapes only)
                meta = model.build(range(len(model)), device="meta")
                names = model.names(meta)
                for i, layer in meta.items():
                    for prm in layer.parameters():
                        users.setdefault(names[id(prm)], [i])
            return {n: set().union(*(stage_of[i] for i in us)) for n, us in users.items()}
        layers = list(model)
        names = param_names(layers)
        holders: dict[str, set[int]] = defaultdict(set)
        for i, layer in enumerate(layers):
            for prm in layer.parameters():
                holders[names[id(prm)]].update(stage_of[i])
        return holders

    def _tie_groups(self) -> dict[str, tuple]:
        """One process group per tied parameter held by several ranks (same order everywhere);
        its source is the rank holding the parameter's first stage."""
        p = self.sched.p
        groups, made = {}, {}  # one group per set of ranks (DualPipe: a pair per stage)
        for name, stages in sorted(self._holders().items()):
            holders = {self.sched.place(s)[0] for s in stages}
            if len(holders) < 2:
                continue
            first = self.sched.place(min(stages))[0]
            for d in range(self.job.dp):  # every process creates every group, in one order
                ranks = tuple(sorted(d * p + r for r in holders))
                if ranks not in made:
                    made[ranks] = dist.new_group(list(ranks))
                group = made[ranks]
                if d == self.replica and name in self.params:
                    groups[name] = (group, d * p + first)
        return groups

    def _channel_groups(self) -> dict | None:
        """NCCL matches messages by posting order, not tag: a process group per channel."""
        if self.ctx.backend != "nccl":
            return None  # gloo: one tag per channel (see comm.channel_tag)
        place, channels = self.sched.placement, []
        for s in crossing_edges(self.sched):
            channels.append((("activation", s), place[s][0], place[s + 1][0]))
            channels.append((("gradient", s + 1), place[s + 1][0], place[s][0]))
        return channel_groups(channels, self.job.dp, self.sched.p, self.replica)

    def _dp_group(self) -> Any:
        if self.job.dp == 1:
            return None
        mine = None
        for r in range(self.sched.p):
            group = dist.new_group([d * self.sched.p + r for d in range(self.job.dp)])
            mine = group if r == self.rank else mine
        return mine

    def optimizer_step(self) -> None:
        """The update after the flush: torch's optimizer, or plain SGD done here."""
        if self.opt is not None:
            self.opt.step()
        elif self.job.optimizer == "sgd":
            self._sgd_step()

    @torch.no_grad()
    def _sgd_step(self) -> None:
        """``w -= lr · grad``, as torch.optim.SGD does without momentum (building that
        optimizer imports torch._dynamo: about a second of start-up on every rank)."""
        for q in self.params.values():
            if q.grad is not None:
                q.add_(q.grad, alpha=-self.job.lr)

    def autocast(self) -> Any:
        """The forward's precision: autocast to the job's ``dtype``, or nothing."""
        dtype = _DTYPES.get(self.job.dtype)
        return torch.autocast(self.ctx.device.type, dtype=dtype, enabled=dtype is not None)

    def forward(self, chunk: int, stage: int, inp: Any) -> Any:
        module = self.chunks[chunk]
        try:
            if stage in self.ckpt_stages:  # keep only the stage input; recompute in backward
                out = torch_checkpoint(module, inp, use_reentrant=False)
            else:
                out = module(inp)
        except Exception as e:  # most often: not the structure the previous stage returns
            raise RuntimeError(f"stage {stage} failed on its input {signature(inp)}: "
                               f"{type(e).__name__}: {e}") from e
        dtype = _DTYPES.get(self.job.dtype)
        if dtype is not None and not self.sched.is_last(stage):
            out = cast_floating(out, dtype)  # boundary tensors travel in the compute dtype
        return out

    def sync_grads(self) -> None:
        """After the flush: sum tied copies' gradients (and always the two copies of a
        DualPipe stage), then the same stage's across data-parallel replicas."""
        for name, (group, _) in self.tie_groups.items():  # tied copies: sum their gradients
            if self.job.tie_sync or self.sched.pipelines > 1:
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
