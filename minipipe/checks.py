"""Checks for the graded exercises: each passes only for a correct answer and says what is wrong.

Every ``check_<name>(learner_function)`` calls the learner's function on several cases and
raises :class:`CheckFailed` (an ``AssertionError``) with a message that names the case, says
what is wrong and where to look, without printing the answer. A stub that still raises
``NotImplementedError`` fails with "not implemented yet". The checks know the common wrong
answers (the two bubble definitions swapped, an off-by-one 1F1B warm-up, tied gradients
averaged instead of summed, a greedy partitioner, ...) and name them when they see one.

Schedules are judged by :func:`minipipe.validate.validate` (its message is shown as is) and,
where the exercise is about real ranks, by :func:`minipipe.runtime.train` against
:func:`minipipe.runtime.reference`. Checks that start processes call the learner's function
once first, so a stub fails before anything is launched.
"""

from __future__ import annotations

import itertools
import math
import numbers
import random
import traceback
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch

from .schedules import Action, Kind, Schedule, gpipe, one_f_one_b, zb_h1
from .validate import ScheduleError, validate

__all__ = [
    "CheckFailed",
    "check_bubble_fraction", "check_bubble_overhead", "check_micro_batches_for",
    "check_gpipe", "check_one_f_one_b",
    "check_peak_activation", "check_peak_activation_on_ranks",
    "check_tied_grad_sync",
    "check_partition",
    "check_zero_bubble",
    "check_my_schedule", "check_schedule_on_ranks",
]


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


def _number(value: Any, label: str) -> float:
    """The learner's result as a float, or a message saying why it is not a number."""
    __tracebackhide__ = True
    if value is None:
        raise CheckFailed(f"{label} returned None: did you forget the `return`?")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckFailed(f"{label} returned {value!r} ({type(value).__name__}); return a number")
    if not math.isfinite(float(value)):
        raise CheckFailed(f"{label} returned {value!r}; return a finite number")
    return float(value)


def _close(a: float, b: float, tol: float = 1e-9) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _passed(text: str) -> None:
    print(f"passed: {text}")


# ------------------------------------------------------------------- exercise 1: bubbles

_BUBBLE_CASES = [(4, 16), (2, 4), (8, 8), (8, 2), (16, 64), (5, 7), (3, 1), (1, 5)]


def _bubble_values(fn: Callable) -> dict[tuple[int, int], float]:
    __tracebackhide__ = True
    got = {}
    for p, m in _BUBBLE_CASES:
        args = {"p": p, "m": m}
        got[(p, m)] = _number(_call(fn, args), _label(fn, args))
    return got


def _bubble_check(fn: Callable, want: Callable[[int, int], Fraction],
                  slips: list[tuple[Callable[[int, int], float], str]], name: str) -> None:
    __tracebackhide__ = True
    got = _bubble_values(fn)
    if all(_close(got[c], float(want(*c))) for c in got):
        return
    for formula, why in slips:  # a known wrong formula, recognised on every case
        if all(_close(got[c], formula(*c)) for c in got):
            raise CheckFailed(why)
    if all(_close(got[c], 100 * float(want(*c))) for c in got):
        raise CheckFailed(f"{name} returns a percentage (e.g. {got[(4, 16)]:.4g} for p=4, m=16); "
                          "return a fraction instead (0.5 for half), and format it as a "
                          "percentage only when you print it")
    for (p, m), value in got.items():
        label = f"{getattr(fn, '__name__', name)}(p={p}, m={m})"
        expected = float(want(p, m))
        if _close(value, expected):
            continue
        if value == 0 and expected > 0:
            raise CheckFailed(f"{label} returned 0, yet a {p}-stage pipeline does wait. Integer "
                              "division (`//`) rounds the fraction down to 0: use `/`")
        if p == 1:
            raise CheckFailed(f"{label} returned {value:.6g}: with a single stage nothing ever "
                              "waits for another stage, so there is no bubble")
        raise CheckFailed(
            f"{label} returned {value:.6g}, which is not {name}'s figure for that case. Draw the "
            f"GPipe timeline for p={p}, m={m} in slots of (t_f + t_b): how many slots does the "
            "step last, how many of them is one stage busy, and how many idle? Then check which "
            "two of those numbers this function divides.")


def check_bubble_fraction(fn: Callable[[int, int], float]) -> None:
    """``fn(p, m)``: GPipe's bubble as a fraction of the step (idle / step time), equal stages."""
    __tracebackhide__ = True
    _bubble_check(fn, lambda p, m: Fraction(p - 1, m + p - 1), [
        (lambda p, m: (p - 1) / m,
         "bubble_fraction returns (p − 1)/m: that is the overhead relative to useful work (idle "
         "time ÷ busy time, Megatron-LM's 'bubble time fraction'), the other bubble figure. This "
         "function asks for the share of the whole step a stage waits, idle time ÷ step time, "
         "what a stopwatch measures. How many (t_f + t_b) slots long is a GPipe step?"),
        (lambda p, m: (p - 1) / p,
         "bubble_fraction does not change with m: you return (p − 1)/p, the '(4 − 1)/4' slip "
         "some write-ups make. More micro-batches shrink the bubble: which term of your "
         "formula should depend on m?"),
        (lambda p, m: m / (m + p - 1),
         "bubble_fraction returns the busy share of the step (utilization), 1 minus the bubble. "
         "The bubble is the idle share."),
    ], "bubble_fraction")
    _passed("bubble_fraction matches GPipe's idle share of the step on "
            f"{len(_BUBBLE_CASES)} cases (p=4, m=16: {3 / 19:.2%})")


def check_bubble_overhead(fn: Callable[[int, int], float]) -> None:
    """``fn(p, m)``: GPipe's bubble relative to useful work (idle / busy), equal stages."""
    __tracebackhide__ = True
    _bubble_check(fn, lambda p, m: Fraction(p - 1, m), [
        (lambda p, m: (p - 1) / (m + p - 1),
         "bubble_overhead returns (p − 1)/(m + p − 1): that is the share of the step a stage "
         "waits (idle ÷ step time), the other bubble figure. This one compares the idle time "
         "with the useful work (idle ÷ busy), so it can exceed 1: for p=8, m=2 a stage waits "
         "longer than it computes."),
        (lambda p, m: (p - 1) / p,
         "bubble_overhead does not change with m: you return (p − 1)/p, the '(4 − 1)/4 = 18.75%' "
         "slip of some write-ups (18.75% is 3/16, for m = 16). Which term should be m?"),
        (lambda p, m: min(1.0, (p - 1) / m),
         "bubble_overhead is capped at 1: idle ÷ busy is not a share of anything and can exceed "
         "1 (p=8, m=2: a stage idles longer than it works). Remove the cap."),
    ], "bubble_overhead")
    _passed("bubble_overhead matches idle ÷ busy for GPipe on "
            f"{len(_BUBBLE_CASES)} cases (p=4, m=16: {3 / 16:.2%})")


_MB_CASES = [(4, 0.07), (8, 0.3), (2, 0.15), (16, 0.11), (4, 0.9), (1, 0.01)]


def smallest_m(p: int, target: float) -> int:
    """Reference answer for :func:`check_micro_batches_for` (a loop: exact, no rounding)."""
    m = 1
    while (p - 1) / (m + p - 1) > target:
        m += 1
    return m


def check_micro_batches_for(fn: Callable[[int, float], int]) -> None:
    """``fn(p, target)``: the smallest m whose GPipe bubble fraction of the step is <= target."""
    __tracebackhide__ = True
    for p, target in _MB_CASES:
        args = {"p": p, "target": target}
        label = _label(fn, args)
        got = _call(fn, args)
        if isinstance(got, float) and got.is_integer():
            got = int(got)
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            raise CheckFailed(f"{label} returned {got!r}: return a whole number of micro-batches "
                              "(an int; round up with math.ceil if you solve for m)")
        got = int(got)
        if got < 1:
            raise CheckFailed(f"{label} returned {got}: a step has at least one micro-batch")
        frac = (p - 1) / (got + p - 1)
        if frac > target:
            raise CheckFailed(f"{label} returned m={got}, but then the bubble is {frac:.2%} of the "
                              f"step, above the target {target:.0%}: too few micro-batches")
        if got > 1 and (p - 1) / (got - 1 + p - 1) <= target:
            if got == math.ceil((p - 1) / target):
                raise CheckFailed(
                    f"{label} returned m={got}: that is where the overhead (p − 1)/m drops under "
                    f"{target:.0%}. The target is on the fraction of the step, (idle ÷ step "
                    "time), which is smaller for the same m: fewer micro-batches are enough.")
            raise CheckFailed(f"{label} returned m={got}: it meets the target, but a smaller m "
                              "does too. Return the smallest.")
    _passed(f"micro_batches_for gives the smallest m on {len(_MB_CASES)} cases")


# ------------------------------------------------------------- exercises 2, 3: schedules


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


_GPIPE_CASES = [(2, 4), (4, 8), (3, 1), (1, 3), (4, 2), (3, 5)]


def check_gpipe(fn: Callable[[int, int], Schedule]) -> None:
    """``fn(p, m)``: GPipe (fill–drain): every rank runs all m forwards, then all m backwards."""
    __tracebackhide__ = True
    from .simulate import simulate

    for p, m in _GPIPE_CASES:
        args = {"p": p, "m": m}
        label = _label(fn, args)
        s = _schedule(fn, args)
        if s.split_backward or s.v != 1:
            raise CheckFailed(f"{label}: GPipe has one chunk per rank and whole backwards (F and B "
                              "only, no W, no chunk prefix)")
        _validated(s, label)
        for r, order in enumerate(s.ranks):
            kinds = "".join(a.kind.value for a in order)
            if kinds != "F" * m + "B" * m:
                first_b = kinds.index("B")
                raise CheckFailed(
                    f"{label}: rank {r} runs {order[first_b]} before its last forward, which is "
                    f"not fill–drain: GPipe runs every forward of the batch first, then every "
                    f"backward.\n{_orders(s)}")
            if [a.mb for a in order[:m]] != list(range(m)):
                raise CheckFailed(f"{label}: rank {r} runs its forwards in the order "
                                  f"{' '.join(map(str, order[:m]))}; micro-batches enter the "
                                  "pipeline in order 0, 1, 2, ...")
        step = simulate(s, t_f=1.0, t_b=2.0).step_time
        best = simulate(gpipe(p, m), t_f=1.0, t_b=2.0).step_time
        if step > best + 1e-9:
            raise CheckFailed(f"{label} runs, but a simulated step (t_f=1, t_b=2) takes {step:g} "
                              f"instead of GPipe's {best:g}: look at the order of the backwards")
    _passed(f"gpipe validates and is fill–drain on {len(_GPIPE_CASES)} cases")


_1F1B_CASES = [(2, 4), (4, 8), (4, 2), (3, 3), (1, 3), (5, 1), (4, 5)]


def _warmup(order: Sequence[Action]) -> int:
    """Forwards before the first backward."""
    return next((k for k, a in enumerate(order) if a.kind is not Kind.F), len(order))


def check_one_f_one_b(fn: Callable[[int, int], Schedule]) -> None:
    """``fn(p, m)``: 1F1B (PipeDream-Flush): warm-up, steady one-forward-one-backward, cool-down."""
    __tracebackhide__ = True
    for p, m in _1F1B_CASES:
        args = {"p": p, "m": m}
        label = _label(fn, args)
        note = ("(In this case m < p: there are fewer micro-batches than the warm-up of the first "
                "ranks would like to start.)") if m < p else ""
        s = _schedule(fn, args, note)
        if s.split_backward or s.v != 1:
            raise CheckFailed(f"{label}: plain 1F1B has one chunk per rank and whole backwards "
                              "(F and B only, no W, no chunk prefix)")
        _validated(s, label, note)
        want = one_f_one_b(p, m)
        for r, (order, ref) in enumerate(zip(s.ranks, want.ranks)):
            got_w, want_w = _warmup(order), _warmup(ref)
            if got_w != want_w:
                diff = {1: "one too many", -1: "one too few"}.get(
                    got_w - want_w, "too many" if got_w > want_w else "too few")
                raise CheckFailed(
                    f"{label}: rank {r} runs {got_w} forward(s) before its first backward (its "
                    f"warm-up forwards, plus the first forward of the steady phase if it has one): "
                    f"{diff}. Too many and the rank holds more activations than 1F1B needs; too "
                    "few and it sits idle waiting for a gradient. How many forwards can rank "
                    f"{r} run before the gradient of micro-batch 0 comes back from the last stage "
                    "(and can it ever run more than m?)" + (f"\n{note}" if note else "")
                    + f"\n{_orders(s)}")
            if tuple(order) != tuple(ref):
                k = next(i for i, (a, b) in enumerate(zip(order, ref)) if a != b)
                steady_end = want_w + 2 * (m - want_w)
                phase = ("steady phase (one forward, one backward)" if k < steady_end
                         else "cool-down")
                raise CheckFailed(
                    f"{label}: rank {r}'s warm-up is right, but its {phase} is not 1F1B's: "
                    f"position {k} holds {order[k]}. In the steady phase each new forward is "
                    "followed by the backward of the oldest micro-batch still in flight; the "
                    f"cool-down runs the backwards that are left.\n{_orders(s)}")
    _passed(f"one_f_one_b validates and matches 1F1B on {len(_1F1B_CASES)} cases (m < p included)")


# ------------------------------------------------------------------ exercise 4: memory

_MEM_CASES = [("gpipe", 4, 8, 100), ("1f1b", 4, 8, 100), ("1f1b", 4, 2, 100), ("1f1b", 2, 4, 3000),
              ("gpipe", 2, 1, 7), ("1f1b", 1, 5, 10), ("1f1b", 8, 3, 1), ("gpipe", 3, 5, 64)]


def _peak_reference(name: str, p: int, m: int, per_mb: float) -> list[float]:
    if name == "gpipe":
        return [m * per_mb] * p
    return [min(p - r, m) * per_mb for r in range(p)]


def _peak_values(fn: Callable, name: str, p: int, m: int, per_mb: int) -> list[float]:
    __tracebackhide__ = True
    args = {"schedule_name": name, "p": p, "m": m, "bytes_per_mb": per_mb}
    label = _label(fn, args)
    got = _call(fn, args)
    if isinstance(got, torch.Tensor):
        got = got.tolist()
    if isinstance(got, numbers.Real) or not isinstance(got, Sequence) or isinstance(got, str):
        raise CheckFailed(f"{label} returned {got!r}: return a list with one number per rank "
                          f"(p={p} numbers)")
    if len(got) != p:
        raise CheckFailed(f"{label} returned {len(got)} value(s): return one per rank, p={p}")
    return [_number(v, f"{label}[{r}]") for r, v in enumerate(got)]


def check_peak_activation(fn: Callable[[str, int, int, int], list[int]]) -> None:
    """``fn(schedule_name, p, m, bytes_per_mb)``: peak activation bytes per rank (no recompute)."""
    __tracebackhide__ = True
    _peak_cases(fn)
    _passed(f"peak_activation matches GPipe and 1F1B on {len(_MEM_CASES)} cases (m < p included)")


def _peak_cases(fn: Callable) -> None:
    __tracebackhide__ = True
    for name, p, m, b in _MEM_CASES:
        got = _peak_values(fn, name, p, m, b)
        want = _peak_reference(name, p, m, b)
        if all(_close(g, w) for g, w in zip(got, want)):
            continue
        label = _label(fn, {"schedule_name": name, "p": p, "m": m, "bytes_per_mb": b})
        shown = f"{label} returned {[round(g, 6) for g in got]}"

        def same(values: list[float], got: list[float] = got) -> bool:
            return all(_close(g, float(v)) for g, v in zip(got, values))

        if b != 1 and same([w / b for w in want]):
            raise CheckFailed(f"{shown}: these are micro-batch counts; the function returns bytes "
                              "(count × bytes_per_mb)")
        if name == "1f1b":
            if same([m * b] * p) and p > 1:
                why = ("your 1F1B prediction is GPipe's (m micro-batches on every rank). 1F1B "
                       "starts backwards early, and each backward frees a micro-batch: how many "
                       "can rank r have started when its first backward arrives?")
            elif same([(p - r) * b for r in range(p)]):
                why = (f"rank 0 would hold {p} micro-batches, but this step only has m={m}: a "
                       "rank cannot hold more micro-batches than there are")
            elif (same([min(p - r - 1, m) * b for r in range(p)])
                  or same([(p - r - 1) * b for r in range(p)])):
                why = ("that counts the warm-up forwards only. At the peak a rank also holds the "
                       "micro-batch whose forward it has just run in the steady phase, before "
                       "the next backward frees one; and the last rank holds one, not zero")
            elif same([min(r + 1, m) * b for r in range(p)]):
                why = ("the ranks are the wrong way round: which rank receives its first "
                       "gradient soonest, and which one waits longest?")
            else:
                why = ("not 1F1B's peak. Walk through rank r's order (warm-up, steady, "
                       "cool-down), add one for each F, subtract one for each B, keep the maximum")
        else:
            if same([min(p - r, m) * b for r in range(p)]):
                why = ("that is 1F1B's peak. GPipe runs every forward before any backward: how "
                       "many micro-batches does a rank hold when its last forward is done?")
            else:
                why = ("not GPipe's peak. GPipe runs every forward before any backward: how many "
                       "micro-batches does a rank hold when its last forward is done?")
        raise CheckFailed(f"{shown}, expected something else: {why}")


def _mlp_job(m: int, layers: int = 2, samples_per_mb: int = 4):
    from .models import mlp, mlp_batch

    model = mlp(layers=layers, width=16, d_in=8, d_out=8, seed=0)
    return model, torch.nn.functional.mse_loss, mlp_batch(samples_per_mb * m, d_in=8, d_out=8)


def check_peak_activation_on_ranks(fn: Callable[[str, int, int, int], list[int]], p: int = 2,
                                   m: int = 4) -> dict[str, list[dict[str, int]]]:
    """Compare ``fn``'s prediction with the peak measured on ``p`` real ranks (GPipe and 1F1B).

    Each rank's bytes per micro-batch is measured (stages differ: the first holds the input
    layer, the last the loss), and ``fn(name, p, m, bytes_of_that_rank)[rank]`` must equal the
    rank's measured peak (``RunResult.peak_activation_bytes``, exact on CPU).

    Returns:
        ``{schedule_name: [{"rank", "bytes_per_mb", "predicted", "measured"}, ...]}``.
    """
    __tracebackhide__ = True
    from .runtime import train

    _peak_cases(fn)  # wrong on paper: fail before starting any process
    model, loss_fn, batch = _mlp_job(m)
    table: dict[str, list[dict[str, int]]] = {}
    for name, make in (("gpipe", gpipe), ("1f1b", one_f_one_b)):
        result = train(model, loss_fn, make(p, m), batch)
        rows = []
        for r in range(p):
            per_mb = result.activation_bytes_per_mb[r][0]
            predicted = _peak_values(fn, name, p, m, per_mb)[r]
            measured = result.peak_activation_bytes[r]
            rows.append({"rank": r, "bytes_per_mb": per_mb, "predicted": int(predicted),
                         "measured": measured})
            if not _close(predicted, measured):
                raise CheckFailed(
                    f"{name}, p={p}, m={m}: rank {r} measured a peak of {measured} bytes on real "
                    f"ranks ({per_mb} per micro-batch), your function predicts {predicted:g}")
        table[name] = rows
    for name, rows in table.items():
        print(f"{name}: " + "; ".join(f"rank {x['rank']} predicted {x['predicted']} B, measured "
                                      f"{x['measured']} B" for x in rows))
    _passed(f"predictions equal the peaks measured on {p} real ranks for GPipe and 1F1B")
    return table


# ------------------------------------------------------------ exercise 5: tied gradients

_TIE = {"vocab": 11, "width": 6, "batch": 8, "steps": 3, "lr": 0.5, "seed": 3}


def _tied_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(_TIE["seed"])
    emb = torch.randn(_TIE["vocab"], _TIE["width"], generator=g) * 0.5
    mix = torch.randn(_TIE["width"], _TIE["width"], generator=g) * 0.5
    tokens = torch.randint(0, _TIE["vocab"], (_TIE["batch"],), generator=g)
    targets = torch.randint(0, _TIE["vocab"], (_TIE["batch"],), generator=g)
    return emb, mix, tokens, targets


def _tied_reference() -> dict[str, list[torch.Tensor]]:
    """One process, one embedding used twice: ``loss(tanh(E[x] A) Eᵀ, y)``, plain SGD."""
    emb, mix, x, y = _tied_setup()
    emb, mix = emb.clone().requires_grad_(), mix.clone().requires_grad_()
    grads, weights = [], []
    for _ in range(_TIE["steps"]):
        loss = torch.nn.functional.cross_entropy(torch.tanh(emb[x] @ mix) @ emb.T, y)
        loss.backward()
        grads.append(emb.grad.clone())
        with torch.no_grad():
            emb -= _TIE["lr"] * emb.grad
            mix -= _TIE["lr"] * mix.grad
        emb.grad = mix.grad = None
        weights.append(emb.detach().clone())
    return {"grads": grads, "weights": weights}


def _tied_rank(ctx: Any, sync: Callable) -> dict[str, list[torch.Tensor]]:
    """Two stages share one weight: rank 0 embeds the tokens, rank 1 projects back onto it."""
    import torch.distributed as dist

    emb0, mix0, x, y = _tied_setup()
    emb = torch.nn.Parameter(emb0.clone())  # this rank's copy of the tied weight
    mix = torch.nn.Parameter(mix0.clone())  # rank 0 only
    group = dist.new_group([0, 1])  # the ranks that hold the tied weight
    own, synced, weights, changed = [], [], [], []
    for step in range(_TIE["steps"]):
        ctx.status(f"step {step}: forward and backward")
        if ctx.rank == 0:
            h = torch.tanh(emb[x] @ mix)  # (batch, width): first use of the tied weight
            dist.send(h.detach(), 1)
            grad_h = torch.empty_like(h)
            dist.recv(grad_h, 1)
            h.backward(grad_h)
        else:
            h = torch.empty(_TIE["batch"], _TIE["width"])
            dist.recv(h, 0)
            h.requires_grad_()
            logits = h @ emb.T  # (batch, vocab): second use of the tied weight
            torch.nn.functional.cross_entropy(logits, y).backward()
            dist.send(h.grad, 0)
        own.append(emb.grad.clone())
        before = emb.detach().clone()
        ctx.status(f"step {step}: your sync function")
        sync(emb, group)
        changed.append(not torch.equal(before, emb.detach()))
        synced.append(emb.grad.clone() if emb.grad is not None else None)
        with torch.no_grad():
            for prm in ((emb, mix) if ctx.rank == 0 else (emb,)):
                if prm.grad is not None:
                    prm -= _TIE["lr"] * prm.grad
                prm.grad = None
        weights.append(emb.detach().clone())
    return {"own": own, "synced": synced, "weights": weights, "changed": changed}


def check_tied_grad_sync(fn: Callable[[torch.nn.Parameter, Any], None]) -> dict[str, float]:
    """``fn(param, group)``: sum ``param.grad`` over the ranks of ``group``, in place, on each rank.

    Runs a two-stage pipeline on 2 real ranks (gloo) whose first and last stage share one
    embedding matrix, for 3 SGD steps, calling ``fn`` after each backward; then checks that both
    copies got the single-process gradient and stayed identical.

    Returns:
        ``{"max_grad_error", "max_copy_difference"}`` over the steps.
    """
    __tracebackhide__ = True
    from .launch import WorkerError, launch

    probe = torch.nn.Parameter(torch.zeros(2))
    probe.grad = torch.ones(2)
    try:  # a stub fails here, before any process starts
        fn(probe, None)
    except NotImplementedError as err:
        raise _not_implemented(f"{getattr(fn, '__name__', 'your function')}(param, group)",
                               err) from None
    except Exception:  # expected: this process has no process group
        pass
    try:
        out = launch(_tied_rank, 2, fn, backend="gloo", timeout=120)
    except WorkerError as err:
        raise CheckFailed(f"your sync function raised on rank {err.rank} of a real run:\n"
                          f"{err.worker_traceback.rstrip()}") from None
    ref = _tied_reference()
    own, synced = [o["own"] for o in out], [o["synced"] for o in out]
    if any(o["changed"][0] for o in out):
        raise CheckFailed("your function changed the tied weight itself: it should only change its "
                          "gradient (param.grad); the optimizer then updates the weight")
    g0, g1, want = synced[0][0], synced[1][0], ref["grads"][0]
    if g0 is None or g1 is None:
        raise CheckFailed("after your function a rank has no gradient (param.grad is None); sum "
                          "the gradients in place, into param.grad")

    def eq(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-7)

    if eq(g0, own[0][0]) and eq(g1, own[1][0]):
        raise CheckFailed(
            "nothing changed: after your function each rank still has only the gradient of its "
            "own use of the weight (rank 0: the embedding lookup; rank 1: the output "
            "projection). The two copies get different updates and drift apart. (If you "
            "all-reduced a copy of the gradient, write the result back into param.grad.)")
    if not eq(g0, g1):
        raise CheckFailed("after your function the two ranks hold different gradients for the "
                          "tied weight, so their copies will drift apart; every holder must end "
                          "with the same gradient")
    if eq(g0, want / 2):
        raise CheckFailed(
            "the copies agree, but the gradient is half the single-process one: you averaged. "
            "Averaging is for data parallelism (replicas of one model on different samples); the "
            "two uses of a tied weight are two terms of one loss, and their gradients add up.")
    if eq(g0, own[0][0]) or eq(g0, own[1][0]):
        src = 0 if eq(g0, own[0][0]) else 1
        raise CheckFailed(
            f"both ranks now hold rank {src}'s own gradient: that copies one contribution (a "
            "broadcast) and loses the other rank's. The single-process gradient of a weight used "
            "twice has a term from each use.")
    if not eq(g0, want):
        err = (g0 - want).abs().max().item()
        raise CheckFailed(f"the copies agree, but their gradient differs from the single-process "
                          f"one by up to {err:.3g}: the tied gradient is the sum of the ranks' "
                          "gradients, once")
    grad_err = max((s - w).abs().max().item() for s, w in zip(synced[0], ref["grads"]))
    copy_diff = max((a - b).abs().max().item()
                    for a, b in zip(out[0]["weights"], out[1]["weights"]))
    weight_err = max((a - w).abs().max().item() for a, w in zip(out[0]["weights"], ref["weights"]))
    if copy_diff > 1e-6 or weight_err > 1e-5 or grad_err > 1e-5:
        raise CheckFailed(f"the first step is right, but over {_TIE['steps']} steps the copies "
                          f"differ by {copy_diff:.3g} and the weights from single-process "
                          f"training by {weight_err:.3g}: does your function work on every call?")
    _passed(f"tied gradients summed on 2 real ranks: {_TIE['steps']} steps, copies identical "
            f"(max difference {copy_diff:.1g}), gradient = single-process "
            f"(max error {grad_err:.1g})")
    return {"max_grad_error": grad_err, "max_copy_difference": copy_diff}


# ---------------------------------------------------------------- exercise 6: partition

_PARTITION_CASES: list[tuple[list[float], int]] = [
    ([1, 1, 9, 1, 7], 2),  # greedy "fill up to the average" gives 17, best is 11
    ([5, 2, 8, 8], 2),
    ([1, 9, 4, 8], 3),
    ([9, 7, 6], 2),  # equal layer counts give 16, best is 13
    ([8, 6, 7, 6], 3),
    ([5, 8, 9, 7], 3),
    ([0.8, 1.3, 1.1, 2.9, 0.4, 0.4, 1.7, 2.2, 0.6], 3),  # measured-looking times
    ([0.8, 1.3, 1.1, 2.9, 0.4, 0.4, 1.7, 2.2, 0.6], 4),
    ([0, 3, 0, 0, 3, 0], 2),  # zero-cost layers
    ([2, 3, 5], 3),  # one layer per stage
    ([4, 1, 2], 1),  # one stage
]


def _random_partition_cases() -> list[tuple[list[float], int]]:
    rng = random.Random(2024)
    cases = []
    for _ in range(12):
        n = rng.randint(6, 16)
        k = rng.randint(2, min(5, n))
        cases.append(([round(rng.uniform(0.1, 5.0), 2) for _ in range(n)], k))
    return cases


def _bottleneck(costs: Sequence[float], bounds: Sequence[int]) -> float:
    return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))


def brute_force_bottleneck(costs: Sequence[float], stages: int) -> float:
    """The best bottleneck over every contiguous split (all ``C(n-1, stages-1)`` of them)."""
    n = len(costs)
    return min(_bottleneck(costs, (0, *cuts, n))
               for cuts in itertools.combinations(range(1, n), stages - 1))


def check_partition(fn: Callable[[list[float], int], list[int]]) -> None:
    """``fn(costs, stages)``: bounds of the contiguous split whose slowest stage is cheapest.

    Returns must be ``stages + 1`` increasing layer indices from 0 to ``len(costs)`` (stage ``s``
    holds layers ``bounds[s]:bounds[s+1]``, as ``train(..., bounds=...)`` takes them). The
    bottleneck is compared with a brute force over every split.
    """
    __tracebackhide__ = True
    cases = _PARTITION_CASES + _random_partition_cases()
    for costs, k in cases:
        args = {"costs": list(costs), "stages": k}
        label = _label(fn, args)
        got = _call(fn, args)
        got = getattr(got, "bounds", got)  # a minipipe.partition.Partition is fine too
        if isinstance(got, torch.Tensor):
            got = got.tolist()
        if not isinstance(got, Sequence) or isinstance(got, str) or not all(
                isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in got):
            raise CheckFailed(f"{label} returned {got!r}: return a list of ints, the stage "
                              "boundaries")
        got = [int(b) for b in got]
        n = len(costs)
        if len(got) != k + 1:
            hint = ""
            if len(got) == k - 1:
                hint = (" (you returned only the cut points: add 0 in front and len(costs) at "
                        "the end)")
            elif len(got) == k and sum(got) == n:
                hint = " (that looks like stage sizes: return boundaries, the running sums from 0)"
            elif len(got) < k + 1:
                hint = " (fewer stages than asked: every stage must get at least one layer)"
            raise CheckFailed(f"{label} returned {got}: that is {len(got)} number(s); return "
                              f"stages + 1 = {k + 1} boundaries, from 0 to {n}{hint}")
        if got[0] != 0 or got[-1] != n:
            raise CheckFailed(f"{label} returned {got}: boundaries start at 0 and end at "
                              f"len(costs) = {n}, so that every layer is in a stage")
        empty = [s for s in range(k) if got[s + 1] <= got[s]]
        if empty:
            raise CheckFailed(f"{label} returned {got}: stage {empty[0]} holds layers "
                              f"{got[empty[0]]}:{got[empty[0] + 1]}, which is "
                              + ("empty" if got[empty[0] + 1] == got[empty[0]] else "backwards")
                              + "; every stage needs at least one layer, in order")
        mine, best = _bottleneck(costs, got), brute_force_bottleneck(costs, k)
        if mine > best + 1e-9 * max(1.0, best):
            stage = max(range(k), key=lambda s: sum(costs[got[s]:got[s + 1]]))
            raise CheckFailed(
                f"{label} returned {got}: its slowest stage (stage {stage}) costs {mine:g}, but a "
                f"contiguous split exists whose slowest stage costs {best:g} (the checker tried "
                "every split). A rule that fills stages one by one (up to the average, or with "
                "equal layer counts) cannot see what its choice leaves for the later stages: "
                "look for an exact method (every split, dynamic programming, or a binary search "
                "on the bottleneck).")
    _passed(f"partition returns an optimal contiguous split on {len(cases)} cases "
            "(checked against brute force)")


# --------------------------------------------------------- exercise 7: zero-bubble W placement

_ZB_CASES = [(2, 4), (4, 8), (3, 5), (4, 2), (1, 3), (3, 3)]


def _peak_until(order: Sequence[Action], release: Kind) -> int:
    held = peak = 0
    for a in order:
        held += a.kind is Kind.F
        held -= a.kind is release
        peak = max(peak, held)
    return peak


def check_zero_bubble(fn: Callable[[int, int], Schedule]) -> None:
    """``fn(p, m)``: 1F1B's F/B order with a W for every B, placed to fill the bubbles (ZB-H1).

    Passes when the schedule validates, keeps 1F1B's order of F and B on every rank, holds no
    more activations than 1F1B's first rank (``min(p, m)``; an activation is freed by its W), and
    a simulated step with ``t_f = t_b = t_w = 1`` is as short as ZB-H1's.
    """
    __tracebackhide__ = True
    from .simulate import simulate

    for p, m in _ZB_CASES:
        args = {"p": p, "m": m}
        label = _label(fn, args)
        s = _schedule(fn, args)
        if not s.split_backward:
            raise CheckFailed(f"{label} has no W actions: split each backward into B (input "
                              "gradient) and W (weight gradient) and place every W")
        _validated(s, label)
        ref = one_f_one_b(p, m)
        for r, (order, want) in enumerate(zip(s.ranks, ref.ranks)):
            fb = [a for a in order if a.kind is not Kind.W]
            if tuple(fb) != tuple(want):
                k = next((i for i, (a, b) in enumerate(zip(fb, want)) if a != b), len(want))
                raise CheckFailed(f"{label}: rank {r}'s F and B actions are not in 1F1B's order "
                                  f"(first difference at its F/B action {k}). Keep 1F1B's order "
                                  "for F and B; this exercise only places the W's.\n"
                                  + _orders(s))
        held = [_peak_until(o, Kind.W) for o in s.ranks]
        if max(held) > min(p, m):
            r = max(range(p), key=held.__getitem__)
            raise CheckFailed(
                f"{label}: rank {r} holds up to {held[r]} micro-batches of activations (an "
                f"activation is freed by its W, not its B), more than 1F1B's busiest rank "
                f"({min(p, m)}). Deferring W's costs memory: run the deferred ones sooner.\n"
                + _orders(s))
        step = simulate(s, t_f=1.0, t_b=1.0, t_w=1.0).step_time
        target = simulate(zb_h1(p, m), t_f=1.0, t_b=1.0, t_w=1.0).step_time
        if step > target + 1e-9:
            plain = simulate(one_f_one_b(p, m), t_f=1.0, t_b=2.0).step_time
            raise CheckFailed(
                f"{label}: a simulated step (t_f = t_b = t_w = 1) takes {step:g} time units; 1F1B "
                f"takes {plain:g} and ZB-H1 {target:g}. Some bubble is still empty: plot "
                "minipipe.plot_timeline(minipipe.simulate(schedule, 1, 1, 1)) and look where "
                "ranks idle while they still have W's to do (a rank far from the last stage waits "
                "longest for gradients).")
    _passed(f"zero-bubble placement validates, keeps 1F1B's memory and matches ZB-H1's step time "
            f"on {len(_ZB_CASES)} cases")


# ------------------------------------------------------ exercise 8: your own schedule

def check_schedule_on_ranks(schedule: Schedule, steps: int = 2, atol: float = 1e-5) -> Any:
    """Train a small MLP with ``schedule`` on real ranks and compare with single-process training.

    Returns:
        The :class:`~minipipe.runtime.RunResult` (for its timeline, memory, messages).
    """
    __tracebackhide__ = True
    from .runtime import reference, train

    if not isinstance(schedule, Schedule):
        raise CheckFailed(f"expected a minipipe Schedule, got {type(schedule).__name__}")
    _validated(schedule, "the schedule")
    model, loss_fn, batch = _mlp_job(schedule.m, layers=max(2, schedule.num_stages))
    result = train(model, loss_fn, schedule, batch, steps=steps, return_grads=True)
    ref = reference(model, loss_fn, batch, steps=steps)
    loss_err = max(abs(a - b) for a, b in zip(result.losses, ref["losses"]))
    grad_err = max((result.grads[n] - g).abs().max().item() for n, g in ref["grads"].items())
    if loss_err > atol or grad_err > atol:
        raise CheckFailed(f"on real ranks the losses differ from single-process training by "
                          f"{loss_err:.3g} and the gradients by {grad_err:.3g}")
    _passed(f"{schedule.name} on {schedule.p} real ranks: {steps} steps, losses and gradients "
            f"equal single-process training (max differences {loss_err:.1g}, {grad_err:.1g})")
    return result


def check_my_schedule(fn: Callable[[], Schedule], p: int = 2, m: int = 4,
                      max_inflight: int = 2) -> Any:
    """``fn()``: a hand-written schedule for ``p`` ranks and ``m`` micro-batches holding at most
    ``max_inflight`` micro-batches of activations on rank 0; run on real ranks, against the
    single-process reference.

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
    result = check_schedule_on_ranks(s)
    per_mb = result.activation_bytes_per_mb[0][0]
    measured = result.peak_activation_bytes[0]
    if measured > max_inflight * per_mb:
        raise CheckFailed(f"on real ranks rank 0 held {measured} bytes of activations at peak, "
                          f"more than {max_inflight} micro-batches ({max_inflight * per_mb} bytes)")
    _passed(f"your schedule holds {measured // per_mb} micro-batch(es) on rank 0, measured "
            f"({measured} bytes)")
    return result
