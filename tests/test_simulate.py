"""The simulator against the closed forms, the Timeline figures, traces and plots.

Costs follow ``minipipe.simulate``'s convention: ``t_b`` input gradient, ``t_w`` weight
gradient; an unsplit backward costs ``t_b + t_w``. Formulas take per-rank costs; for
interleaved each chunk costs ``t / v``.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
from fractions import Fraction

import matplotlib
import matplotlib.pyplot as plt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipipe import (Action, Event, Kind, Schedule, ScheduleError, Timeline, compare_timelines,
                      formulas, gpipe, interleaved, make_schedule, naive, one_f_one_b,
                      plot_timeline, simulate, text_timeline, validate, zb_h1)

matplotlib.use("Agg")  # no windows: figures are only drawn to memory

RATIOS = [(1, 2, 0), (2, 3, 0), (3, 1, 0), (1, 2, 1)]  # (t_f, t_b, t_w)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def run(name: str, p: int, m: int, t_f=1.0, t_b=2.0, t_w=0.0, v: int = 1, comm=0.0) -> Timeline:
    """Simulate with per-rank costs (a chunk costs t / v), as the formulas count them."""
    return simulate(make_schedule(name, p, m, v), t_f / v, t_b / v, t_w / v, comm=comm)


# ---------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b"])
@pytest.mark.parametrize("p", range(1, 9))
def test_step_time_and_bubbles_match_closed_forms(name, p):
    for m in range(1, 17):
        for t_f, t_b, t_w in RATIOS:  # the bubbles do not depend on the F:B ratio
            tl = run(name, p, m, t_f, t_b, t_w)
            want = formulas.step_time(name, p, m, t_f, t_b, t_w)
            assert tl.step_time == pytest.approx(want), (name, p, m, t_f, t_b, t_w)
            assert tl.busy_per_rank() == pytest.approx([formulas.ideal_time(m, t_f, t_b, t_w)] * p)
            if name != "naive":
                assert tl.bubble_fraction == pytest.approx(formulas.bubble_fraction(p, m))
                assert tl.bubble_overhead == pytest.approx(formulas.bubble_overhead(p, m))


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_matches_closed_forms(p, v):
    for m in range(p, 17, p):  # Megatron-LM's rule: m a multiple of p
        for t_f, t_b, t_w in RATIOS:
            tl = run("interleaved", p, m, t_f, t_b, t_w, v=v)
            assert tl.step_time == pytest.approx(
                formulas.step_time("interleaved", p, m, t_f, t_b, t_w, v=v))
            assert tl.bubble_fraction == pytest.approx(formulas.bubble_fraction(p, m, v))
            assert tl.bubble_overhead == pytest.approx(formulas.bubble_overhead(p, m, v))


@pytest.mark.parametrize("p", range(1, 9))
def test_zb_h1_matches_closed_form_with_equal_costs(p):
    for m in range(p, 17):
        tl = run("zb-h1", p, m, 1, 1, 1)
        assert tl.step_time == pytest.approx(m * 3 + (p - 1) * (1 + 1 - 1))
        assert tl.step_time == pytest.approx(formulas.step_time("zb-h1", p, m, 1, 1, 1))
        ref = run("1f1b", p, m, 1, 1, 1)  # same work, unsplit backward
        assert ref.step_time - tl.step_time == pytest.approx(2 * (p - 1))  # 3(p-1) -> (p-1)


def test_zb_h1_where_the_simple_formula_stops_holding():
    # m < p: no steady state, so the W of the last micro-batch on rank 0 cannot hide behind
    # later work; the step is 1F1B's with the B split, plus one t_w at the end.
    for p in range(2, 9):
        for m in range(1, p):
            tl = run("zb-h1", p, m, 1, 1, 1)
            simple = m * 3 + (p - 1) * (1 + 1 - 1)
            assert tl.step_time == pytest.approx((m + p - 1) * 2 + 1) != simple
            assert tl.step_time == pytest.approx(formulas.step_time("zb-h1", p, m, 1, 1, 1))
    # t_w > min(t_f, t_b): a deferred W no longer fits in the gap it was ordered into (the
    # order is built for equal costs), so the simulated step is longer than the closed form.
    for p, m in [(2, 4), (4, 8), (6, 12)]:
        assert run("zb-h1", p, m, 1, 1, 2).step_time > formulas.step_time("zb-h1", p, m, 1, 1, 2)
    # t_w <= min(t_f, t_b): exact for other ratios too.
    for t_f, t_b, t_w in [(1, 2, 0.5), (2, 1, 1), (3, 2, 1), (1, 1, 0)]:
        tl = run("zb-h1", 4, 8, t_f, t_b, t_w)
        assert tl.step_time == pytest.approx(formulas.step_time("zb-h1", 4, 8, t_f, t_b, t_w))


def test_classic_case_4_stages_16_micro_batches():
    for name in ["gpipe", "1f1b"]:
        tl = run(name, 4, 16, 1, 2)
        assert tl.step_time == 57.0  # (16 + 3)(1 + 2)
        assert Fraction(tl.bubble_fraction).limit_denominator(100) == Fraction(3, 19)
        assert Fraction(tl.bubble_overhead).limit_denominator(100) == Fraction(3, 16)
        assert tl.bubble_fraction == pytest.approx(3 / 19)  # 15.8%: idle / step time
        assert tl.bubble_overhead == pytest.approx(0.1875)  # 18.75%: idle / useful work
    assert formulas.bubble_fraction(4, 16) == pytest.approx(3 / 19)
    assert formulas.bubble_overhead(4, 16) == 3 / 16


@pytest.mark.parametrize("p", range(1, 9))
def test_naive_utilization_is_one_over_p(p):
    for t_f, t_b, _ in RATIOS:
        tl = run("naive", p, 3, t_f, t_b)
        assert 1 - tl.bubble_fraction == pytest.approx(1 / p)
        assert formulas.utilization("naive", p, 3, t_f, t_b) == pytest.approx(1 / p)


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "interleaved", "zb-h1"])
def test_memory_and_messages_match_closed_forms(name):
    for p in range(1, 9):
        for m in range(1, 17):
            for v in ([2, 3, 4] if name == "interleaved" else [1]):
                if name == "interleaved" and m % p:
                    continue
                tl = run(name, p, m, 1, 1, 1 if name == "zb-h1" else 0, v=v)
                assert tl.peak_inflight == formulas.peak_inflight(name, p, m, v), (p, m, v)
                assert tl.peak_pending_w == formulas.peak_pending_w(name, p, m, v), (p, m, v)
                assert tl.messages == formulas.messages(p, m, v), (p, m, v)


def test_interleaved_first_rank_memory_ratio():
    for p in [2, 4, 8]:
        for v in [2, 3, 4]:
            m = 4 * p  # enough micro-batches for a full warm-up
            chunks = run("interleaved", p, m, v=v).peak_inflight[0]  # each 1/v of the layers
            ratio = Fraction(chunks, v) / run("1f1b", p, m).peak_inflight[0]
            assert ratio == pytest.approx(formulas.activation_memory_ratio_interleaved(p, v))


# ---------------------------------------------------------------------------- costs and comm


def test_slowest_stage_sets_the_pace():
    p, m = 4, 8
    t_f, t_b = [1, 1, 2, 1], [2, 2, 4, 2]  # stage 2 twice as slow
    tl = simulate(gpipe(p, m), t_f, t_b)
    # flow shop: the sum over stages once, then (m - 1) times the slowest stage
    assert tl.step_time == sum(t_f) + sum(t_b) + (m - 1) * (max(t_f) + max(t_b))
    assert tl.busy(2) == m * 6 and min(range(p), key=tl.idle) == 2
    for m in [8, 32, 128]:  # 1F1B too: the step grows by the slow stage's time per micro-batch
        slow = simulate(one_f_one_b(p, m), t_f, t_b)
        assert slow.step_time >= m * (2 + 4) + 2 + 4  # reach stage 2, run it, go back
        assert slow.step_time - simulate(one_f_one_b(p, m - 1), t_f, t_b).step_time == 6


def test_per_stage_costs_index_pipeline_stages_when_interleaved():
    s = interleaved(2, 2, 2)  # stages 0, 1 on ranks 0, 1; stages 2, 3 on ranks 0, 1
    tl = simulate(s, t_f=[1, 0, 0, 0], t_b=[0, 0, 0, 0])
    assert [e.end - e.start for e in tl.events if e.action.kind is Kind.F and e.rank == 0
            and e.action.chunk == 0] == [1, 1]
    assert tl.busy(1) == 0 and tl.busy(0) == 2


def test_comm_latency_adds_to_the_step():
    for p, m in [(2, 4), (4, 8), (6, 3)]:
        base = run("gpipe", p, m).step_time
        for c in [0.1, 0.5, 2.0]:  # one hop per boundary on the way down and on the way up
            assert run("gpipe", p, m, comm=c).step_time == pytest.approx(base + 2 * (p - 1) * c)
            assert run("naive", p, m, comm=c).step_time == pytest.approx(
                m * (p * 3 + 2 * (p - 1) * c))
            one = [run("1f1b", p, m, comm=x).step_time for x in (0, c, 2 * c)]
            assert one[0] + 2 * (p - 1) * c <= one[1] + 1e-9 and one[1] < one[2]
    assert run("interleaved", 1, 4, v=3, comm=5.0).step_time == pytest.approx(12)  # no messages


def test_weight_gradient_convention():
    s, split = one_f_one_b(1, 1), zb_h1(1, 1)
    assert simulate(s, 1, 2).step_time == 3  # unsplit B = t_b (+ t_w, default 0)
    assert simulate(s, 1, 2, 1).step_time == 4  # unsplit B = t_b + t_w
    tl = simulate(split, 1, 2, 1)
    assert [(e.action.label(), e.end - e.start) for e in tl.events] == [
        ("F0", 1), ("B0", 2), ("W0", 1)]
    assert simulate(split, 1, 2).step_time == 3  # t_w=None: W costs 0


def test_simulated_events_are_ordinary_frozen_events():
    tl = simulate(interleaved(2, 4, 2))
    assert [e.rank for e in tl.events] == sorted(e.rank for e in tl.events)
    for e in tl.events[:6]:
        same = Event(e.rank, e.action, e.start, e.end)
        assert e == same and hash(e) == hash(same) and e.duration == e.end - e.start
    with pytest.raises(dataclasses.FrozenInstanceError):
        tl.events[0].start = 1.0
    assert pickle.loads(pickle.dumps(tl.events)) == tl.events
    assert "events" in repr(tl) and len(repr(tl)) < 200  # no dump of every event


def test_bad_costs_are_rejected():
    with pytest.raises(ValueError, match="one per pipeline stage"):
        simulate(gpipe(4, 4), t_f=[1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        simulate(gpipe(2, 2), t_b=-1)
    with pytest.raises(ValueError, match="comm"):
        simulate(gpipe(2, 2), comm=-1)
    with pytest.raises(TypeError):
        simulate(["F0 B0"])


# ---------------------------------------------------------------------------- timing rules


def check_as_early_as_possible(tl: Timeline, comm: float) -> None:
    """Each action starts after all it needs, and exactly when the last of those is ready."""
    s = tl.schedule
    end = {(e.action.kind, s.stage(e.rank, e.action.chunk), e.action.mb): e.end for e in tl.events}
    last = s.num_stages - 1
    for r in range(s.p):
        free = 0.0
        for e in tl.rank_events(r):
            a, st_ = e.action, s.stage(r, e.action.chunk)
            ready = [free]
            if a.kind is Kind.F and st_ > 0:
                ready.append(end[Kind.F, st_ - 1, a.mb] + (comm if (st_ - 1) % s.p != r else 0))
            if a.kind is Kind.B:
                ready.append(end[Kind.F, st_, a.mb])
                if st_ < last:
                    ready.append(end[Kind.B, st_ + 1, a.mb] + (comm if (st_ + 1) % s.p != r else 0))
            if a.kind is Kind.W:
                ready.append(end[Kind.B, st_, a.mb])
            assert e.start == pytest.approx(max(ready)), (r, a)
            free = e.end


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["naive", "gpipe", "1f1b", "interleaved", "zb-h1"]),
       p=st.integers(1, 5), k=st.integers(1, 3), v=st.integers(2, 3),
       comm=st.sampled_from([0.0, 0.25, 1.0]), data=st.data())
def test_every_action_starts_as_early_as_its_inputs_allow(name, p, k, v, comm, data):
    v = v if name == "interleaved" else 1
    s = make_schedule(name, p, k * p, v)
    costs = st.lists(st.sampled_from([0.5, 1.0, 1.5, 3.0]), min_size=p * v, max_size=p * v)
    tl = simulate(s, data.draw(costs), data.draw(costs), data.draw(costs), comm=comm)
    assert len(tl.events) == sum(len(o) for o in s.ranks) and tl.start == 0
    check_as_early_as_possible(tl, comm)


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1"]), p=st.integers(1, 4),
       data=st.data())
def test_simulate_rejects_exactly_what_validate_rejects(name, p, data):
    """Swap two actions of one rank: both checks agree, with the same message."""
    s = make_schedule(name, p, 2 * p, 2 if name == "interleaved" else 1)
    r = data.draw(st.integers(0, p - 1))
    order = list(s.ranks[r])
    i, j = data.draw(st.integers(0, len(order) - 1)), data.draw(st.integers(0, len(order) - 1))
    order[i], order[j] = order[j], order[i]
    bad = Schedule([order if q == r else o for q, o in enumerate(s.ranks)], m=s.m, v=s.v)
    try:
        validate(bad)
    except ScheduleError as err:
        with pytest.raises(ScheduleError) as got:
            simulate(bad)
        assert str(got.value) == str(err)
    else:
        simulate(bad)


@pytest.mark.parametrize("orders,m,words", [
    (["F0 F1 B0 B1", "F0 B0 F1"], 2, "never runs"),
    (["F0 F1 B0 B1", "F0 B0 F1 B1 B1"], 2, "twice"),
    (["F0 F1 B0 B1", "B0 F0 F1 B1"], 2, "before its F"),
    (["F0 B0 F1 B1", "F0 F1 B0 B1"], 2, "deadlock"),
    (["F0 F1 B0 B1", "F1 F0 B0 B1"], 2, "order"),
    (["F0 F1 B0 B1 F2 B2", "F0 B0 F1 B1 F2 B2"], 2, "micro-batches 0..1"),
    (["1F0 0F0 1B0 0B0"], 1, "before F of micro-batch 0, which it needs"),  # p=1, v=2
    (["0F0 1F0 1B0 0B0", "0F0 0B0 1F0 1B0"], 1,  # separate channels: a deadlock, not a mismatch
     r"rank 0 waits at 1B0 for the gradient of micro-batch 0 \(stage 3\) from rank 1"),
    (["0F0 0F1 1F0 1F1 1B0 1B1 0B0 0B1", "0F1 0F0 1F0 1F1 1B0 1B1 0B0 0B1"], 2,
     r"activation of micro-batch 0 \(stage 1\) from rank 1, but rank 1 sends the activation of "
     r"micro-batch 1 \(stage 1\) on that channel first"),
])
def test_simulate_raises_the_validator_error(orders, m, words):
    with pytest.raises(ScheduleError, match=words):
        simulate(Schedule(orders, m=m))


# ---------------------------------------------------------------------------- Timeline


def hand_made(source: str = "measured") -> Timeline:
    """Two ranks, two micro-batches, times from a stopwatch (starting at 10, any order)."""
    s = Schedule(["F0 F1 B0 B1", "F0 B0 F1 B1"], name="1f1b")
    events = [
        Event(1, Action(Kind.B, 1), 16.0, 18.0), Event(0, Action(Kind.F, 0), 10.0, 11.0),
        Event(0, Action(Kind.F, 1), 11.0, 12.0), Event(1, Action(Kind.F, 0), 11.0, 12.0),
        Event(1, Action(Kind.B, 0), 12.0, 14.0), Event(1, Action(Kind.F, 1), 14.0, 15.0),
        Event(0, Action(Kind.B, 0), 14.0, 16.0), Event(0, Action(Kind.B, 1), 18.0, 20.0),
    ]
    return Timeline(s, events, source=source)


def test_timeline_figures_from_hand_made_events():
    tl = hand_made()
    assert (tl.p, tl.start, tl.step_time) == (2, 10.0, 10.0)
    assert tl.busy_per_rank() == [6.0, 6.0] and tl.busy(1) == 6.0
    assert tl.idle(0) == 4.0 and tl.idle_per_rank() == [4.0, 4.0]
    assert tl.bubble_fraction == pytest.approx(8 / 20)
    assert tl.bubble_fraction_per_rank == pytest.approx([0.4, 0.4])
    assert tl.bubble_overhead == pytest.approx(8 / 12)
    assert tl.bubble_overhead_per_rank == pytest.approx([4 / 6, 4 / 6])
    assert tl.peak_inflight == [2, 1] and tl.peak_pending_w == [2, 1]
    assert tl.messages == 4
    summary = tl.summary()
    assert summary["source"] == "measured" and summary["step_time"] == 10.0
    assert set(summary) >= {"schedule", "p", "m", "v", "step_time", "bubble_fraction",
                            "bubble_overhead", "peak_inflight", "peak_pending_w", "messages"}
    json.dumps(summary)
    text = str(tl)
    assert text.splitlines()[0].startswith("1f1b p=2 m=2 v=1 (measured): step 10")
    assert "40.0% of step" in text and "66.7% of work" in text


def test_peak_pending_w_counts_until_the_weight_gradient():
    s = Schedule(["F0 F1 B0 B1 W0 W1"])
    tl = simulate(s, 1, 1, 1)
    assert tl.peak_inflight == [2] and tl.peak_pending_w == [2]
    tl = simulate(Schedule(["F0 B0 F1 B1 W0 W1"]), 1, 1, 1)
    assert tl.peak_inflight == [1] and tl.peak_pending_w == [2]


def test_empty_timeline_has_zero_figures():
    tl = Timeline(gpipe(2, 1), [])
    assert (tl.step_time, tl.bubble_fraction, tl.bubble_overhead) == (0.0, 0.0, 0.0)
    assert text_timeline(tl, width=5).splitlines() == ["0 |.....|", "1 |.....|"]


def test_chrome_trace_shape():
    tl = hand_made()
    trace = tl.to_chrome_trace()
    assert len(trace) == len(tl.events)
    first = min(trace, key=lambda e: e["ts"])
    assert first == {"name": "F0", "cat": "F", "ph": "X", "ts": 0.0, "dur": 1e6, "pid": 0,
                     "tid": 0, "args": {"mb": 0, "chunk": 0, "stage": 0}}
    assert {e["tid"] for e in trace} == {0, 1}
    assert json.loads(json.dumps({"traceEvents": trace}))["traceEvents"] == trace
    chunked = simulate(interleaved(2, 2, 2)).to_chrome_trace(scale=1.0)
    assert {e["name"] for e in chunked} >= {"0F0", "1F0", "1B1"}
    assert max(e["ts"] + e["dur"] for e in chunked) == simulate(interleaved(2, 2, 2)).step_time


# ---------------------------------------------------------------------------- drawing


def bars(ax) -> int:
    return sum(len(c.get_paths()) for c in ax.collections if c.get_label() in ("F", "B", "W"))


@pytest.mark.parametrize("s", [one_f_one_b(4, 8), zb_h1(3, 6), interleaved(2, 4, 2), naive(3, 2)],
                         ids=lambda s: s.name)
def test_plot_timeline_draws_one_bar_per_action(s):
    tl = simulate(s, 1, 1, 1)
    ax = plot_timeline(tl)
    assert bars(ax) == len(tl.events)
    idle = [c for c in ax.collections if c.get_label() == "idle"]
    assert len(idle) == 1 and len(idle[0].get_paths()) == s.p
    assert ax.get_title(loc="left") == tl.title()
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"rank {r}" for r in range(s.p)]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # rank 0 on top


def test_plot_timeline_on_given_axes_with_title():
    _, ax = plt.subplots()
    assert plot_timeline(simulate(gpipe(2, 2)), ax=ax, title="mine", legend=False) is ax
    assert ax.get_title(loc="left") == "mine" and ax.get_legend() is None


def test_compare_timelines_stacks_two_axes():
    predicted = simulate(one_f_one_b(3, 6), 1, 2)
    fig = compare_timelines(predicted, hand_made(), titles=("predicted", "measured"))
    top, bottom = fig.axes
    assert (top.get_title(loc="left"), bottom.get_title(loc="left")) == ("predicted", "measured")
    assert bars(top) == len(predicted.events) and bars(bottom) == 8
    same = compare_timelines(predicted, simulate(one_f_one_b(3, 6), 1, 2.5))
    assert same.axes[0].get_shared_x_axes().joined(same.axes[0], same.axes[1])


def test_plot_is_fast_enough_for_a_workshop_timeline():
    import time

    tl = simulate(one_f_one_b(8, 32))
    start = time.perf_counter()
    plot_timeline(tl).figure.canvas.draw()
    assert time.perf_counter() - start < 3  # well under a second on a laptop


def test_text_timeline_one_line_per_rank():
    tl = simulate(one_f_one_b(2, 2), 1, 2)
    assert text_timeline(tl, width=27).splitlines() == [
        "0 |F0fF1f......B0bbbb...B1bbbb|",
        "1 |...F0fB0bbbbF1fB1bbbb......|",
    ]
    for s in [gpipe(8, 32), interleaved(4, 8, 2), zb_h1(5, 5)]:
        lines = text_timeline(simulate(s), width=80).splitlines()
        assert len(lines) == s.p and {len(line) for line in lines} == {80 + 4}
    assert len(str(simulate(naive(3, 1))).splitlines()) == 4  # title + one line per rank
    row = text_timeline(simulate(naive(4, 1), 1, 1), width=8).splitlines()[0]
    assert row == "0 |F......B|"  # rank 0 works 1/4 of the time


# ------------------------------------------------------- unequal stages: the pace of a schedule


@pytest.mark.parametrize("seed", range(40))
def test_gpipe_step_time_with_unequal_stages_matches_the_simulator(seed):
    rng = random.Random(seed)
    p, m = rng.randint(2, 5), rng.randint(1, 10)
    t_f = [rng.randint(1, 5) for _ in range(p)]
    t_b = [rng.randint(1, 8) for _ in range(p)]
    simulated = simulate(make_schedule("gpipe", p, m), t_f, t_b).step_time
    assert simulated == formulas.gpipe_step_time(t_f, t_b, m)
    # 1F1B: no closed form this simple, but in the steady state each extra micro-batch costs
    # at most the slowest stage's t_f + t_b, and p of them exactly p times that
    slowest = max(f + b for f, b in zip(t_f, t_b))
    times = {k: simulate(make_schedule("1f1b", p, k), t_f, t_b).step_time for k in range(p, 4 * p + 1)}
    assert all(times[k + 1] - times[k] <= slowest for k in range(p, 4 * p))
    assert times[4 * p] - times[3 * p] == p * slowest


def test_gpipe_formula_of_the_review_counterexample():
    t_f, t_b = [1, 3, 1, 1], [2, 2, 2, 6]
    assert simulate(make_schedule("gpipe", 4, 8), t_f, t_b).step_time == 81
    assert formulas.gpipe_step_time(t_f, t_b, 8) == 81
    assert sum(t_f) + sum(t_b) + 7 * max(f + b for f, b in zip(t_f, t_b)) == 67  # the old claim
