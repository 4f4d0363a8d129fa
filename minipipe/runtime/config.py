"""Every check that can fail before a process starts, in one place: :func:`train`'s arguments,
the model's split, the data, and what each stage outputs.

A bad argument found here costs milliseconds and one line that says what to do; the same
mistake found in a worker costs a start-up and a traceback from the middle of a step.
:func:`check_boundary` is the one rule for what may cross from one stage to the next: a
trial forward of one micro-batch on the caller applies it before the start, and the
interpreter applies it again to stages the trial could not run.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..partition import split_evenly
from ..schedules import Schedule
from ..validate import validate
from .comm import _DTYPES, _HEADER
from .job import Batch

__all__ = ["check_arguments", "check_config", "check_boundaries", "check_boundary", "as_int"]

OPTIMIZERS = ("sgd", "adam")
MAX_DIMS = _HEADER - 2  # the shape header holds a dtype code, ndim and the sizes


def as_int(name: str, value: Any, least: int = 1) -> int:
    """``value`` as an int >= ``least``; any integer type (numpy's too) is accepted."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < least:
        raise ConfigError(f"{name} must be >= {least}, got {value}")
    return int(value)


def check_arguments(*, loss_fn: Callable, steps: int | None, dp: int, optimizer: Any, lr: float,
                    threads: int, timeout: float, pg_timeout: float | None,
                    save_dir: str | os.PathLike | None) -> None:
    """:func:`train`'s scalar arguments, before the data is read or a process starts."""
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable as loss_fn(output, target), got "
                          f"{type(loss_fn).__name__}")
    if steps is not None:
        as_int("steps", steps)
    as_int("dp", dp)
    as_int("threads", threads)
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be 'sgd', 'adam' or a callable params -> Optimizer, "
                          f"not {optimizer!r}: e.g. functools.partial(torch.optim.RMSprop, lr=0.01)")
    if not (isinstance(lr, numbers.Real) and not isinstance(lr, bool) and math.isfinite(lr)
            and lr >= 0):
        raise ConfigError(f"lr must be a finite number >= 0, got {lr!r}")
    for name, value in (("timeout", timeout), ("pg_timeout", pg_timeout)):
        if value is not None and not (isinstance(value, numbers.Real) and value > 0):
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    if save_dir is not None:
        _check_writable_dir(os.fspath(save_dir))


def _check_writable_dir(path: str) -> None:
    """A directory that exists and is writable, or can be created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"save_dir {path!r} is a file, not a directory: give a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"save_dir {path!r} cannot be written ({probe!r} is not writable): "
                          "give a directory you can write to")


def check_config(model: nn.Sequential, schedule: Schedule, data: list[Batch], dp: int,
                 bounds: list[int] | None, checkpoint: bool | Sequence[int] = False,
                 validate_schedule: bool = True) -> list[int]:
    """The schedule, the split, the data and the stage outputs; returns the stage boundaries.

    ``validate_schedule=False`` (``train(check_schedule=False)``) leaves out the schedule's
    validation and the checks of the split, the batches and the stage outputs, to watch a
    bad configuration fail in the ranks.
    """
    dp = as_int("dp", dp)
    layers = list(model)
    if bounds is None:
        bounds = split_evenly(len(layers), schedule.num_stages)
    if not data:
        raise ConfigError("data holds no batches: give one (inputs, targets) batch or a list")
    if not validate_schedule:
        return bounds
    validate(schedule)
    if len(bounds) != schedule.num_stages + 1 or bounds[0] != 0 or bounds[-1] != len(layers):
        raise ConfigError(f"bounds must have {schedule.num_stages + 1} entries from 0 to "
                          f"{len(layers)}, got {bounds}")
    if any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ConfigError(f"every stage needs at least one layer; bounds {bounds} leave one empty")
    if not isinstance(checkpoint, bool) and (not isinstance(checkpoint, (Sequence, set)) or any(
            isinstance(s, bool) or not isinstance(s, numbers.Integral)
            or not 0 <= s < schedule.num_stages for s in checkpoint)):
        raise ConfigError(f"checkpoint must be True, False or a list of stages 0.."
                          f"{schedule.num_stages - 1}, got {checkpoint!r}")
    _check_data(schedule, data, dp)
    x = data[0][0]
    check_boundaries(model, schedule, bounds, x[: x.shape[0] // (dp * schedule.m)])
    return bounds


def _check_data(schedule: Schedule, data: list[Batch], dp: int) -> None:
    for k, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(t, torch.Tensor) for t in batch)):
            raise ConfigError(f"batch {k} is a {type(batch).__name__}, not an (inputs, targets) "
                              "pair of tensors")
    for k, (x, y) in enumerate(data):
        if (x.shape, y.shape) != (data[0][0].shape, data[0][1].shape):
            raise ConfigError(f"batch {k} has shapes {tuple(x.shape)}, {tuple(y.shape)} but batch 0 "
                              f"has {tuple(data[0][0].shape)}, {tuple(data[0][1].shape)}: every "
                              "step must use batches of one shape (stage shapes are sent once)")
        n = x.shape[0] if x.dim() else 0
        if y.dim() == 0 or y.shape[0] != n:
            raise ConfigError(f"batch {k}: inputs have {n} rows, targets "
                              f"{y.shape[0] if y.dim() else 0}")
        if n == 0 or n % (dp * schedule.m):
            raise ConfigError(
                f"batch {k} has {n} samples, which {dp} replica(s) × {schedule.m} micro-batches "
                f"do not divide; use a batch size that is a positive multiple of "
                f"{dp * schedule.m}")


def check_boundary(stage: int, value: Any, crosses: bool = True) -> None:
    """What stage ``stage`` may hand to the next stage: one floating-point tensor (its
    gradient flows back), and when it is sent to another rank, a dtype the ranks exchange and
    at most 8 dimensions. The one rule to relax when other boundaries (tuples) are supported."""
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"stage {stage} outputs a {type(value).__name__}; a stage must output "
                          "one tensor: return a single tensor from the stage's last layer, or "
                          "move the stage boundary (bounds=) past it")
    if not value.is_floating_point():
        raise ConfigError(f"stage {stage} outputs a {value.dtype} tensor; what a stage hands on "
                          "must be floating point (its gradient flows back): move the stage "
                          "boundary (bounds=) or convert the output to float")
    if crosses and value.dtype not in _DTYPES:
        raise ConfigError(f"stage {stage} outputs a {value.dtype} tensor, which the ranks cannot "
                          f"exchange (they send {', '.join(str(d)[6:] for d in _DTYPES)}): "
                          "convert it, or move the stage boundary (bounds=)")
    if crosses and value.dim() > MAX_DIMS:
        raise ConfigError(f"stage {stage} outputs a tensor of {value.dim()} dimensions "
                          f"{tuple(value.shape)}; at most {MAX_DIMS} can be sent to another rank: "
                          "reshape it, or move the stage boundary (bounds=)")


def check_boundaries(model: nn.Sequential, schedule: Schedule, bounds: list[int],
                     sample: torch.Tensor) -> None:
    """One forward of a ``sample`` micro-batch through every stage but the last, on the
    caller, to apply :func:`check_boundary` before any process starts. It changes nothing:
    no gradients, layers in eval mode (no running statistics updated), the random number
    generator restored. (The meta device would skip the arithmetic, but its first use costs
    seconds.) A stage that fails here (it needs the process group, or the model is on a GPU)
    ends the trial: the interpreter checks the stages after it as they run."""
    layers = list(model)
    modes = [(mod, mod.training) for mod in model.modules()]
    h: Any = sample
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for s in range(len(bounds) - 2):
                try:
                    for layer in layers[bounds[s]:bounds[s + 1]]:
                        h = layer(h)
                except Exception:  # noqa: BLE001 - not checkable here; checked when it runs
                    return
                check_boundary(s, h, crosses=schedule.place(s)[0] != schedule.place(s + 1)[0])
    finally:
        for mod, training in modes:
            mod.training = training
