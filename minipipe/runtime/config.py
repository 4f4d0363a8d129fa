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
from ..loaders import Loader
from ..partition import split_evenly
from ..schedules import Schedule
from ..specs import SpecModel
from ..structure import flatten, rows, signature, take_rows, unflatten
from ..validate import validate
from .comm import SENDABLE
from .job import Batch

__all__ = ["check_arguments", "check_config", "check_boundaries", "check_boundary", "as_int"]

OPTIMIZERS = ("sgd", "adam")


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


def check_config(model: nn.Sequential | SpecModel, schedule: Schedule,
                 data: Loader | Sequence[Batch], dp: int,
                 bounds: list[int] | None, checkpoint: bool | Sequence[int] = False,
                 validate_schedule: bool = True) -> list[int]:
    """The schedule, the split, the data and the stage outputs; returns the stage boundaries.

    ``validate_schedule=False`` (``train(check_schedule=False)``) leaves out the schedule's
    validation and the checks of the split, the batches and the stage outputs, to watch a
    bad configuration fail in the ranks. Batches given in memory are all checked; a streamed
    loader's first batch only. Layer specs get their trial forward on the meta device.
    """
    dp = as_int("dp", dp)
    num_layers = len(model)
    data = data.sample() if isinstance(data, Loader) else list(data)
    stages = schedule.group_stages  # the model's stages (DualPipe holds each twice)
    if bounds is None:
        bounds = split_evenly(num_layers, stages)
    if not data:
        raise ConfigError("data holds no batches: give one (inputs, targets) batch or a list")
    if not validate_schedule:
        return bounds
    validate(schedule)
    if len(bounds) != stages + 1 or bounds[0] != 0 or bounds[-1] != num_layers:
        raise ConfigError(f"bounds must have {stages + 1} entries from 0 to "
                          f"{num_layers}, got {bounds}")
    if any(b >= e for b, e in zip(bounds, bounds[1:])):
        raise ConfigError(f"every stage needs at least one layer; bounds {bounds} leave one empty")
    if not isinstance(checkpoint, bool) and (not isinstance(checkpoint, (Sequence, set)) or any(
            isinstance(s, bool) or not isinstance(s, numbers.Integral)
            or not 0 <= s < schedule.num_stages for s in checkpoint)):
        raise ConfigError(f"checkpoint must be True, False or a list of stages 0.."
                          f"{schedule.num_stages - 1}, got {checkpoint!r}")
    _check_data(schedule, data, dp)
    x = data[0][0]
    sample = take_rows(x, 0, rows(x) // (dp * schedule.m))
    if isinstance(model, SpecModel):
        trial_forward(model.meta(), bounds, sample)
    else:
        check_boundaries(model, schedule, bounds, sample)
    return bounds


def trial_forward(meta: nn.Sequential, bounds: list[int], x: Any) -> None:
    """Layer specs: run the model on the meta device, stage by stage, on ``x``'s shapes: a
    stage that cannot take what the previous one returns fails here, named."""
    tree, leaves = flatten(x)
    value = unflatten(tree, [None if t is None else t.to("meta") for t in leaves])
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        try:
            value = meta[a:b](value)
        except NotImplementedError:  # an operation without a meta kernel: nothing to learn
            return
        except Exception as e:
            raise ConfigError(f"stage {s} (layers {a}-{b - 1}) fails on what it receives, "
                              f"{signature(value)}: {type(e).__name__}: {e}") from e


def _check_data(schedule: Schedule, data: list[Batch], dp: int) -> None:
    """Every batch a pair (inputs, targets) of tensors or tuples/dicts of them, with rows that
    ``dp`` replicas × ``m`` micro-batches divide. Shapes may change from batch to batch."""
    for k, batch in enumerate(data):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ConfigError(f"batch {k} is a {type(batch).__name__}, not an (inputs, targets) "
                              "pair")
        try:
            n, n_y = rows(batch[0]), rows(batch[1])
        except (TypeError, IndexError) as e:
            raise ConfigError(f"batch {k} is not an (inputs, targets) pair of tensors (or "
                              f"tuples/dicts of them): {e}") from e
        if n_y != n:
            raise ConfigError(f"batch {k}: inputs have {n} rows, targets {n_y}")
        if n == 0 or n % (dp * schedule.m):
            raise ConfigError(
                f"batch {k} has {n} samples, which {dp} replica(s) × {schedule.m} micro-batches "
                f"do not divide; use a batch size that is a positive multiple of "
                f"{dp * schedule.m}")


def check_boundary(stage: int, value: Any, crosses: bool = True) -> None:
    """What stage ``stage`` may hand to the next stage: a tensor, or a tuple/list/dict of
    tensors and ``None`` (:mod:`minipipe.structure`); sent to another rank, every tensor in a
    dtype the ranks exchange."""
    try:
        leaves = flatten(value)[1]
    except TypeError as e:
        raise ConfigError(f"stage {stage} outputs a {type(value).__name__}: {e}; return tensors "
                          "from the stage's last layer, or move the stage boundary (bounds=)") from e
    if not any(t is not None for t in leaves):
        raise ConfigError(f"stage {stage} outputs no tensor: it must hand something on")
    bad = [t.dtype for t in leaves if t is not None and t.dtype not in SENDABLE]
    if crosses and bad:
        raise ConfigError(f"stage {stage} outputs a {bad[0]} tensor, which the ranks cannot "
                          f"exchange (they send {', '.join(sorted(str(d)[6:] for d in SENDABLE))}): "
                          "convert it, or move the stage boundary (bounds=)")


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
