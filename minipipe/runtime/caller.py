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
from ..partition import split_evenly
from ..schedules import Schedule
from ..state import param_names, prepare_resume, remove_stale, save_meta
from ..validate import validate
from .interpreter import rank_main
from .job import Batch, Job
from .launch import launch
from .result import RunResult

__all__ = ["train", "reference", "check_config"]


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
    ranks = launch(rank_main, world, job, backend=backend, timeout=timeout, pg_timeout=pg_timeout,
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
