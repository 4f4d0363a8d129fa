"""The job: everything one rank needs to run its part of a pipeline, and how parameters are named."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..schedules import Schedule

__all__ = ["Batch", "Job"]

Batch = tuple[torch.Tensor, torch.Tensor]


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
    memory: str = "observed"  # activation meter: "observed" or "counted" (see ActivationMeter)
