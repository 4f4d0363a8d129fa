"""The caller side: :func:`train` checks everything, launches the ranks and gathers a
:class:`~minipipe.runtime.result.RunResult`; :func:`reference` is single-process training on
the whole batch, the result every schedule must match.
"""

from __future__ import annotations

import copy
import os
import platform
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..loaders import as_loader
from ..schedules import Schedule
from ..specs import SpecModel, as_specs
from ..state import begin_save, check_resume, commit_save, param_names, prepare_resume, save_meta
from .config import check_arguments, check_config
from .interpreter import rank_main
from .job import Job
from .launch import launch
from .result import RunResult

__all__ = ["train", "reference", "check_config"]


def _model(model: Any) -> tuple[nn.Sequential | SpecModel, nn.Sequential]:
    """``(what the ranks get, a model the caller may inspect)``: for layer specs the latter is
    on the meta device (shapes, no weights); an ``nn.Sequential`` is both."""
    specs = as_specs(model)
    if specs is not None:
        return specs, specs.meta()
    model = model if isinstance(model, nn.Sequential) else nn.Sequential(*model)
    return model, model


def train(model: nn.Sequential | Sequence[nn.Module] | SpecModel, loss_fn: Callable,
          schedule: Schedule, data: Any, *, steps: int | None = None,
          bounds: list[int] | None = None,
          dp: int = 1, optimizer: str | Callable = "sgd", lr: float = 0.05,
          checkpoint: bool | Sequence[int] = False, tie_sync: bool = True,
          return_grads: bool = False, return_params: bool = False, backend: str = "auto",
          timeout: float = 300.0, pg_timeout: float | None = None, check_schedule: bool = True,
          threads: int = 1, save_dir: str | os.PathLike | None = None,
          resume_from: str | os.PathLike | None = None, memory: str = "observed",
          dtype: str | None = None) -> RunResult:
    """Train ``model`` with ``schedule`` on ``dp × p`` real ranks.

    Args:
        model: an ``nn.Sequential`` (or list of layers) split into ``p·v`` contiguous stages,
            sent whole to every rank; or layer specifications (:mod:`minipipe.specs`): each
            rank builds only its own layers, the caller sees them on the meta device only.
        loss_fn: ``loss_fn(output, target)``, mean over the samples it gets. Each micro-batch
            loss is weighted by its share of the batch, so the step's loss is the batch mean.
        schedule: any valid :class:`Schedule`, generated or written by hand.
        data: one ``(inputs, targets)`` batch (repeated ``steps`` times), one per step, or a
            loader (:mod:`minipipe.loaders`: Dataset, DataLoader, callable returning an
            iterator), read step by step on the ranks holding the first and last stage.
        bounds: stage boundaries (see :mod:`minipipe.partition`); default: equal layer counts.
        dp: pipeline replicas (data parallelism); each takes an equal share of every batch.
        optimizer: ``"sgd"``, ``"adam"`` or ``callable(params) -> Optimizer``. lr: its rate.
        checkpoint: recompute activations in backward for all stages (True) or those listed.
        tie_sync: sum the gradients of tied weights across ranks (turn off to watch drift).
        return_grads / return_params: keep the last gradients / final weights by name.
        backend: ``auto``, ``gloo`` or ``nccl``. timeout: seconds before the run is declared
            hung. pg_timeout: seconds one receive may block. check_schedule: validate the
            schedule, split, batches and stage outputs first (turn off only to watch a bad
            configuration hang or fail in the ranks; the arguments are always checked).
        save_dir: at the end, every rank saves its stage there (``rank{global_rank}.pt``);
            the save replaces the previous one all at once, or not at all.
        resume_from: a checkpoint directory written with any split: start from its weights
            and optimizer state (see :mod:`minipipe.state`).
        memory: ``"observed"`` watches the storages autograd saves until they are really freed;
            ``"counted"`` is cheaper bookkeeping for benchmarks (see
            :class:`~minipipe.runtime.autograd.ActivationMeter`).
        dtype: ``"bf16"``: forward and loss under autocast, stage boundaries in bfloat16;
            master weights, gradients and the optimizer step stay fp32.

    Raises:
        ScheduleError, ConfigError, CheckpointError: before any process starts.
        WorkerError, PipelineTimeout: a rank failed or the run hung; MainGuardError: the script
            has no ``if __name__ == "__main__":`` guard (see :mod:`minipipe.runtime.launch`).
    """
    check_arguments(loss_fn=loss_fn, steps=steps, dp=dp, optimizer=optimizer, lr=lr,
                    threads=threads, timeout=timeout, pg_timeout=pg_timeout, save_dir=save_dir)
    if memory not in ("observed", "counted"):
        raise ConfigError(f"memory must be 'observed' or 'counted', not {memory!r}")
    if dtype not in (None, "fp32", "bf16"):
        raise ConfigError(f"dtype must be None, 'fp32' or 'bf16', not {dtype!r} (fp16 needs a "
                          "gradient scaler, not implemented)")
    model, seen = _model(model)
    loader = as_loader(data, steps)
    bounds = check_config(model, schedule, loader, dp, bounds, checkpoint, check_schedule)
    opt_state, start_step, resume = None, 0, None
    if resume_from is not None:  # merged and checked here, before any process starts
        if isinstance(model, SpecModel):  # shapes against the meta model; ranks load their own
            start_step = check_resume(seen, resume_from, optimizer)
            resume = os.fspath(resume_from)
        else:
            model, opt_state, start_step = prepare_resume(model, resume_from, optimizer)
    meta, staging = None, None
    if save_dir is not None:  # ranks write a new directory; committed when all have written
        meta = save_meta(seen, schedule, bounds, dp, start_step + loader.steps, optimizer)
        staging = begin_save(save_dir, meta["run"])
    job = Job(model, loss_fn, schedule, loader, bounds, dp, optimizer, lr, checkpoint, tie_sync,
              return_grads, return_params, staging, meta, opt_state, memory,
              resume_from=resume, dtype=None if dtype == "fp32" else dtype)
    world = dp * schedule.p
    start = time.perf_counter()
    ranks = launch(rank_main, world, job, backend=backend, timeout=timeout, pg_timeout=pg_timeout,
                   threads=threads)
    cores = os.cpu_count() or 1
    info = {"backend": ranks[0]["backend"], "device": ranks[0]["device"].split(":")[0],
            "staged": ranks[0]["staged"], "world_size": world, "cores": cores,
            "ranks_exceed_cores": world > cores and ranks[0]["device"] == "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
            "bounds": bounds, "start_step": start_step, "memory": memory}
    if staging is not None and int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0
        commit_save(save_dir, staging, world)
    return RunResult(schedule, ranks, dp, time.perf_counter() - start, info)


def reference(model: nn.Sequential | Sequence[nn.Module] | SpecModel, loss_fn: Callable,
              data: Any, *, steps: int | None = None, optimizer: str | Callable = "sgd",
              lr: float = 0.05, dtype: str | None = None) -> dict[str, Any]:
    """Single-process training on the whole batch: the result every schedule must match.

    Layer specs are materialised whole here (this is the one process that holds everything);
    ``dtype="bf16"`` runs forward and loss under the same autocast as :func:`train`.

    Returns:
        ``{"losses": [...], "grads": {name: tensor} (last step), "params": {name: tensor}}``
        with the same parameter names as :class:`RunResult`.
    """
    specs = as_specs(model)
    if specs is not None:
        model = specs.materialize()
    else:
        model = copy.deepcopy(model if isinstance(model, nn.Sequential) else nn.Sequential(*model))
    names = param_names(list(model))
    params = {names[id(q)]: q for q in model.parameters()}
    opt = (optimizer(list(params.values())) if callable(optimizer)
           else {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer](list(params.values()), lr=lr))
    losses, grads = [], {}
    low = {"bf16": torch.bfloat16}.get(dtype or "")
    for x, y in as_loader(data, steps).batches():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
            loss = loss_fn(model(x), y).float()
        loss.backward()
        losses.append(loss.item())
        grads = {n: q.grad.detach().clone() if q.grad is not None else None for n, q in params.items()}
        opt.step()
    return {"losses": losses, "grads": grads,
            "params": {n: q.detach().clone() for n, q in params.items()}}
