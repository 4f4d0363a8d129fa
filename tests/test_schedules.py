"""Schedules as data: every generator over a grid of sizes, and the validator's diagnoses.

No processes: these tests run in well under a second each.
"""

from __future__ import annotations

import pickle
from collections import Counter
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipipe import (Action, Kind, Schedule, ScheduleError, dry_run, gpipe, interleaved,
                      make_schedule, naive, one_f_one_b, parse_actions, validate, zb_h1)

NAMES = ["naive", "gpipe", "1f1b", "interleaved", "zb-h1"]
PS = range(1, 9)
MS = range(1, 17)


@cache
def schedules_for(name: str, p: int) -> tuple[Schedule, ...]:
    """Every schedule of the grid for one generator and ``p`` (m in 1..16, v in 2..4)."""
    out = []
    for m in MS:
        for v in ((2, 3, 4) if name == "interleaved" else (1,)):
            if name == "interleaved" and m % p:
                continue
            out.append(make_schedule(name, p, m, v))
    return tuple(out)


def case(s: Schedule) -> str:
    return f"{s.name} p={s.p} m={s.m} v={s.v}"


def kinds_of(s: Schedule) -> list[Kind]:
    return [Kind.F, Kind.B, Kind.W] if s.name == "zb-h1" else [Kind.F, Kind.B]


grid = pytest.mark.parametrize("name,p", [(n, p) for n in NAMES for p in PS])


# ---------------------------------------------------------------------------- properties


@grid
def test_every_generated_schedule_validates(name, p):
    for s in schedules_for(name, p):
        assert validate(s) is s, case(s)
        assert (s.p, s.num_stages) == (p, p * s.v)


@grid
def test_each_rank_runs_every_action_exactly_once(name, p):
    for s in schedules_for(name, p):
        expected = {Action(k, i, c) for k in kinds_of(s) for c in range(s.v) for i in range(s.m)}
        for r, order in enumerate(s.ranks):
            counts = Counter(order)
            assert set(counts) == expected, f"{case(s)} rank {r}"
            assert max(counts.values()) == 1, f"{case(s)} rank {r} repeats an action"


@grid
def test_happens_before_in_the_dry_run(name, p):
    """F(s, i) before F(s+1, i); B(s+1, i) before B(s, i); F before B before W on a stage."""
    for s in schedules_for(name, p):
        tick = {}  # (kind, stage, mb) -> tick of the dry run
        for r, ran in enumerate(dry_run(s)):
            for t, a in ran:
                tick[a.kind, s.stage(r, a.chunk), a.mb] = t
        for i in range(s.m):
            for st_ in range(s.num_stages - 1):
                assert tick[Kind.F, st_, i] < tick[Kind.F, st_ + 1, i], case(s)
                assert tick[Kind.B, st_ + 1, i] < tick[Kind.B, st_, i], case(s)
            for st_ in range(s.num_stages):
                assert tick[Kind.F, st_, i] < tick[Kind.B, st_, i], case(s)
                if s.split_backward:
                    assert tick[Kind.B, st_, i] < tick[Kind.W, st_, i], case(s)


def peak_from_order(order: tuple[Action, ...], release: Kind = Kind.B) -> int:
    """Most (chunk, micro-batch) forwarded and not yet released, walking the order."""
    held = peak = 0
    for a in order:
        if a.kind is Kind.F:
            held += 1
            peak = max(peak, held)
        elif a.kind is release:
            held -= 1
    return peak


@pytest.mark.parametrize("p", PS)
def test_1f1b_warmup_and_peak_inflight(p):
    for s in schedules_for("1f1b", p):
        for r, order in enumerate(s.ranks):
            w = min(p - r - 1, s.m)  # warm-up forwards, then F B pairs, then cool-down
            kinds = "".join(a.kind.value for a in order)
            assert kinds == "F" * w + "FB" * (s.m - w) + "B" * w, f"{case(s)} rank {r}"
            assert [a.mb for a in order if a.kind is Kind.F] == list(range(s.m))
            assert [a.mb for a in order if a.kind is Kind.B] == list(range(s.m))
            assert peak_from_order(order) == min(p - r, s.m), f"{case(s)} rank {r}"


@pytest.mark.parametrize("p", PS)
def test_gpipe_holds_every_micro_batch_and_naive_one(p):
    for m in MS:
        assert [peak_from_order(o) for o in gpipe(p, m).ranks] == [m] * p
        assert [peak_from_order(o) for o in naive(p, m).ranks] == [1] * p


@pytest.mark.parametrize("p", PS)
def test_zb_h1_keeps_1f1b_forward_backward_order_and_peak(p):
    for m in MS:
        zb, ref = zb_h1(p, m), one_f_one_b(p, m)
        for r in range(p):
            assert [a for a in zb.ranks[r] if a.kind is not Kind.W] == list(ref.ranks[r])
            assert peak_from_order(zb.ranks[r]) == min(p - r, m)
            assert peak_from_order(zb.ranks[r], Kind.W) == min(p, m)  # counting F..W


# ---------------------------------------------------------------------------- generators


@pytest.mark.parametrize("p,m", [(2, 3), (4, 6), (4, 2), (3, 16), (8, 12)])
def test_interleaved_needs_m_multiple_of_p(p, m):
    with pytest.raises(ValueError, match=rf"m={m}.*p={p}"):
        interleaved(p, m, 2)


def test_generators_reject_bad_sizes():
    for bad in [(0, 4), (4, 0), (-1, 2)]:
        with pytest.raises(ValueError, match="p >= 1"):
            gpipe(*bad)
    with pytest.raises(ValueError, match="v >= 1"):
        interleaved(2, 4, 0)


@pytest.mark.parametrize("name", NAMES)
def test_make_schedule_by_name(name):
    v = 2 if name == "interleaved" else 1
    s = make_schedule(name, 4, 8, v)
    assert (s.name, s.p, s.m, s.v) == (name, 4, 8, v)
    assert s == make_schedule(name.upper().replace("-", "_"), 4, 8, v)  # case and _ tolerated


def test_make_schedule_aliases_and_errors():
    assert make_schedule("zbh1", 2, 4) == zb_h1(2, 4)
    assert make_schedule("one_f_one_b", 2, 4) == one_f_one_b(2, 4)
    assert make_schedule("interleaved", 2, 4).v == 2  # default v for interleaved
    with pytest.raises(ValueError, match="unknown schedule 'chimera'.*1f1b"):
        make_schedule("chimera", 2, 4)
    with pytest.raises(ValueError, match="interleaved"):
        make_schedule("1f1b", 2, 4, v=2)


@pytest.mark.parametrize("s", [one_f_one_b(4, 8), interleaved(2, 4, 3), zb_h1(3, 5), naive(2, 1)],
                         ids=lambda s: f"{s.name}-p{s.p}-m{s.m}-v{s.v}")
def test_schedule_is_hashable_equal_picklable_and_round_trips_through_text(s):
    again = make_schedule(s.name, s.p, s.m, s.v)
    assert s == again and hash(s) == hash(again) and len({s, again}) == 1
    assert pickle.loads(pickle.dumps(s)) == s
    lines = str(s).splitlines()
    assert lines[0] == f"{s.name}: p={s.p} m={s.m} v={s.v}"
    parsed = [parse_actions(line.split(": ", 1)[1]) for line in lines[1:]]
    assert Schedule(parsed, m=s.m, v=s.v, name=s.name) == s
    assert eval(repr(s), {"Schedule": Schedule}) == s


def test_parse_actions_notation():
    assert parse_actions("F0, B0 1F2 W3") == (Action(Kind.F, 0), Action(Kind.B, 0),
                                              Action(Kind.F, 2, 1), Action(Kind.W, 3))
    with pytest.raises(ValueError, match="cannot read action 'X1'"):
        parse_actions("F0 X1")


# ---------------------------------------------------------------------------- planted faults


FAULTS = {  # what is wrong -> (per-rank orders, m, words the error must contain)
    "missing": (["F0 F1 B0 B1", "F0 B0 F1"], 2, "rank 1 never runs B of micro-batch 1"),
    "duplicated": (["F0 F1 B0 B1", "F0 B0 F1 B1 B1"], 2, "rank 1 runs B of micro-batch 1 twice"),
    "b-before-f": (["F0 F1 B0 B1", "B0 F0 F1 B1"], 2,
                   "rank 1 runs B of micro-batch 0 before its F"),
    "w-before-b": (["F0 B0 W0", "F0 W0 B0"], 1, "rank 1 runs W of micro-batch 0 before its B"),
    "deadlock": (["F0 B0 F1 B1", "F0 F1 B0 B1"], 2, "deadlock"),
    "message-order": (["F0 F1 B0 B1", "F1 F0 B0 B1"], 2, "in the order they are sent"),
    "out-of-range": (["F0 F1 B0 B1 F2 B2", "F0 B0 F1 B1 F2 B2"], 2, "micro-batches 0..1"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_validator_names_the_planted_fault(fault):
    orders, m, words = FAULTS[fault]
    s = Schedule(orders, m=m, name=fault)
    with pytest.raises(ScheduleError, match=words) as err:
        validate(s)
    assert err.value.schedule is s and words in err.value.reason
    if fault != "deadlock":
        assert err.value.rank is not None and err.value.action is not None
    assert "rank 0:" in str(err.value) and "rank 1:" in str(err.value)  # the orders are drawn


def test_deadlock_error_says_what_each_rank_waits_for():
    orders, m, _ = FAULTS["deadlock"]
    with pytest.raises(ScheduleError) as err:
        dry_run(Schedule(orders, m=m))
    assert "rank 0 waits at B0 for the gradient of micro-batch 0 from rank 1" in err.value.reason
    assert "rank 1 waits at F1 for the activation of micro-batch 1 from rank 0" in err.value.reason


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "zb-h1"]), p=st.integers(2, 5),
       m=st.integers(1, 6), data=st.data())
def test_dropping_any_action_is_caught(name, p, m, data):
    s = make_schedule(name, p, m)
    r = data.draw(st.integers(0, p - 1))
    k = data.draw(st.integers(0, len(s.ranks[r]) - 1))
    orders = [list(o) for o in s.ranks]
    gone = orders[r].pop(k)
    with pytest.raises(ScheduleError, match=f"rank {r} never runs {gone.describe()}"):
        validate(Schedule(orders, m=m, v=1))
