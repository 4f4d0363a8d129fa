"""The schedule search: proven optimal on small cases, ordinary schedules, honest bounds.

The solver's step is checked against things known independently: the unsplit optimum
``(m + p − 1)(t_f + t_b)`` (1F1B/GPipe are optimal without a split backward), naive model
parallelism under a one-micro-batch limit, and every hand-written schedule of the package
under its own memory (the optimum can only be as fast or faster). The returned schedule is
validated and simulated: the simulator's step equals the solver's objective and the peak
memory stays under the limit.
"""

from __future__ import annotations

import pytest

from minipipe import formulas, simulate, validate
from minipipe.schedules import make_schedule, one_f_one_b, zb_h1, zb_h2, zb_v
from minipipe.search import search, solve

pytest.importorskip("ortools")


def _check(result, t_f, t_b, t_w, memory_limit=None, comm=0.0):
    s = validate(result.schedule)
    tl = simulate(s, t_f, t_b, t_w if s.split_backward else None, comm)
    assert tl.step_time == pytest.approx(result.step_time)  # ASAP replay of the solver's order
    assert result.lower_bound <= result.step_time + 1e-9
    if result.optimal:  # the replay reaches the solver's proven bound: same model, same times
        assert result.step_time == pytest.approx(result.lower_bound)
    if memory_limit is not None:
        assert max(tl.peak_pending_w) <= memory_limit * s.v
    return tl


@pytest.mark.parametrize("p,m", [(2, 4), (3, 6), (4, 8)])
def test_unsplit_optimum_is_the_1f1b_step(p, m):
    res = solve(p, m, 1, 2, None, memory_limit=p, time_limit=20)
    assert res.optimal  # proven within the time limit (the lesson prints the seconds)
    assert res.step_time == (m + p - 1) * 3 == simulate(one_f_one_b(p, m), 1, 2).step_time
    _check(res, 1, 2, None, p)


def test_one_micro_batch_of_memory_without_split_is_naive():
    p, m = 3, 3
    res = solve(p, m, 1, 2, None, memory_limit=1, time_limit=20)
    assert res.optimal
    assert res.step_time == formulas.step_time("naive", p, m, 1, 2)


@pytest.mark.parametrize("p,m", [(2, 4), (3, 6), (4, 8)])
@pytest.mark.parametrize("costs", [(1, 1, 1), (1, 2, 1)])
def test_proven_optimal_in_seconds_and_never_slower_than_the_hand_schedules(p, m, costs):
    for gen in (zb_h1, zb_h2):
        own = gen(p, m)
        tl = simulate(own, *costs)
        limit = max(tl.peak_pending_w)
        res = solve(p, m, *costs, memory_limit=limit, time_limit=20)
        assert res.optimal  # proven within the time limit (the lesson prints the seconds)
        assert res.lower_bound == pytest.approx(res.step_time)
        assert res.step_time <= tl.step_time
        assert res.step_time >= formulas.ideal_time(m, *costs)
        _check(res, *costs, limit)


def test_zb_h1_and_zb_h2_are_optimal_under_their_own_memory():
    """With t_b = 2 t_f = 2 t_w: neither hand-written order leaves time on the table."""
    p, m = 4, 8
    for gen in (zb_h1, zb_h2):
        tl = simulate(gen(p, m), 1, 2, 1)
        res = solve(p, m, 1, 2, 1, memory_limit=max(tl.peak_pending_w), time_limit=20)
        assert res.optimal and res.step_time == tl.step_time


def test_more_memory_never_hurts_and_the_limit_is_held():
    p, m = 4, 8
    steps = []
    for limit in (1, 2, 4, 5, 7):
        res = solve(p, m, 1, 2, 1, memory_limit=limit, time_limit=20)
        assert res.optimal
        _check(res, 1, 2, 1, limit)
        steps.append(res.step_time)
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
    assert steps[-1] == formulas.step_time("zb-h2", p, m, 1, 2, 1)  # 2p − 1: ZB-H2's optimum


def test_comm_latency_and_per_stage_costs():
    t_f = [1, 1, 2]  # a slow last stage
    res = solve(3, 4, t_f, 2, 1, comm=0.5, memory_limit=3, time_limit=20,
                start_from=zb_h1(3, 4))
    assert res.optimal
    _check(res, t_f, 2, 1, 3, comm=0.5)


def test_v_placement_search_beats_or_ties_zb_v_at_its_memory():
    p, m = 2, 4
    tl = simulate(zb_v(p, m), 1, 1, 1)
    res = solve(p, m, 1, 1, 1, memory_limit=max(tl.peak_pending_w) / 2, placement="v",
                time_limit=20)
    assert res.schedule.placement_name == "v" and res.optimal
    assert res.step_time <= tl.step_time
    _check(res, 1, 1, 1, max(tl.peak_pending_w) / 2)


def _bare_optimum(p, m, costs, comm, limit, placement, v=None):
    """The optimum of the bare model: no rank bounds, no known schedule as first solution or
    horizon, the loose horizon (the model as it was before they were added), proven."""
    from ortools.sat.python import cp_model

    from minipipe.search import _build, _problem

    pb = _problem(p, m, *costs, comm, limit, placement, v)
    model, _, _ = _build(pb, redundant=False)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds, solver.parameters.num_workers = 20, 1
    assert solver.Solve(model) == cp_model.OPTIMAL
    return solver.ObjectiveValue() / pb.scale


@pytest.mark.parametrize("placement", ["loop", "v"])
@pytest.mark.parametrize("p,m,costs,comm,limits", [
    (2, 4, (1, 1, 1), 0, (1, 2)), (2, 4, (1, 2, 1), 0, (1, 2)),
    (3, 4, (1, 1, 1), 0, (1, 3)), (3, 4, (1, 2, 1), 0, (1.5, 3)),
    (2, 4, (1, 2, None), 0, (1.5,)),  # unsplit backward: no W, the stash lives until B
    (2, 4, ([1, 2, 1, 1], 2, 1), 0.5, (1.5,)),  # t_f per stage (first p·v used), a latency
])
def test_the_added_bounds_and_hints_leave_the_optimum_unchanged(placement, p, m, costs, comm,
                                                                 limits):
    """Each redundant bound and the known-schedule horizon are only valid if they cut no
    schedule the bare model admits: same proven optimum, on cases the bare model proves."""
    stages = p * (2 if placement == "v" else 1)
    t_f = costs[0] if isinstance(costs[0], int) else costs[0][:stages]
    costs = (t_f, *costs[1:])
    for limit in limits:
        res = solve(p, m, *costs, comm=comm, memory_limit=limit, placement=placement,
                    time_limit=20)
        assert res.optimal
        assert res.step_time == _bare_optimum(p, m, costs, comm, limit, placement)
        _check(res, *costs, limit, comm=comm)


@pytest.mark.parametrize("placement", ["loop", [(1, 0), (0, 0), (0, 1), (1, 1)]])
def test_the_bounds_hold_with_two_chunks_on_any_placement(placement):
    """Interleaved (stages r and r + p on rank r) and a mirrored V: the rank bounds use only
    each rank's lowest and highest stage, whatever sits between."""
    for costs, limit in (((1, 2, 1), 1), ((1, 2, 1), 1.5), ((1, 2, None), 1.5)):
        res = solve(2, 4, *costs, memory_limit=limit, placement=placement, v=2, time_limit=20)
        assert res.optimal
        assert res.step_time == _bare_optimum(2, 4, costs, 0, limit, placement, v=2)
        _check(res, *costs, limit)


@pytest.mark.parametrize("costs,limit", [((1, 1, 1), 4), ((1, 2, 1), 4), ((1, 2, 1), 4.5)])
def test_v_placement_at_p4_m8_is_proven_in_seconds(costs, limit):
    """ZB-V's memory (p micro-batches = 2p half stashes) and DualPipeV's (one half more).
    The bare model left ``(1, 2, 1)`` at 4 open after 30 s (bound 67, best 70)."""
    p, m = 4, 8
    res = solve(p, m, *costs, memory_limit=limit, placement="v", time_limit=20)
    assert res.optimal and res.schedule.placement_name == "v"
    tl = _check(res, *costs, limit)
    assert res.step_time <= simulate(zb_v(p, m), *costs).step_time
    assert tl.step_time >= formulas.ideal_time(m, *costs) * 2  # two chunks a rank


def test_the_rank_bounds_alone_prove_the_v_case():
    """Without a known schedule (no first solution, loose horizon) the proof still closes:
    the bounds, not the hint, carry it. Rank 3 must wait for its first B at 14 holding at
    most 8 forwards: 3 idle + 3 fill + 64 work = 70."""
    from ortools.sat.python import cp_model

    from minipipe.search import _build, _problem

    pb = _problem(4, 8, 1, 2, 1, 0, 4, "v", None)
    model, _, _ = _build(pb)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds, solver.parameters.num_workers = 20, 1
    solver.parameters.cp_model_probing_level = 0
    assert solver.Solve(model) == cp_model.OPTIMAL and solver.ObjectiveValue() == 70


def test_a_start_from_over_the_limit_is_a_hint_not_a_horizon():
    """ZB-H1 holds p micro-batches; under a limit of 1 its step is no upper bound on the
    optimum (the model would be infeasible if it were taken as the horizon)."""
    res = solve(3, 4, 1, 2, 1, memory_limit=1, start_from=zb_h1(3, 4), time_limit=20)
    assert res.optimal and res.step_time > simulate(zb_h1(3, 4), 1, 2, 1).step_time
    _check(res, 1, 2, 1, 1)


def test_same_answer_every_run():
    """One worker: CP-SAT is deterministic, so a lesson can assert on the schedule it shows."""
    first, again = (solve(2, 4, 1, 1, 1, memory_limit=1, placement="v", time_limit=20)
                    for _ in range(2))
    assert first.optimal and first.schedule == again.schedule


def test_time_limit_returns_the_best_found_and_a_valid_schedule():
    p, m = 6, 24
    res = solve(p, m, 1, 2, 1, memory_limit=p, time_limit=2, start_from=zb_h1(p, m))
    assert res.lower_bound <= res.step_time <= simulate(zb_h1(p, m), 1, 2, 1).step_time
    _check(res, 1, 2, 1, p)
    assert res.schedule.name.startswith("optimal" if res.optimal else "best-found")


def test_search_returns_an_ordinary_schedule_and_rejects_impossible_limits():
    s = search(2, 2, 1, 1, 1, memory_limit=2)
    assert type(s).__name__ == "Schedule" and s.split_backward
    assert make_schedule("zb-h1", 2, 2).p == s.p
    with pytest.raises(ValueError, match="less than one chunk"):
        solve(2, 2, memory_limit=0.25)


# ------------------------------------------------- exercise 11: a schedule on a budget

ON_BUDGET = ["F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 B3 W3 B4 W4 B5 W5",
             "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 B4 W3 B5 W4 W5",
             "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 W3 W4 W5"]


def test_budget_check_passes_the_solution_and_knows_the_optimum():
    from minipipe.course.checks import check_budget_schedule
    from minipipe.course.checks.ex11_budget import BUDGET, optimum
    from minipipe.schedules import Schedule

    assert optimum(3, 6, 1.0, 2.0, 1.0, 4) == 27.0
    assert check_budget_schedule(lambda: Schedule(ON_BUDGET), run=False) is None
    assert BUDGET["memory"] == 4 and BUDGET["margin"] == 0.02


@pytest.mark.parametrize("answer,message", [
    (lambda: zb_h1(3, 6), "That is ZB-H1"),
    (lambda: zb_h2(3, 6), "That is ZB-H2"),
    (lambda: one_f_one_b(3, 6), "Split the backward"),
    (lambda: zb_h1(2, 6), "p=3"),
    (lambda: make_schedule("gpipe", 3, 6), "holds 6 micro-batches"),
])
def test_budget_check_names_the_common_wrong_answers(answer, message):
    from minipipe.course.checks import CheckFailed, check_budget_schedule

    with pytest.raises(CheckFailed, match=message):
        check_budget_schedule(answer, run=False)


def test_budget_check_fails_the_stub_and_a_broken_order_and_takes_other_answers():
    from minipipe.course.checks import CheckFailed, check_budget_schedule
    from minipipe.schedules import Schedule

    def stub():
        raise NotImplementedError("Exercise 11: write a schedule within both budgets")

    with pytest.raises(CheckFailed, match="not implemented"):
        check_budget_schedule(stub, run=False)
    another = [ON_BUDGET[0], ON_BUDGET[1].replace("B0 F3", "F3 B0"), ON_BUDGET[2]]
    swapped = [ON_BUDGET[0].replace("B0 W0", "W0 B0"), *ON_BUDGET[1:]]
    with pytest.raises(CheckFailed, match="validate"):
        check_budget_schedule(lambda: Schedule(swapped), run=False)
    check_budget_schedule(lambda: Schedule(another), run=False)  # a different answer that fits
