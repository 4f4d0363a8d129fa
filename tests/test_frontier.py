"""The frontier schedules: ZB-H2, ZB-V, DualPipeV as data, their closed forms, torch's orders.

Each generator is checked three ways: it validates; the simulator reproduces the closed form
in :mod:`minipipe.formulas` (on the cost grid where the docstring says it holds) and its peak
memory; and, for ZB-V and DualPipeV, each rank's order is torch 2.13's
(``ScheduleZBVZeroBubble`` / ``ScheduleDualPipeV`` expose it as ``pipeline_order``; we call
their per-rank generator ``_calculate_single_rank_operations`` on a bare instance, which
needs no process group). The real-rank tests (marked ``slow``) check sequential consistency
and observed memory on gloo. (:func:`minipipe.course.frontier.torch_orders` reads torch's
orders; lesson 11 shows the same comparison.)
"""

from __future__ import annotations

import itertools
import pickle

import pytest

from minipipe import formulas, simulate, validate
from minipipe.course.frontier import torch_orders
from minipipe.schedules import (
    Action,
    Kind,
    OverlapSchedule,
    dualpipev,
    make_schedule,
    zb_h1,
    zb_h2,
    zb_v,
)
from minipipe.schedules.base import make_placement
from minipipe.validate import ScheduleError

pytest.importorskip("torch.distributed.pipelining.schedules")


# ------------------------------------------------------------------------------- ZB-H2


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_zb_h2_validates_and_holds_its_memory(p):
    for m in range(1, 3 * p + 2):
        s = validate(zb_h2(p, m))
        tl = simulate(s, 1, 1, 1)
        assert tl.peak_inflight == formulas.peak_inflight("zb-h2", p, m)
        assert tl.peak_pending_w == formulas.peak_pending_w("zb-h2", p, m)
    assert max(simulate(zb_h2(p, 4 * p), 1, 1, 1).peak_pending_w) == 2 * p - 1  # rank 0: 2p − 1


def test_zb_h2_step_matches_closed_form_where_it_says():
    """``m(t_f + t_b + t_w) + (p − 1)t_f`` for ``m >= 2p − 1`` and ``t_b <= 2 min(t_f, t_w)``."""
    checked = 0
    for f, b, w in itertools.product([1, 2, 3], repeat=3):
        for p in (2, 3, 4, 5):
            for m in (2 * p - 1, 2 * p + 2):
                got = simulate(zb_h2(p, m), f, b, w).step_time
                want = formulas.step_time("zb-h2", p, m, f, b, w)
                if b <= 2 * min(f, w):
                    assert got == pytest.approx(want), (p, m, f, b, w)
                    checked += 1
                else:  # outside: the order built for equal costs loses time, never gains
                    assert got > want
    assert checked > 100


def test_zb_h2_beats_zb_h1_by_p_minus_1_times_tb_minus_tw():
    for p, m in [(2, 6), (4, 8), (4, 16)]:
        h1 = simulate(zb_h1(p, m), 1, 2, 1).step_time
        h2 = simulate(zb_h2(p, m), 1, 2, 1).step_time
        assert h1 - h2 == pytest.approx((p - 1) * (2 - 1))
        assert simulate(zb_h2(p, m), 1, 1, 1).step_time == simulate(zb_h1(p, m), 1, 1, 1).step_time


# ------------------------------------------------------------------------- torch orders


def _ours(order: tuple[Action, ...]) -> list[tuple[str, int, int]]:
    return [(a.kind.value, a.mb, a.chunk) for a in order]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_zb_v_is_torchs_order(p):
    """Identical, action for action. For ``m < 2p − 1`` both cut the order for ``2p − 1``
    micro-batches down to the first ``m`` (torch leaves ``None`` holes; we drop them)."""
    for m in range(1, 3 * p + 2):
        theirs, _ = torch_orders("zb-v", p, m)
        ours = zb_v(p, m)
        assert ours.placement == make_placement("v", p, 2)  # (p = 1: same as the loop)
        assert [_ours(order) for order in ours.ranks] == theirs, (p, m)


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6])
def test_dualpipev_is_torchs_order(p):
    """Identical once torch's two composite actions are written out: its FULL_BACKWARD is our
    ``B`` directly followed by ``W`` (one backward, split only on paper), and its OVERLAP_F_B
    unit is ``F`` followed by the other chunk's ``B W``, recorded in ``overlapped``."""
    for m in range(2 * p, 2 * p + 5):
        theirs, units = torch_orders("dualpipev", p, m)
        ours = dualpipev(p, m)
        assert [_ours(order) for order in ours.ranks] == theirs, (p, m)
        assert [len(k) for k in ours.overlapped] == units


# -------------------------------------------------------------------- ZB-V and DualPipeV


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_zb_v_validates_simulates_to_closed_form_and_memory(p):
    for m in range(1, 3 * p + 2):
        s = validate(zb_v(p, m))
        tl = simulate(s, 1, 1, 1)  # per chunk: t_f = t_b = t_w = 1, i.e. 2 per rank
        assert tl.peak_pending_w == formulas.peak_inflight("zb-v", p, m)
        assert tl.peak_inflight == formulas.peak_inflight("zb-v", p, m)
        if m >= 2 * p - 1:
            for t in (1, 2, 3):
                got = simulate(s, t, t, t).step_time
                assert got == pytest.approx(formulas.step_time("zb-v", p, m, 2 * t, 2 * t, 2 * t))
            # 1F1B's peak: 2p half-stashes = p micro-batches of the rank's layers, every rank
            assert tl.peak_pending_w == [2 * p] * p


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_dualpipev_validates_simulates_to_closed_form_and_memory(p):
    for m in (2 * p, 2 * p + 1, 3 * p + 2):
        s = validate(dualpipev(p, m))
        for f, b, w in itertools.product([1, 2, 3], repeat=3):
            got = simulate(s, f, b, w).step_time
            if w <= b <= f <= b + w:  # where the closed form is stated to hold
                assert got == pytest.approx(formulas.step_time("dualpipev", p, m, 2 * f, 2 * b, 2 * w))
        tl = simulate(s, 1, 1, 1)
        assert tl.peak_pending_w == formulas.peak_inflight("dualpipev", p, m) == [2 * p + 1] * p


def test_dualpipev_deepseek_bubble_bounds_the_sequential_one():
    """DeepSeek's ``(PP/2 − 1)(F&B + B − 3W)`` with F&B = F + B (no overlap, as on one CPU
    core) is ``(p − 1)·t_b`` (per chunk) more than the simulator finds for these orders: their
    formula treats an F&B unit as indivisible; run one action after the other, the F of a
    unit need not wait for the B's gradient."""
    for p in (2, 4, 6):
        m = 2 * p + 2
        for f, b, w in [(1, 1, 1), (2, 1, 1), (2, 2, 1), (3, 2, 1)]:
            bubble = simulate(dualpipev(p, m), f, b, w).step_time - 2 * m * (f + b + w)
            fb, full_b = f + b + w, b + w
            deepseek = (2 * p // 2 - 1) * (fb + full_b - 3 * w)
            assert bubble == pytest.approx(deepseek - (p - 1) * b)


def test_dualpipev_needs_two_micro_batches_per_rank_pair():
    with pytest.raises(ValueError, match="at least as many micro-batches as stages"):
        dualpipev(3, 5)


def test_overlap_schedule_checks_its_pairs_and_pickles():
    s = dualpipev(2, 4)
    assert any(s.overlapped)
    assert pickle.loads(pickle.dumps(s)) == s
    k = s.overlapped[0][0]
    assert s.ranks[0][k].kind is Kind.F and s.ranks[0][k + 1].chunk != s.ranks[0][k].chunk
    with pytest.raises(ValueError, match="overlapped pair"):
        OverlapSchedule(s.ranks, overlapped=[[0], []], m=4, v=2, placement="v")


def test_make_schedule_knows_the_new_names():
    assert make_schedule("zb-h2", 3, 6) == zb_h2(3, 6)
    assert make_schedule("ZBV", 2, 4) == zb_v(2, 4)
    assert make_schedule("dualpipev", 2, 4, v=2) == dualpipev(2, 4)
    with pytest.raises(ValueError, match="two chunks"):
        make_schedule("zb-v", 2, 4, v=3)


def test_validator_rejects_a_broken_v_order():
    """Swap two actions of torch's ZB-V order: the validator names the problem."""
    s = zb_v(2, 4)
    order = list(s.ranks[1])
    i, j = order.index(Action(Kind.B, 0, 1)), order.index(Action(Kind.F, 0, 1))
    order[i], order[j] = order[j], order[i]
    with pytest.raises(ScheduleError):
        validate(type(s)([s.ranks[0], order], m=4, v=2, placement="v"))


# ------------------------------------------------------------------------------ explorers


def test_schedule_explorer_takes_the_new_schedules_and_the_v_placement():
    from minipipe.course.widgets import schedule_explorer

    ex = schedule_explorer("zb-v", p=3, m=6, t_b=2.0, t_w=1.0)
    figures = ex.figures
    tl = simulate(zb_v(3, 6), 0.5, 0.5, 0.5)  # chunks cost half a rank's share
    assert ex.error is None and figures["step time"] == pytest.approx(tl.step_time)
    assert figures["formula: step time"] == pytest.approx(tl.step_time)
    assert figures["placement"].startswith("v: rank 0: 0, 5")
    assert figures["messages per step"] == formulas.messages(3, 6, 2, "v") == 2 * 2 * 2 * 6
    assert "t_w" in {n for n, c in ex.controls.items() if c.layout.display != "none"}
    assert ex.update(schedule="dualpipev", m=5) == {} and "m=5 < 2p=6" in ex.error
    assert ex.update(schedule="zb-h2", m=6)["peak awaiting W per rank"] == [5, 5, 5]


def test_memory_explorer_counts_v_chunks_as_halves():
    from minipipe.course.widgets import memory_explorer

    ex = memory_explorer("zb-v", p=4, m=8)
    assert ex.figures["peak micro-batches held"] == [4.0] * 4  # 1F1B's rank-0 peak everywhere
    assert ex.figures["peak (chunk, micro-batch) pairs"] == formulas.peak_inflight("zb-v", 4, 8)
    assert ex.update(schedule="zb-h2")["peak micro-batches held"] == [7] * 4


def test_placement_diagram_and_the_comparison_with_the_optimum():
    from minipipe.course.frontier import compare_to_optimum, optimum_curve, placement_diagram

    ax = placement_diagram(3, "v")
    assert [t.get_text() for t in ax.texts if t.get_text()] == [f"stage {s}" for s in range(6)]
    rows = {r["schedule"]: r for r in compare_to_optimum(2, 4, t_b=3.0, t_w=1.0)}
    assert set(rows) == {"1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipev"}
    for r in rows.values():
        assert r["proven"] and r["optimum"] <= r["step"] and r["gap"] >= 0
    assert rows["zb-h2"]["memory"] == 3 and rows["zb-v"]["memory"] == 2
    curve = optimum_curve(2, 4, t_b=3.0, t_w=1.0)
    assert [c[0] for c in curve] == [1, 2, 3, 4] and all(c[2] for c in curve)
    assert curve[2][1] == rows["zb-h2"]["optimum"]  # ZB-H2's memory buys its optimum


# ------------------------------------------------------------------------------ real ranks

REAL = [("zb-h2", 2, 5), ("zb-v", 2, 4), ("dualpipev", 2, 4), ("dualpipe", 2, 4),
        ("zb-h2", 4, 8), ("zb-v", 4, 8), ("dualpipev", 4, 8), ("dualpipe", 4, 8)]
REAL = [pytest.param(*c, id=f"{c[0]}-p{c[1]}-m{c[2]}") for c in REAL]


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
@pytest.mark.parametrize("name,p,m", REAL)
def test_new_schedules_match_single_process_training_and_their_memory(make_case, name, p, m):
    """Sequential consistency on gloo; the observed activation peak against the order's
    prediction, and the prediction against the closed form (in (chunk, micro-batch) stashes)."""
    from test_runtime import assert_matches

    from minipipe.runtime import reference, train

    model, loss_fn, data = make_case("mlp", m)  # 8 units: one per stage at p = 4 on the V
    schedule = make_schedule(name, p, m)
    result = train(model, loss_fn, schedule, data, return_grads=True, return_params=True,
                   timeout=120)
    assert_matches(result, reference(model, loss_fn, data))
    # Observed (live saved storages) against the prediction from the order (each storage
    # from its F until its last holder lets go: the loss's saved tensors at B, the turn's
    # shared boundary at the later of chunk 1's W and chunk 0's B), action by action.
    observed, predicted = result.peak_activation_bytes, result.predicted_activation_bytes
    assert observed == predicted
    for r in range(p):
        trace = [(label, live) for label, live, _ in result.activation_trace(r)]
        assert trace == result.predicted_activation_trace(r)
    assert result.messages == formulas.messages(p, m, schedule.v, schedule.placement_name,
                                                schedule.pipelines)
    held = simulate(schedule, 1, 1, 1).peak_pending_w
    assert held == formulas.peak_pending_w(name, p, m)
    per = result.activation_bytes_per_mb
    if all(len(set(d.values())) == 1 for d in per[:-1]):  # equal chunks: bytes = stashes × one
        for r in range(p - 1):  # the last rank keeps what the loss needs too
            assert predicted[r] == held[r] * per[r][0]


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
def test_the_search_optimum_runs_on_real_ranks(make_case):
    from test_runtime import assert_matches

    from minipipe.runtime import reference, train
    from minipipe.search import solve

    res = solve(2, 4, 1, 2, 1, memory_limit=2, time_limit=20)
    model, loss_fn, data = make_case("mlp", 4)
    result = train(model, loss_fn, res.schedule, data, return_grads=True, return_params=True,
                   timeout=120)
    assert_matches(result, reference(model, loss_fn, data))
    per = result.activation_bytes_per_mb[0][0]
    assert result.peak_activation_bytes[0] <= 2 * per  # the memory limit, observed
