"""The job: everything one rank needs to run its part of a pipeline.

Small by design: a model given as specifications and data given as a loader travel as
descriptions; each rank builds its layers and reads its batches itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..loaders import Loader, as_loader
from ..schedules import Schedule
from ..specs import SpecModel

__all__ = ["Batch", "Job"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Job:
    """Everything a rank needs; built by :func:`train`, shipped to every rank."""

    model: nn.Sequential | SpecModel  # specs: each rank builds only its own layers
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    schedule: Schedule
    data: Loader  # opened on the ranks holding the first or the last stage
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
    resume_from: str | None = None  # specs: each rank loads its own layers from there
    dtype: str | None = None  # "bf16": forward under autocast, boundaries in bf16

    def __post_init__(self) -> None:
        if not isinstance(self.data, Loader):  # a batch or a list of batches, given directly
            self.data = as_loader(self.data)

    @property
    def steps(self) -> int:
        return self.data.steps or 0
