"""What every exercise check shares: calling the learner's function, reading numbers and
sequences in any form, validating schedules, and :class:`CheckFailed` (see the package
docstring for how checks behave)."""

from __future__ import annotations

import math
import numbers
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...schedules import Action, Kind, Schedule
from ...validate import ScheduleError, validate

__all__ = ["CheckFailed"]


class CheckFailed(AssertionError):
    """An exercise check failed; the message says what is wrong and where to look."""

    def _render_traceback_(self) -> list[str]:
        """What IPython shows: the message, after the learner's own error if there was one.

        The check's internals are left out: the frames would show the checker's code, not the
        learner's mistake.
        """
        lines: list[str] = []
        if self.__cause__ is not None:
            lines += traceback.format_exception(self.__cause__)
            lines.append("\nThe check called your function, which raised the error above.\n\n")
        lines.append(f"CheckFailed: {self}")
        return "".join(lines).rstrip("\n").split("\n")


# --------------------------------------------------------------------------------- helpers


def _label(fn: Callable, args: dict[str, Any]) -> str:
    name = getattr(fn, "__name__", "your function")
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def _not_implemented(label: str, err: NotImplementedError) -> CheckFailed:
    return CheckFailed(
        f"not implemented yet: {label} raises NotImplementedError({str(err)!r}). Write your "
        "code in place of the `raise NotImplementedError(...)` line (marked YOUR CODE HERE), "
        "run that cell, then run this check again.")


def _call(fn: Callable, args: dict[str, Any], note: str = "") -> Any:
    """``fn(*args.values())``; a stub or a crash becomes a :class:`CheckFailed`."""
    __tracebackhide__ = True
    label = _label(fn, args)
    try:
        return fn(*args.values())
    except NotImplementedError as err:
        raise _not_implemented(label, err) from None
    except CheckFailed:
        raise
    except Exception as err:  # the learner's bug, shown with its traceback
        raise CheckFailed(f"{label} raised {type(err).__name__}: {err}"
                          + (f"\n{note}" if note else "")) from err


# relative tolerance for a float the learner returns: float32's resolution (2^-23 ≈ 1.2e-7)
# with room for a few roundings. Every check's wrong answers differ by far more than this.
FLOAT_RTOL = 1e-6


def _scalar(value: Any) -> Any:
    """A Python scalar for a one-element torch tensor or numpy array/scalar (else ``value``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    item = getattr(value, "item", None)  # numpy scalars and one-element arrays
    if callable(item) and getattr(value, "size", None) == 1 and type(value).__module__ == "numpy":
        return item()
    return value


def _number(value: Any, label: str) -> float:
    """The learner's result as a float (Python, numpy or torch form), or a message saying why
    it is not a number."""
    __tracebackhide__ = True
    if value is None:
        raise CheckFailed(f"{label} returned None: did you forget the `return`?")
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckFailed(f"{label} returned {value!r} ({type(value).__name__}); return a number")
    if not math.isfinite(float(value)):
        raise CheckFailed(f"{label} returned {value!r}; return a finite number")
    return float(value)


def _integer(value: Any, label: str, hint: str = "") -> int:
    """The learner's result as an int: a Python or numpy int, or a one-element integer tensor.
    A float is refused, even a whole one (``40.0``): the exercise asks for an int."""
    __tracebackhide__ = True
    if value is None:
        raise CheckFailed(f"{label} returned None: did you forget the `return`?")
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CheckFailed(f"{label} returned {value!r} ({type(value).__name__}): return an int"
                          + (f" ({hint})" if hint else ""))
    return int(value)


def _sequence(value: Any, label: str, what: str) -> list[Any]:
    """A list from a list, tuple, numpy array or 1-d torch tensor; else a message."""
    __tracebackhide__ = True
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        if getattr(value, "ndim", 0) == 1:
            return value.tolist()
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    raise CheckFailed(f"{label} returned {value!r}: return {what}")


def _close(a: float, b: float, tol: float = FLOAT_RTOL) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _passed(text: str) -> None:
    print(f"passed: {text}")


def _schedule(fn: Callable, args: dict[str, Any], note: str = "") -> Schedule:
    """Call a schedule generator and check the result's type, ranks and micro-batches."""
    __tracebackhide__ = True
    label = _label(fn, args)
    s = _call(fn, args, note)
    if not isinstance(s, Schedule):
        raise CheckFailed(f"{label} returned {type(s).__name__}, not a minipipe Schedule: wrap "
                          "your per-rank orders, e.g. Schedule(orders, m=m, name='mine')")
    p, m = args.get("p"), args.get("m")
    if p is not None and s.p != p:
        raise CheckFailed(f"{label} returned a schedule with {s.p} rank(s): it needs one order per "
                          f"rank, p={p} of them" + (" (did you swap p and m?)" if s.p == m else ""))
    if m is not None and s.m != m:
        raise CheckFailed(f"{label} returned a schedule with micro-batches 0..{s.m - 1} (m={s.m}), "
                          f"but m={m}" + (f"\n{note}" if note else ""))
    return s


def _validated(s: Schedule, label: str, note: str = "") -> None:
    __tracebackhide__ = True
    try:
        validate(s)
    except ScheduleError as err:
        raise CheckFailed(f"{label} is rejected by minipipe.validate: {err}"
                          + (f"\n{note}" if note else "")) from None


def _orders(s: Schedule) -> str:
    return "\n".join(f"  rank {r}: " + " ".join(a.label() for a in order)
                     for r, order in enumerate(s.ranks))


def _mlp_job(m: int, layers: int = 2, samples_per_mb: int = 4):
    from ...models import mlp, mlp_batch

    model = mlp(layers=layers, width=16, d_in=8, d_out=8, seed=0)
    return model, torch.nn.functional.mse_loss, mlp_batch(samples_per_mb * m, d_in=8, d_out=8)


def _peak_until(order: Sequence[Action], release: Kind) -> int:
    held = peak = 0
    for a in order:
        held += a.kind is Kind.F
        held -= a.kind is release
        peak = max(peak, held)
    return peak


def _train(*args: Any, **kwargs: Any) -> Any:
    """:func:`minipipe.train` for a check: a hang or a crash on the ranks becomes the check's
    :class:`CheckFailed`, with each rank's status (a short timeout: these runs take seconds)."""
    __tracebackhide__ = True
    from ...runtime import train
    from ...runtime.launch import PipelineTimeout, WorkerError

    kwargs.setdefault("timeout", 120.0)
    kwargs.setdefault("pg_timeout", 30.0)
    try:
        return train(*args, **kwargs)
    except (PipelineTimeout, WorkerError) as err:
        raise CheckFailed(f"the run on real ranks failed: {err}") from None


def _how_far(got: int, want: int) -> str:
    """``"one too many"``, ``"one too few"``, ``"too many"`` or ``"too few"``."""
    return {1: "one too many", -1: "one too few"}.get(
        got - want, "too many" if got > want else "too few")
