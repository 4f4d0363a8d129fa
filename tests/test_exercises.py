"""Graded exercises: checks reject the common wrong answers, stubs fail at a check, solutions pass.

Four groups of tests:

- every check rejects the planted wrong answers with the message that names the mistake, and
  accepts correct answers (these call :mod:`minipipe.course.checks` directly, no notebooks);
- ``exercises/`` and ``solutions/`` are exactly what ``tools/build_exercises.py`` writes;
- every exercise notebook, as shipped, fails at its first check cell with "not implemented yet"
  (graded through :func:`minipipe.course.grade.main`, one row per exercise);
- :func:`minipipe.course.grade.main` passes the solutions.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
import torch.distributed as dist

import minipipe.runtime
import minipipe.runtime.launch
from minipipe import (
    B,
    F,
    Kind,
    Schedule,
    ScheduleError,
    W,
    gpipe,
    interleaved,
    naive,
    one_f_one_b,
    validate,
)
from minipipe.course import checks
from minipipe.course.checks import (
    CheckFailed,
    ex01_bubble,
    ex06_partition,
    ex09_interleaved,
    ex10_fix_hang,
)

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = sorted(p.name for p in (ROOT / "exercises_src").glob("[0-9][0-9]_*.py"))

# the sync functions below travel to spawned ranks: pickle them by value, not by module name
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def stub(*args):
    raise NotImplementedError("Exercise 0: write this")


# ------------------------------------------------------------------------ correct answers

def bubble_fraction(p, m):
    return (p - 1) / (m + p - 1)


def bubble_overhead(p, m):
    return (p - 1) / m


def micro_batches_for(p, target):
    m = 1
    while (p - 1) / (m + p - 1) > target:
        m += 1
    return m


def micro_batches_for_closed_form(p, target):
    import math

    return max(1, math.ceil((p - 1) / target - (p - 1)))


def gpipe_mine(p, m):
    return Schedule([[F(i) for i in range(m)] + [B(i) for i in range(m)] for _ in range(p)], m=m)


def gpipe_backwards_reversed(p, m):  # also fill–drain: last in, first out on every rank
    return Schedule([[F(i) for i in range(m)] + [B(i) for i in reversed(range(m))]
                     for _ in range(p)], m=m)


def one_f_one_b_mine(p, m, warmup_of=lambda p, r, m: min(p - r - 1, m)):
    ranks = []
    for r in range(p):
        w = warmup_of(p, r, m)
        order = [F(i) for i in range(w)]
        for i in range(m - w):
            order += [F(w + i), B(i)]
        order += [B(i) for i in range(m - w, m)]
        ranks.append(order)
    return Schedule(ranks, m=m)


def peak_activation(schedule_name, p, m, bytes_per_mb):
    if schedule_name == "gpipe":
        return [m * bytes_per_mb] * p
    return [min(p - r, m) * bytes_per_mb for r in range(p)]


def sync_sum(param, group):
    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)


def partition_dp(costs, stages):
    from minipipe.partition import balanced

    return balanced(costs, stages)  # a Partition; checks read its .bounds


def place_w(p, m, lag=lambda p, r: r):
    ranks = []
    for r, order in enumerate(one_f_one_b(p, m).ranks):
        out, waiting = [], []
        for a in order:
            out.append(a)
            if a.kind is Kind.B:
                waiting.append(a.mb)
                if len(waiting) > lag(p, r):
                    out.append(W(waiting.pop(0)))
        ranks.append(out + [W(i) for i in waiting])
    return Schedule(ranks, m=m)


def my_schedule_other():  # not the solution's order: split backwards, W's put off a little
    return Schedule(["F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3",
                     "F0 B0 F1 W0 B1 F2 W1 B2 F3 W2 B3 W3"], name="mine")


def my_schedule_slow():  # valid, at most 2 in flight, but rank 1 runs two forwards ahead
    return Schedule(["F0 F1 B0 F2 B1 F3 B2 B3", "F0 F1 B0 B1 F2 F3 B2 B3"], name="mine")


def partition_exact(costs, stages):  # every split: exact, slow, a plain list
    from itertools import combinations

    n = len(costs)
    splits = [(0, *c, n) for c in combinations(range(1, n), stages - 1)]
    return list(min(splits, key=lambda b: max(sum(costs[x:y]) for x, y in zip(b, b[1:]))))


def fixed(which):
    good = {"a": ["F0 B0 F1 B1 F2 B2", "F0 B0 F1 B1 F2 B2"],
            "b": ["F0 F1 F2 F3 B1 B0 B2 B3", "F0 F1 F2 F3 B1 B0 B2 B3"],  # the other fix
            "c": ["F0 F1 B0 F2 F3 B1 B2 B3", "F0 F1 B0 F2 B1 F3 B2 B3",
                  "F0 B0 F1 B1 F2 B2 F3 B3"]}[which]
    return lambda: Schedule(good)


def interleaved_all_warmup_when_m_is_p(p, m, v):  # Megatron-LM's m == p special case, or not
    s = interleaved(p, m, v)
    if m != p:
        return s
    return Schedule([[a for a in o if a.kind is Kind.F] + [a for a in o if a.kind is Kind.B]
                     for o in s.ranks], m=m, v=v)


CORRECT = [
    # numbers and sequences in numpy and torch forms (float32 included)
    pytest.param(checks.check_bubble_fraction,
                 lambda p, m: torch.tensor(p - 1, dtype=torch.float32) / (m + p - 1),
                 id="bubble_fraction-torch-float32"),
    pytest.param(checks.check_bubble_fraction,
                 lambda p, m: np.float32(p - 1) / np.float32(m + p - 1), id="bubble_fraction-np"),
    pytest.param(checks.check_bubble_overhead,
                 lambda p, m: torch.tensor((p - 1) / m, dtype=torch.float32),
                 id="bubble_overhead-torch-float32"),
    pytest.param(checks.check_micro_batches_for, lambda p, t: np.int64(micro_batches_for(p, t)),
                 id="micro_batches_for-np-int"),
    pytest.param(checks.check_micro_batches_for, lambda p, t: torch.tensor(micro_batches_for(p, t)),
                 id="micro_batches_for-torch-int"),
    pytest.param(checks.check_peak_activation,
                 lambda n, p, m, b: np.array(peak_activation(n, p, m, b)), id="peak-np"),
    pytest.param(checks.check_peak_activation,
                 lambda n, p, m, b: torch.tensor(peak_activation(n, p, m, b), dtype=torch.float32),
                 id="peak-torch-float32"),
    pytest.param(checks.check_partition, lambda c, k: np.array(partition_dp(c, k).bounds),
                 id="partition-np"),
    pytest.param(checks.check_partition, lambda c, k: tuple(partition_dp(c, k).bounds),
                 id="partition-tuple"),
    pytest.param(checks.check_partition, partition_exact, id="partition-every-split"),
    pytest.param(checks.check_interleaved, interleaved, id="interleaved-package"),
    pytest.param(checks.check_interleaved, interleaved_all_warmup_when_m_is_p,
                 id="interleaved-m-equals-p"),
    pytest.param(lambda f: checks.check_fix(f, "a", run=False), fixed("a"), id="fix-a"),
    pytest.param(lambda f: checks.check_fix(f, "b", run=False), fixed("b"), id="fix-b-rank0"),
    pytest.param(lambda f: checks.check_fix(f, "c", run=False), fixed("c"), id="fix-c"),

    pytest.param(checks.check_bubble_fraction, bubble_fraction, id="bubble_fraction"),
    pytest.param(checks.check_bubble_overhead, bubble_overhead, id="bubble_overhead"),
    pytest.param(checks.check_micro_batches_for, micro_batches_for, id="micro_batches_for-loop"),
    pytest.param(checks.check_micro_batches_for, micro_batches_for_closed_form,
                 id="micro_batches_for-closed-form"),
    pytest.param(checks.check_gpipe, gpipe_mine, id="gpipe"),
    pytest.param(checks.check_gpipe, gpipe_backwards_reversed, id="gpipe-backwards-reversed"),
    pytest.param(checks.check_gpipe, gpipe, id="gpipe-package"),
    pytest.param(checks.check_one_f_one_b, one_f_one_b_mine, id="1f1b"),
    pytest.param(checks.check_peak_activation, peak_activation, id="peak_activation"),
    pytest.param(checks.check_partition, partition_dp, id="partition-dp"),
    pytest.param(checks.check_zero_bubble, place_w, id="zero-bubble"),
]


@pytest.mark.parametrize("check, answer", CORRECT)
def test_check_accepts_correct_answer(check, answer, capsys):
    check(answer)
    assert capsys.readouterr().out.startswith("passed:")


# ---------------------------------------------------------------------- wrong answers


def _g(orders, m=None):
    return lambda p, m_: Schedule(orders(p, m_), m=m_ if m is None else m)


def _rank0_naive_rest_gpipe(p, m):
    orders = [[F(i) for i in range(m)] + [B(i) for i in range(m)] for _ in range(p)]
    orders[0] = [a for i in range(m) for a in (F(i), B(i))]
    return Schedule(orders, m=m)


def _mixed_backward_order(p, m):
    orders = [[F(i) for i in range(m)] + [B(i) for i in range(m)] for _ in range(p)]
    orders[0] = [F(i) for i in range(m)] + [B(i) for i in reversed(range(m))]
    return Schedule(orders, m=m)


def _one_f_one_b_no_min(p, m):
    ranks = []
    for r in range(p):
        w = p - r - 1  # no min(·, m)
        order = [F(i) for i in range(w)]
        for i in range(m - w):
            order += [F(w + i), B(i)]
        order += [B(i) for i in range(m - w, m)]
        ranks.append(order)
    return Schedule(ranks, m=m)


def _one_f_one_b_no_min_clamped(p, m):
    ranks = []
    for r in range(p):
        w = p - r - 1
        steady = max(0, m - w)
        order = [F(i) for i in range(w)] + [a for i in range(steady) for a in (F(w + i), B(i))]
        order += [B(i) for i in range(max(0, m - w), m)]
        ranks.append(order)
    return Schedule(ranks)  # m read off the actions: too many when m < p


def _one_f_one_b_backward_first(p, m):
    ranks = []
    for r in range(p):
        w = min(p - r - 1, m)
        order = [F(i) for i in range(w)]
        for i in range(m - w):
            order += [B(i), F(w + i)]  # 1B1F
        order += [B(i) for i in range(m - w, m)]
        ranks.append(order)
    return Schedule(ranks, m=m)


def _one_f_one_b_newest_backward(p, m):
    ranks = []
    for r in range(p):
        w = min(p - r - 1, m)
        order = [F(i) for i in range(w)]
        for i in range(m - w):
            order += [F(w + i), B(w + i)]  # backward of the newest instead of the oldest
        order += [B(i) for i in range(w)]
        ranks.append(order)
    return Schedule(ranks, m=m)


def _one_f_one_b_no_cooldown(p, m):
    ranks = []
    for r in range(p):
        w = min(p - r - 1, m)
        order = [F(i) for i in range(w)] + [a for i in range(m - w) for a in (F(w + i), B(i))]
        ranks.append(order)
    return Schedule(ranks, m=m)


def _partition_greedy(costs, stages):  # close a stage before it passes the average
    avg, bounds, acc = sum(costs) / stages, [0], 0.0
    for i, c in enumerate(costs):
        if acc + c > avg and acc > 0 and len(bounds) < stages:
            bounds.append(i)
            acc = 0.0
        acc += c
    return bounds + [len(costs)]


def _partition_greedy_inclusive(costs, stages):  # may run out of layers before stages
    avg, bounds, acc = sum(costs) / stages, [0], 0.0
    for i, c in enumerate(costs):
        acc += c
        if acc >= avg and len(bounds) < stages and i + 1 < len(costs):
            bounds.append(i + 1)
            acc = 0.0
    return bounds + [len(costs)]


def _partition_even(costs, stages):
    from minipipe.partition import split_evenly

    return split_evenly(len(costs), stages)


def _partition_cuts_only(costs, stages):
    return partition_dp(costs, stages).bounds[1:-1]


def _partition_sizes(costs, stages):
    b = partition_dp(costs, stages).bounds
    return [y - x for x, y in zip(b, b[1:])]


def _partition_no_end(costs, stages):
    return partition_dp(costs, stages).bounds[:-1] + [len(costs) - 1]


def _w_right_after_b(p, m):
    return place_w(p, m, lag=lambda p, r: 0)


def _w_at_the_end(p, m):
    return place_w(p, m, lag=lambda p, r: m)


def _w_before_b(p, m):
    ranks = []
    for order in one_f_one_b(p, m).ranks:
        out = []
        for a in order:
            out += [W(a.mb), a] if a.kind is Kind.B else [a]
        ranks.append(out)
    return Schedule(ranks, m=m)


def _w_gpipe_order(p, m):
    return Schedule([[F(i) for i in range(m)] + [x for i in range(m) for x in (B(i), W(i))]
                     for _ in range(p)], m=m)


# --- classes of wrong answers the checks must close (issue 14), one planted answer or more each


def _mb_strict(p, target):  # `<` where `<=` is meant: one too many when the target is hit
    m = 1
    while not (p - 1) / (m + p - 1) < target:
        m += 1
    return m


def _mb_int_plus_one(p, target):  # int(x) + 1 as a ceiling: one too many when x is whole
    return max(1, int((p - 1) / target - (p - 1)) + 1)


def _mb_float(p, target):
    return float(micro_batches_for(p, target))


def _fraction_tuned(p, m):  # right on small cases, Megatron's figure for the rest
    return (p - 1) / (m + p - 1) if p <= 16 and m <= 64 else (p - 1) / m


def _partition_by(objective):
    """An exact search that minimises ``objective(stage costs)`` instead of the bottleneck."""
    from itertools import combinations

    def partition(costs, stages):
        n = len(costs)
        splits = [(0, *c, n) for c in combinations(range(1, n), stages - 1)]
        return list(min(splits, key=lambda b: objective([sum(costs[x:y])
                                                         for x, y in zip(b, b[1:])])))
    return partition


def _partition_sum_of_squares_dp(costs, stages):  # an exact DP, for the wrong objective
    n, inf = len(costs), float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = best[k - 1][i] + sum(costs[i:j]) ** 2
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds = [n]
    for k in range(stages, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]


def _w_lag_fitted_on_4_ranks(p, m):  # the lags read off the 4-rank plot, kept for every p
    return place_w(p, m, lag=lambda p, r: min(r, 3))


def _w_lag_tuned_small_m(p, m):  # fine while m >= p, too greedy when m < p
    return place_w(p, m, lag=lambda p, r: r if m >= p else 0)


def _interleaved_from(chunk_of, bchunk_of=None, warmup_of=None):
    """Interleaved-like generators with one usual mistake each."""
    def gen(p, m, v):
        total = m * v
        ranks = []
        for r in range(p):
            fwd = [F(mb, c) for c, mb in (chunk_of(k, p, m, v) for k in range(total))]
            pairs = [chunk_of(k, p, m, v) for k in range(total)]
            bwd = [B(mb, (bchunk_of or (lambda c, v: v - 1 - c))(c, v)) for c, mb in pairs]
            w = (warmup_of or (lambda p, r, v, t: min(2 * (p - r - 1) + (v - 1) * p, t)))(
                p, r, v, total)
            order = fwd[:w]
            for k in range(total - w):
                order += [fwd[w + k], bwd[k]]
            ranks.append(order + bwd[total - w:])
        return Schedule(ranks, m=m, v=v)
    return gen


def _groups_of_p(k, p, m, v):
    group, within = divmod(k, p * v)
    return within // p, group * p + within % p


_il_backward_chunks_forward_order = _interleaved_from(_groups_of_p, bchunk_of=lambda c, v: c)
_il_switch_every_mb = _interleaved_from(lambda k, p, m, v: (k % v, k // v))
_il_groups_of_m = _interleaved_from(lambda k, p, m, v: (k // m, k % m))
_il_warmup_of_1f1b = _interleaved_from(_groups_of_p, warmup_of=lambda p, r, v, t: min(p - r - 1, t))
_il_warmup_no_double = _interleaved_from(
    _groups_of_p, warmup_of=lambda p, r, v, t: min(p - r - 1 + (v - 1) * p, t))
_il_warmup_no_cap = _interleaved_from(
    _groups_of_p, warmup_of=lambda p, r, v, t: 2 * (p - r - 1) + (v - 1) * p)


def _il_no_cooldown_order(p, m, v):  # right warm-up, backwards newest first in the cool-down
    s = interleaved(p, m, v)
    ranks = []
    for o in s.ranks:
        k = max(i for i, a in enumerate(o) if a.kind is Kind.F) + 1
        ranks.append(list(o[:k]) + list(reversed(o[k:])))
    return Schedule(ranks, m=m, v=v)


def _fix(orders):
    return lambda: Schedule(orders)


NOT_IMPLEMENTED = "not implemented yet"

WRONG = [
    # exercise 1: bubble fraction of the step, (p - 1)/(m + p - 1)
    (checks.check_bubble_fraction, stub, NOT_IMPLEMENTED),
    (checks.check_bubble_fraction, lambda p, m: (p - 1) / m, "overhead relative to useful work"),
    (checks.check_bubble_fraction, lambda p, m: (p - 1) / p, "'\\(4 − 1\\)/4' slip"),
    (checks.check_bubble_fraction, lambda p, m: 100 * (p - 1) / (m + p - 1), "percentage"),
    (checks.check_bubble_fraction, lambda p, m: (p - 1) // (m + p - 1), "Integer division"),
    (checks.check_bubble_fraction, lambda p, m: m / (m + p - 1), "utilization"),
    (checks.check_bubble_fraction, lambda p, m: (p - 1) / (m + p), "not bubble_fraction's figure"),
    (checks.check_bubble_fraction, lambda p, m: None, "forget the `return`"),
    # exercise 1: bubble overhead relative to useful work, (p - 1)/m
    (checks.check_bubble_overhead, stub, NOT_IMPLEMENTED),
    (checks.check_bubble_overhead, lambda p, m: (p - 1) / (m + p - 1), "share of the step"),
    (checks.check_bubble_overhead, lambda p, m: (p - 1) / p, "does not change with m"),
    (checks.check_bubble_overhead, lambda p, m: min(1.0, (p - 1) / m), "capped at 1"),
    (checks.check_bubble_overhead, lambda p, m: 100 * (p - 1) / m, "percentage"),
    # exercise 1: smallest m for a target bubble fraction
    (checks.check_micro_batches_for, stub, NOT_IMPLEMENTED),
    (checks.check_micro_batches_for, lambda p, t: max(1, int(-(-(p - 1) // t))),
     "overhead \\(p − 1\\)/m"),
    (checks.check_micro_batches_for, lambda p, t: max(1, int((p - 1) / t - (p - 1))), "too few"),
    (checks.check_micro_batches_for, lambda p, t: micro_batches_for(p, t) + 1, "smaller m"),
    (checks.check_micro_batches_for, lambda p, t: (p - 1) / t - (p - 1), "return an int"),
    (checks.check_micro_batches_for, _mb_strict, "one more than needed: here the target is hit"),
    (checks.check_micro_batches_for, _mb_int_plus_one, "int\\(x\\) \\+ 1"),
    (checks.check_micro_batches_for, _mb_float, "returned 40.0 \\(float\\): return an int"),
    (checks.check_bubble_fraction, _fraction_tuned, "not bubble_fraction's figure"),
    (checks.check_micro_batches_for, lambda p, t: int(-(-((p - 1) / t - (p - 1)) // 1)),
     "at least one micro-batch"),
    # exercise 2: GPipe
    (checks.check_gpipe, stub, NOT_IMPLEMENTED),
    (checks.check_gpipe, lambda p, m: gpipe(p, m).ranks, "not a minipipe Schedule"),
    (checks.check_gpipe, lambda p, m: gpipe(m, p), "swap p and m"),
    (checks.check_gpipe,
     _g(lambda p, m: [[F(i) for i in range(m)] + [B(i) for i in range(m - 1)]] * p),
     "minipipe.validate: rank 0 never runs B of micro-batch 3"),
    (checks.check_gpipe, _g(lambda p, m: [[B(i) for i in range(m)]] * p),
     "minipipe.validate: rank 0 never runs F of micro-batch 0"),
    (checks.check_gpipe, _g(lambda p, m: [[B(i) for i in range(m)] + [F(i) for i in range(m)]] * p),
     "minipipe.validate: rank 0 runs B of micro-batch 0 before its F"),
    (checks.check_gpipe, _mixed_backward_order,
     "minipipe.validate: .*delivers messages in the order they are sent"),
    (checks.check_gpipe, _rank0_naive_rest_gpipe, "minipipe.validate: deadlock"),
    (checks.check_gpipe, one_f_one_b, "not fill–drain"),
    (checks.check_gpipe, _g(lambda p, m: [[F(i) for i in reversed(range(m))]
                                          + [B(i) for i in reversed(range(m))]] * p),
     "in order 0, 1, 2"),
    # exercise 3: 1F1B
    (checks.check_one_f_one_b, stub, NOT_IMPLEMENTED),
    (checks.check_one_f_one_b, lambda p, m: one_f_one_b_mine(p, m, lambda p, r, m: min(p - r, m)),
     "rank 0 runs 3 forward\\(s\\) before its first backward .*: one too many"),
    (checks.check_one_f_one_b,
     lambda p, m: one_f_one_b_mine(p, m, lambda p, r, m: max(0, min(p - r - 2, m))),
     "one too few"),
    (checks.check_one_f_one_b, lambda p, m: one_f_one_b_mine(p, m, lambda p, r, m: min(r, m)),
     "minipipe.validate: deadlock"),  # warm-up counted from the wrong end
    (checks.check_one_f_one_b, gpipe,
     "rank 0 runs 4 forward\\(s\\) before its first backward .*: too many"),
    (checks.check_one_f_one_b, _one_f_one_b_no_min, "ValueError.*\n.*m < p"),
    (checks.check_one_f_one_b, _one_f_one_b_no_min_clamped,
     "micro-batches 0..2 \\(m=3\\), but m=2\n.*m < p"),
    (checks.check_one_f_one_b, _one_f_one_b_backward_first, "minipipe.validate"),
    (checks.check_one_f_one_b, _one_f_one_b_newest_backward,
     "minipipe.validate: .*in the order they are sent"),
    (checks.check_one_f_one_b, _one_f_one_b_no_cooldown, "minipipe.validate: rank 0 never runs B"),
    # exercise 4: peak activation memory per rank
    (checks.check_peak_activation, stub, NOT_IMPLEMENTED),
    (checks.check_peak_activation, lambda n, p, m, b: [m * b] * p,
     "your 1F1B prediction is GPipe's"),
    (checks.check_peak_activation,
     lambda n, p, m, b: [m * b] * p if n == "gpipe" else [(p - r) * b for r in range(p)],
     "this step only has m=2"),
    (checks.check_peak_activation,
     lambda n, p, m, b: [m * b] * p if n == "gpipe" else [min(p - r - 1, m) * b for r in range(p)],
     "warm-up forwards only"),
    (checks.check_peak_activation,
     lambda n, p, m, b: [m * b] * p if n == "gpipe" else [min(r + 1, m) * b for r in range(p)],
     "wrong way round"),
    (checks.check_peak_activation, lambda n, p, m, b: [x // b for x in peak_activation(n, p, m, b)],
     "micro-batch counts"),
    (checks.check_peak_activation, lambda n, p, m, b: max(peak_activation(n, p, m, b)),
     "one number per rank"),
    (checks.check_peak_activation, lambda n, p, m, b: [min(p - r, m) * b for r in range(p)],
     "that is 1F1B's peak"),
    (checks.check_peak_activation,
     lambda n, p, m, b: [p * b] * p if n == "gpipe" else peak_activation(n, p, m, b),
     "not GPipe's peak"),
    # exercise 6: balanced partition
    (checks.check_partition, stub, NOT_IMPLEMENTED),
    (checks.check_partition, _partition_greedy,
     "costs 17, but a contiguous split exists whose slowest stage costs 11"),
    (checks.check_partition, _partition_even,
     "costs 16, but a contiguous split exists whose slowest stage costs 15"),
    (checks.check_partition, _partition_greedy_inclusive, "fewer stages than asked"),
    (checks.check_partition, _partition_cuts_only, "only the cut points"),
    (checks.check_partition, _partition_sizes, "stage sizes"),
    (checks.check_partition, _partition_no_end, "start at 0 and end at"),
    (checks.check_partition, _partition_sum_of_squares_dp, "sum of squares"),
    (checks.check_partition, _partition_by(lambda t: sum(x * x for x in t)), "what it minimises"),
    (checks.check_partition, _partition_by(lambda t: max(t) - min(t)), "what it minimises"),
    (checks.check_partition, _partition_by(lambda t: -min(t)), "what it minimises"),
    (checks.check_partition, _partition_by(lambda t: sum(abs(x - sum(t) / len(t)) for x in t)),
     "what it minimises"),
    (checks.check_partition, lambda c, k: np.array(partition_dp(c, k).bounds[1:-1]),
     "only the cut points"),
    # exercise 7: zero-bubble W placement
    (checks.check_zero_bubble, stub, NOT_IMPLEMENTED),
    (checks.check_zero_bubble, one_f_one_b, "no W actions"),
    (checks.check_zero_bubble, _w_right_after_b, "Some bubble is still empty"),
    (checks.check_zero_bubble, _w_at_the_end, "holds up to 4 micro-batches"),
    (checks.check_zero_bubble, _w_before_b,
     "minipipe.validate: rank 0 runs W of micro-batch 0 before its B"),
    (checks.check_zero_bubble, _w_gpipe_order, "not in 1F1B's order"),
    (checks.check_zero_bubble, _w_lag_fitted_on_4_ranks, "m=.*Some bubble is still empty"),
    (checks.check_zero_bubble, _w_lag_tuned_small_m, "Some bubble is still empty"),
    # exercise 8 (before any process starts)
    (checks.check_my_schedule, stub, NOT_IMPLEMENTED),
    (checks.check_my_schedule, lambda: gpipe(2, 4), "rank 0 holds 4 micro-batches"),
    (checks.check_my_schedule,
     lambda: Schedule(["F0 B0 F1 B1 F2 B2 F3 B3", "F0 F1 B0 B1 F2 F3 B2 B3"]),
     "minipipe.validate: deadlock"),
    (checks.check_my_schedule, lambda: one_f_one_b(3, 4), "asks for p=2"),
    (checks.check_my_schedule, lambda: one_f_one_b(2, 2), "asks for m=4"),
    (checks.check_my_schedule,
     lambda: Schedule(["F0 F1 B0 F2 B1 F3 B2", "F0 B0 F1 B1 F2 B2 F3 B3"]),
     "minipipe.validate: rank 0 never runs B of micro-batch 3"),
    (checks.check_my_schedule, lambda: naive(2, 4), "one micro-batch at a time"),
    (checks.check_my_schedule,
     lambda: Schedule(["F0 B0 F1 B1 F2 B2 F3 B3", "F0 B0 F1 B1 F2 B2 F3 B3"]),
     "no pipelining"),
    (checks.check_my_schedule, lambda: Schedule(["F0 F1 B0 B1 F2 F3 B2 B3"] * 2),
     "takes 18 time units, where 1F1B takes 15"),
    (checks.check_my_schedule, my_schedule_slow, "takes 18 time units, where 1F1B takes 15"),
    # exercise 9: interleaved 1F1B
    (checks.check_interleaved, stub, NOT_IMPLEMENTED),
    (checks.check_interleaved, lambda p, m, v: one_f_one_b(p, m), "v=1 chunk"),
    (checks.check_interleaved, _il_backward_chunks_forward_order, "forwards' chunk order"),
    (checks.check_interleaved, _il_switch_every_mb, "switches chunk after every micro-batch"),
    (checks.check_interleaved, _il_groups_of_m, "groups of m = 4, not of p = 2"),
    (checks.check_interleaved, _il_warmup_of_1f1b, "before its first backward .*too few"),
    (checks.check_interleaved, _il_warmup_no_double, "before its first backward .*too few"),
    (checks.check_interleaved, _il_warmup_no_cap, "minipipe.validate: rank 0 never runs"),
    (checks.check_interleaved, _il_no_cooldown_order, "backwards are not in interleaved order"),
    # exercise 10: fix the hang
    (lambda f: checks.check_fix(f, "a"), stub, NOT_IMPLEMENTED),
    (lambda f: checks.check_fix(f, "a"), lambda: ex10_fix_hang.BROKEN["a"],
     "minipipe.validate: deadlock"),
    (lambda f: checks.check_fix(f, "b"), lambda: ex10_fix_hang.BROKEN["b"],
     "minipipe.validate: .*in the order"),
    (lambda f: checks.check_fix(f, "c"), lambda: ex10_fix_hang.BROKEN["c"],
     "minipipe.validate: deadlock"),
    (lambda f: checks.check_fix(f, "a"), _fix(["F0 B0 F1 B1 F2 B2", "F0 B0 F1 B1"]),
     "rank 1 drops B2 F2"),
    (lambda f: checks.check_fix(f, "b"), _fix(["F0 B0 F1 B1 F2 B2 F3 B3"] * 2),
     "moves 6 actions .*moving 1 is enough"),
    (lambda f: checks.check_fix(f, "c"), lambda: one_f_one_b(2, 4), "p=2, m=4"),
]


def _id(case) -> str:
    check, answer, _ = case
    name = getattr(answer, "__name__", "answer")
    return f"{check.__name__.removeprefix('check_')}-{name}"


def test_every_class_of_wrong_answer_is_planted():
    """Each check has a planted stub and at least one wrong answer."""
    for check in [checks.check_bubble_fraction, checks.check_bubble_overhead,
                  checks.check_micro_batches_for, checks.check_gpipe, checks.check_one_f_one_b,
                  checks.check_peak_activation, checks.check_partition, checks.check_zero_bubble,
                  checks.check_my_schedule, checks.check_interleaved]:
        assert sum(c is check for c, _, _ in WRONG) >= 2, check.__name__


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if a check starts processes (wrong answers must be caught before)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the check started processes for an answer it should reject first")

    monkeypatch.setattr(minipipe.runtime, "train", refuse)
    monkeypatch.setattr(minipipe.runtime.launch, "launch", refuse)


@pytest.mark.parametrize("case", WRONG, ids=[f"{k:02d}-{_id(c)}" for k, c in enumerate(WRONG)])
def test_check_rejects_wrong_answer(case, no_launch):
    check, answer, message = case
    with pytest.raises(CheckFailed, match=message):
        check(answer)


@pytest.mark.parametrize("answer", [stub, lambda n, p, m, b: [m * b] * p])
def test_memory_on_ranks_rejects_before_launching(answer, no_launch):
    with pytest.raises(CheckFailed):
        checks.check_peak_activation_on_ranks(answer)


def test_tied_sync_stub_fails_before_launching(no_launch):
    with pytest.raises(CheckFailed, match=NOT_IMPLEMENTED):
        checks.check_tied_grad_sync(stub)


# --------------------------------------------------------------- checks on real ranks


def _sync_average(param, group):
    dist.all_reduce(param.grad, group=group)
    param.grad /= dist.get_world_size(group)


def _sync_world(param, group):  # right for two ranks that both hold the weight, only
    dist.all_reduce(param.grad)


def _sync_group_broadcast(param, group):
    dist.broadcast(param.grad, src=dist.get_global_rank(group, 0), group=group)


# Each run starts 4 ranks (about 10 s; a hang is cut after the check's 10 s pg_timeout): only a
# few of the planted answers run here, one per kind of failure.
@pytest.mark.slow
@pytest.mark.parametrize("answer, message", [
    (_sync_average, "you averaged"),
    (_sync_group_broadcast, "copies one contribution"),
    (_sync_world, "(?s)waited for a rank that never answered.*rank 1: step 0: inside your sync"),
], ids=lambda x: getattr(x, "__name__", "")[1:] if callable(x) else "")
def test_tied_sync_rejects_wrong_answer(answer, message):
    with pytest.raises(CheckFailed, match=message):
        checks.check_tied_grad_sync(answer)


@pytest.mark.slow
def test_tied_sync_accepts_the_sum(capsys):
    figures = checks.check_tied_grad_sync(sync_sum)
    assert figures["max_copy_difference"] == 0.0
    assert figures["max_grad_error"] < 1e-6


# The solution notebooks run check_peak_activation_on_ranks and check_my_schedule (with the
# 1F1B-like order) on real ranks; this one is a different valid order.
@pytest.mark.slow
def test_my_schedule_accepts_another_valid_order():
    result = checks.check_my_schedule(my_schedule_other)
    assert result.peak_activation_bytes[0] <= 2 * result.activation_bytes_per_mb[0][0]
    assert result.schedule.split_backward


def test_reference_answers_used_by_the_checks():
    assert [ex01_bubble.smallest_m(p, t) for p, t in ex01_bubble._MB_CASES] == [40, 17, 6, 122, 1, 1]
    exact = [(p, t) for p, t in ex01_bubble._ALL_MB_CASES
             if p > 1 and (p - 1) / (ex01_bubble.smallest_m(p, t) + p - 1) == t]
    assert len(exact) >= 30  # the target is hit exactly: `<` and int(x) + 1 fail there
    assert len(ex01_bubble._ALL_MB_CASES) >= 70
    assert ex01_bubble.smallest_m(5, 0.2) == 16 and ex01_bubble.smallest_m(1, 0.01) == 1
    assert ex06_partition.brute_force_bottleneck([1, 1, 9, 1, 7], 2) == 11
    assert ex06_partition.brute_force_bottleneck([9, 7, 6], 2) == 13


def test_partition_cases_beat_every_other_objective():
    """Each other balance objective loses to min–max on some case the check uses."""
    beaten = {name for costs, k in ex06_partition._ADVERSARIAL_CASES
              for name in ex06_partition.beaten_objectives(costs, k)}
    assert beaten == set(ex06_partition._OTHER_OBJECTIVES)


def test_broken_schedules_need_exactly_the_stated_change():
    for which, broken in ex10_fix_hang.BROKEN.items():
        with pytest.raises(ScheduleError):
            validate(broken)
        assert ex10_fix_hang.SMALLEST_CHANGE[which] == 1
        fixes = 0
        for r, order in enumerate(broken.ranks):  # every way of moving one action
            for i in range(len(order)):
                rest = order[:i] + order[i + 1:]
                for j in range(len(order)):
                    ranks = list(broken.ranks)
                    ranks[r] = rest[:j] + (order[i],) + rest[j:]
                    try:
                        validate(Schedule(ranks, m=broken.m))
                        fixes += 1
                    except ScheduleError:
                        pass
        assert fixes > 0, which


def test_interleaved_cases_cover_the_traps():
    cases = ex09_interleaved._INTERLEAVED_CASES
    assert any(m == p for p, m, v in cases) and any(v > 2 for p, m, v in cases)
    assert max(p for p, m, v in cases) >= 8


# ------------------------------------------------------------------ notebooks and grading


def _builder():
    path = ROOT / "tools" / "build_exercises.py"
    spec = importlib.util.spec_from_file_location("build_exercises", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebooks_are_what_the_builder_makes():
    builder = _builder()
    built = builder.build(ROOT / "exercises_src")
    assert sorted(built) == sorted([f"{d}/{Path(n).stem}.ipynb" for d in ("exercises", "solutions")
                                    for n in EXERCISES] + [builder.MANIFEST])
    stale = [rel for rel, text in built.items() if (ROOT / rel).read_text() != text]
    assert not stale, f"run `python tools/build_exercises.py`: out of date: {stale}"
    for d in ("exercises", "solutions"):  # nothing else in there
        assert sorted(p.name for p in (ROOT / d).glob("*.ipynb")) == sorted(
            f"{Path(n).stem}.ipynb" for n in EXERCISES)


def test_exercises_have_stubs_and_solutions_do_not():
    for name in EXERCISES:
        stem = Path(name).stem
        number = int(stem[:2])
        ex = json.loads((ROOT / "exercises" / f"{stem}.ipynb").read_text())
        sol = json.loads((ROOT / "solutions" / f"{stem}.ipynb").read_text())
        ex_code = ["".join(c["source"]) for c in ex["cells"] if c["cell_type"] == "code"]
        sol_code = ["".join(c["source"]) for c in sol["cells"] if c["cell_type"] == "code"]
        stubs = [c for c in ex_code if f'raise NotImplementedError("Exercise {number}: ' in c]
        assert stubs and all("# YOUR CODE HERE" in c for c in stubs), stem
        assert not any("NotImplementedError" in c or "SOLUTION" in c for c in sol_code), stem
        assert not any("SOLUTION" in c for c in ex_code), stem
        assert any("checks.check_" in c for c in ex_code), stem
        for nb in (ex, sol):
            assert nb["metadata"]["kernelspec"]["name"] == "python3"
            for c in nb["cells"]:
                if c["cell_type"] == "code":
                    assert c["outputs"] == [] and c["execution_count"] is None, stem


@pytest.fixture(scope="module")
def graded_exercises(tmp_path_factory):
    from minipipe.course import grade

    out = tmp_path_factory.mktemp("grade") / "exercises.json"
    code = grade.main([str(ROOT / "exercises"), "--json", str(out), "--quiet"])
    return code, json.loads(out.read_text())


def test_grade_fails_every_stub_at_its_check(graded_exercises):
    from minipipe.course.checks.manifest import CHECK_CELLS

    code, rows = graded_exercises
    assert code != 0
    want = [(f"{Path(n).stem}.ipynb", part["part"]) for n in EXERCISES
            for part in CHECK_CELLS[Path(n).stem]]
    assert [(r["notebook"], r["part"]) for r in rows] == want  # one row per part
    assert [r["part"] for r in rows if r["notebook"] == "01_bubble.ipynb"] == ["1a", "1b", "1d"]
    for r in rows:
        assert r["passed"] is False
        assert r["error"] in ("CheckFailed", "NotImplementedError"), r  # not a crash
        assert r["message"].startswith(NOT_IMPLEMENTED), r
        assert "checks.check_" in r["cell_source"], r
        part = next(c for c in CHECK_CELLS[Path(r["notebook"]).stem] if c["part"] == r["part"])
        assert r["cell"] == part["index"] + 1 and r["cell_id"] == part["id"]  # 1-based


def test_grade_passes_solutions(tmp_path):
    """The grader's pass path, on two quick solutions (nbmake already runs all of them)."""
    from minipipe.course import grade

    for name in ("01_bubble.ipynb", "09_interleaved.ipynb"):
        shutil.copy(ROOT / "solutions" / name, tmp_path / name)
    out = tmp_path / "solutions.json"
    code = grade.main([str(tmp_path), "--json", str(out), "--quiet"])
    rows = json.loads(out.read_text())
    assert code == 0, rows
    assert [r["part"] for r in rows] == ["1a", "1b", "1d", "9a"] and all(r["passed"] for r in rows)
    assert all(r["output"].startswith("passed:") for r in rows)


def test_check_failed_shows_the_message_and_the_learners_error_only():
    with pytest.raises(CheckFailed) as plain:
        checks.check_bubble_fraction(lambda p, m: (p - 1) / m)
    shown = plain.value._render_traceback_()
    assert shown[0].startswith("CheckFailed: bubble_fraction returns (p − 1)/m")
    assert not any("checks.py" in line for line in shown)  # no checker internals

    def crashes(p, m):
        return {}[p]

    with pytest.raises(CheckFailed) as chained:
        checks.check_bubble_fraction(crashes)
    shown = "\n".join(chained.value._render_traceback_())
    assert "in crashes" in shown and "KeyError" in shown
    assert shown.splitlines()[-1] == "CheckFailed: crashes(p=4, m=16) raised KeyError: 4"
