"""Exercise 8: your own schedule, run on real ranks against single-process training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...schedules import Kind, Schedule, naive, one_f_one_b
from .common import (
    CheckFailed,
    _label,
    _mlp_job,
    _orders,
    _passed,
    _peak_until,
    _schedule,
    _train,
    _validated,
)


def check_schedule_on_ranks(schedule: Schedule, steps: int = 2, atol: float = 1e-5) -> Any:
    """Train a small MLP with ``schedule`` on real ranks and compare with single-process training.

    Returns:
        The :class:`~minipipe.runtime.RunResult` (for its timeline, memory, messages).
    """
    __tracebackhide__ = True
    from ...runtime import reference

    if not isinstance(schedule, Schedule):
        raise CheckFailed(f"expected a minipipe Schedule, got {type(schedule).__name__}")
    _validated(schedule, "the schedule")
    model, loss_fn, batch = _mlp_job(schedule.m, layers=max(2, schedule.num_stages))
    result = _train(model, loss_fn, schedule, batch, steps=steps, return_grads=True)
    ref = reference(model, loss_fn, batch, steps=steps)
    loss_err = max(abs(a - b) for a, b in zip(result.losses, ref["losses"]))
    grad_err = max((result.grads[n] - g).abs().max().item() for n, g in ref["grads"].items())
    if loss_err > atol or grad_err > atol:
        raise CheckFailed(f"on real ranks the losses differ from single-process training by "
                          f"{loss_err:.3g} and the gradients by {grad_err:.3g}")
    _passed(f"{schedule.name} on {schedule.p} real ranks: {steps} steps, losses and gradients "
            f"equal single-process training (max differences {loss_err:.1g}, {grad_err:.1g})")
    return result


def _pipelined(s: Schedule, label: str) -> None:
    """The point of the exercise: a memory limit *and* pipelining. A simulated step (equal
    stages, a backward twice a forward) must be no longer than 1F1B's for the same p and m, and
    every rank's compute must overlap another rank's (not one rank at a time)."""
    __tracebackhide__ = True
    from ...simulate import simulate

    times = {"t_f": 1.0, "t_b": 1.0, "t_w": 1.0} if s.split_backward else {"t_f": 1.0, "t_b": 2.0}
    step = simulate(s, **times).step_time
    target = simulate(one_f_one_b(s.p, s.m), t_f=1.0, t_b=2.0).step_time
    if step > target + 1e-9:
        serial = simulate(naive(s.p, s.m), t_f=1.0, t_b=2.0).step_time
        what = (" That is the time of running one micro-batch at a time (no pipelining: while "
                "one rank computes, the other waits)." if step >= serial - 1e-9 else "")
        raise CheckFailed(
            f"{label} respects the memory limit, but a simulated step (t_f = 1, backward 2) takes "
            f"{step:g} time units, where 1F1B takes {target:g} for the same p and m.{what} The "
            "exercise is about keeping the memory low *while* pipelining: let one rank compute "
            "the next forward while the other works on the previous micro-batch. Plot "
            "minipipe.plot_timeline(minipipe.simulate(schedule, 1, 2)) to see the gaps.\n"
            + _orders(s))


def check_my_schedule(fn: Callable[[], Schedule], p: int = 2, m: int = 4,
                      max_inflight: int = 2) -> Any:
    """``fn()``: a hand-written schedule for ``p`` ranks and ``m`` micro-batches holding at most
    ``max_inflight`` micro-batches of activations on rank 0, and pipelined: a simulated step no
    longer than 1F1B's for the same p and m. Then run on real ranks, against the single-process
    reference.

    Returns:
        The :class:`~minipipe.runtime.RunResult` of the real run.
    """
    __tracebackhide__ = True
    label = _label(fn, {})
    s = _schedule(fn, {})
    if s.p != p:
        raise CheckFailed(f"{label} has {s.p} rank(s); this exercise asks for p={p}")
    if s.m != m:
        raise CheckFailed(f"{label} uses micro-batches 0..{s.m - 1}; this exercise asks for m={m} "
                          f"(0..{m - 1}, each once per rank)")
    _validated(s, label)
    release = Kind.W if s.split_backward else Kind.B
    held = _peak_until(s.ranks[0], release)
    if held > max_inflight:
        raise CheckFailed(f"{label}: rank 0 holds {held} micro-batches of activations at once (F "
                          f"run, backward not yet); the exercise asks for at most {max_inflight}. "
                          "Start backwards sooner.\n" + _orders(s))
    _pipelined(s, label)
    result = check_schedule_on_ranks(s)
    per_mb = result.activation_bytes_per_mb[0][0]
    measured = result.peak_activation_bytes[0]
    if measured > max_inflight * per_mb:
        raise CheckFailed(f"on real ranks rank 0 held {measured} bytes of activations at peak, "
                          f"more than {max_inflight} micro-batches ({max_inflight * per_mb} bytes)")
    _passed(f"your schedule holds {measured // per_mb} micro-batch(es) on rank 0, measured "
            f"({measured} bytes)")
    return result
