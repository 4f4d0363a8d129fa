"""Several schedules on the same ranks in one launch: a sweep over ``m`` (or ``v``) that pays
the process start-up once. Each schedule is a full :func:`~minipipe.runtime.train` run of its
own (fresh weights, its own steps), one after the other on the same process group.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch.nn as nn

from ..schedules import Schedule
from .caller import check_config
from .interpreter import rank_main
from .job import Batch, Job
from .launch import launch
from .result import RunResult

__all__ = ["train_sweep"]


def _sweep_main(ctx: Any, jobs: list[Job]) -> list[dict[str, Any]]:
    return [rank_main(ctx, job) for job in jobs]


def train_sweep(model: nn.Sequential, loss_fn: Callable, schedules: Sequence[Schedule],
                data: Batch, *, steps: int = 3, lr: float = 0.05, backend: str = "auto",
                timeout: float = 300.0) -> list[RunResult]:
    """Train ``model`` once per schedule (all with the same ``p``) in one launch of ``p`` ranks.

    Returns one :class:`RunResult` per schedule, as :func:`train` would (SGD, one replica,
    equal-layer split). ``wall_time`` of each is the whole sweep's.
    """
    p = {s.p for s in schedules}
    if len(p) != 1:
        raise ValueError(f"every schedule of a sweep needs the same p, got {sorted(p)}")
    jobs = []
    for schedule in schedules:
        batches = [data] * steps
        bounds = check_config(model, schedule, batches, 1, None)
        # each job its own copy: jobs travel to the ranks together, and a rank trains its
        # stage's layers in place, so a shared model would hand one run's weights to the next
        jobs.append(Job(copy.deepcopy(model), loss_fn, schedule, batches, bounds, lr=lr))
    start = time.perf_counter()
    ranks = launch(_sweep_main, p.pop(), jobs, backend=backend, timeout=timeout)
    wall = time.perf_counter() - start
    info = {"backend": ranks[0][0]["backend"], "device": ranks[0][0]["device"].split(":")[0],
            "world_size": len(ranks), "cores": os.cpu_count() or 1}
    return [RunResult(job.schedule, [r[k] for r in ranks], 1, wall, dict(info, bounds=job.bounds))
            for k, job in enumerate(jobs)]
