"""Bidirectional DualPipe as data: two pipelines (``Schedule.pipelines = 2``) on the same ranks.

Fast checks: the data model (groups of stages, replicas, helpers, pickling), the generator
(validates; each rank runs exactly the micro-batches that visit its chunks; mirrored ranks;
DeepSeek's F&B unit count), the validator's messages for a micro-batch on the wrong pipeline,
and the simulator against DeepSeek's stated bubble and memory and our closed forms. The
real-rank checks (slow) are in ``test_frontier.py``'s REAL list (p = 2, 4) and below (tied
weights, checkpoint round trip, parameters twice).
"""

from __future__ import annotations

import itertools
import pickle

import pytest

from minipipe import formulas, simulate, validate
from minipipe.dataflow import Invalid, compile_schedule
from minipipe.schedules import Action, Kind, OverlapSchedule, Schedule, dualpipe, make_schedule
from minipipe.validate import ScheduleError, _dry_run_ticks, comm_plan, dry_run

SIZES = [(2, 4), (2, 6), (4, 8), (4, 10), (6, 12), (8, 16), (8, 20)]


# ------------------------------------------------------------------------------ data model


def test_pipelines_split_stages_and_micro_batches_into_groups():
    s = Schedule(["F0 1F2 1B2 B0 F1 1F3 1B3 B1", "F0 1F2 1B2 B0 F1 1F3 1B3 B1"], m=4, v=2,
                 placement="v", pipelines=2)
    assert (s.group_stages, s.group_mbs) == (2, 2)
    assert [s.group_of(i) for i in range(4)] == [0, 0, 1, 1]
    assert list(s.stages_of_group(1)) == [2, 3] and list(s.mbs_of_stage(3)) == [2, 3]
    assert [s.first_stage(i) for i in range(4)] == [0, 0, 2, 2]
    assert [s.last_stage(i) for i in range(4)] == [1, 1, 3, 3]
    assert [s.model_stage(t) for t in range(4)] == [0, 1, 0, 1]
    assert [s.is_first(t) for t in range(4)] == [True, False, True, False]
    assert "pipelines=2" in repr(s) and "pipelines=2" in str(s)
    assert "pipelines" not in repr(Schedule(["F0 B0"]))
    assert pickle.loads(pickle.dumps(s)) == s
    assert s != Schedule(s.ranks, m=4, v=2, placement="v")  # pipelines is part of the value
    with pytest.raises(ValueError, match="pipelines=2 must be an int >= 1 dividing"):
        Schedule(["F0 B0 F1 B1 F2 B2"], m=3, pipelines=2)


@pytest.mark.parametrize("p,m", SIZES)
def test_dualpipe_placement_and_each_ranks_micro_batches(p, m):
    s = validate(dualpipe(p, m))
    assert (s.v, s.pipelines, s.placement_name, s.m) == (2, 2, "v", m)
    for r in range(p):
        assert s.stage(r, 0) == r  # group 0's stage r
        assert s.stage(r, 1) == p + (p - 1 - r)  # group 1's copy of stage p − 1 − r
        assert s.model_stage(s.stage(r, 1)) == p - 1 - r
        want = {Action(k, i, c) for c in (0, 1) for i in s.mbs_of_stage(s.stage(r, c))
                for k in Kind}
        assert set(s.ranks[r]) == want and len(s.ranks[r]) == len(want) == 3 * m
        mirror = [Action(a.kind, (a.mb + m // 2) % m, 1 - a.chunk) for a in s.ranks[p - 1 - r]]
        assert list(s.ranks[r]) == mirror  # ranks r and p − 1 − r: one order, mirrored
    assert s.first_stage(0) == 0 and s.place(s.first_stage(m - 1))[0] == p - 1
    assert s.place(s.last_stage(0))[0] == p - 1 and s.place(s.last_stage(m - 1))[0] == 0


@pytest.mark.parametrize("p,m", SIZES)
def test_dualpipe_overlapped_units_follow_deepseeks_phase_counts(p, m):
    """Phase 4 has two F&B units per round (the middle ranks run their first round's pair
    apart), phase 5 one: ``2(m/2 − p + h + 1) + (p/2 − h − 1) − [middle]``, ``h`` the half
    rank."""
    s = dualpipe(p, m)
    assert isinstance(s, OverlapSchedule)
    for r in range(p):
        h = min(r, p - 1 - r)
        middle = h == p // 2 - 1
        assert len(s.overlapped[r]) == 2 * (m // 2 - p + h + 1) + (p // 2 - h - 1) - middle
        for k in s.overlapped[r]:  # an F of one direction with a whole B of the other
            f, b, w = s.ranks[r][k:k + 3]
            assert f.chunk != b.chunk and s.group_of(f.mb) != s.group_of(b.mb)


def test_dualpipe_requirements_refused_in_one_line():
    for p, m in [(3, 6), (4, 9), (4, 6), (0, 4)]:
        with pytest.raises(ValueError) as err:
            dualpipe(p, m)
        assert "\n" not in str(err.value)
    assert make_schedule("dualpipe", 4, 8) == make_schedule("DualPipe", 4, 8, v=2) == dualpipe(4, 8)


# ------------------------------------------------------------------------------ validator


def _moved(s: Schedule, rank: int, old: Action, new: Action) -> Schedule:
    ranks = [[new if (r == rank and a == old) else a for a in o] for r, o in enumerate(s.ranks)]
    return Schedule(ranks, m=s.m, v=s.v, placement=s.placement, pipelines=s.pipelines)


def test_a_micro_batch_on_the_other_pipeline_is_named():
    s = dualpipe(2, 4)
    bad = _moved(s, 0, Action(Kind.F, 0, 0), Action(Kind.F, 2, 0))  # 2 travels pipeline 1
    with pytest.raises(Invalid):
        compile_schedule(bad)
    with pytest.raises(ScheduleError, match="micro-batch 2 travels pipeline 1, not chunk 0's"):
        validate(bad)


def test_the_plain_checks_explain_what_the_fast_path_rejects():
    s = dualpipe(4, 8)
    order = list(s.ranks[3])  # group 1 enters at rank 3: swap its first two forwards
    order[0], order[1] = order[1], order[0]
    bad = Schedule([order if r == 3 else o for r, o in enumerate(s.ranks)], m=8, v=2,
                   placement="v", pipelines=2)
    with pytest.raises(ScheduleError, match="on that channel first") as err:
        validate(bad)
    assert "please report" not in str(err.value)
    assert dry_run(s) == _dry_run_ticks(s)  # the fast path's ticks are the plain ones


def test_messages_stay_within_a_pipeline():
    s = dualpipe(4, 8)
    plan = comm_plan(s)
    for r, steps in enumerate(plan):
        for step in steps:
            stage = s.stage(r, step.action.chunk)
            for msg in step.recvs + step.sends:  # never from group 0's last to group 1's first
                assert s.group_of_stage(msg.stage) == s.group_of_stage(stage)
                assert s.group_of(msg.mb) == s.group_of_stage(stage)
        first = [st for st in steps if s.is_first(s.stage(r, st.action.chunk))]
        assert all(not st.recvs for st in first if st.action.kind is Kind.F)  # reads the input
    tl = simulate(s, 1, 1, 1)
    assert tl.messages == formulas.messages(4, 8, 2, "v", pipelines=2) == 2 * 3 * 8  # as 1F1B


# ------------------------------------------------------------------------------ simulator

GRID = [c for c in itertools.product([1, 2, 3, 4], repeat=3) if c[2] <= c[1] <= c[0] <= c[1] + c[2]]


@pytest.mark.parametrize("p,m", SIZES)
def test_dualpipe_simulates_to_its_closed_form_and_deepseeks_memory(p, m):
    """Costs per stage (each chunk is a whole stage), comm = 0, F&B units run one action after
    the other (one CPU core). Step: ``m(t_f + t_b + t_w) + (p/2 − 1)(t_f + t_b − t_w)`` on
    ``t_w <= t_b <= t_f <= t_b + t_w``; memory: DeepSeek's ``PP + 1`` stashes per rank, each a
    whole stage's (1F1B's unit), until W."""
    s = dualpipe(p, m)
    for f, b, w in GRID:
        got = simulate(s, f, b, w).step_time
        assert got == pytest.approx(formulas.step_time("dualpipe", p, m, f, b, w)), (f, b, w)
    tl = simulate(s, 1, 1, 1)
    assert tl.peak_pending_w == tl.peak_inflight == formulas.peak_inflight("dualpipe", p, m)
    assert tl.peak_pending_w == [p + 1] * p


def test_deepseeks_bubble_is_the_simulators_plus_one_backward_per_half_rank():
    """DeepSeek state ``(p/2 − 1)(F&B + B − 3W)`` (``B`` a whole backward, ``W`` its weight
    half). Setting ``F&B = t_f + t_b + t_w`` (no overlap), the simulator's bubble (step minus
    ``m`` units of work per rank) is ``(p/2 − 1)·t_b`` smaller, on the grid above (at p = 2
    both are 0): the statement is an upper bound for this order, not what it plays. Why: not
    pinned down. Making each F&B unit wait for both of its inputs before it starts (DeepSeek's
    runtime commits both receives first) closes the gap only at ``t_f = 2, t_b = t_w = 1``
    (checked aside, not here), so that alone is not the authors' accounting."""
    for p, m in SIZES:
        for f, b, w in GRID:
            bubble = simulate(dualpipe(p, m), f, b, w).step_time - m * (f + b + w)
            deepseek = (p / 2 - 1) * ((f + b + w) + (b + w) - 3 * w)
            assert bubble == pytest.approx(deepseek - (p / 2 - 1) * b), (p, m, f, b, w)
    # and it is DualPipeV's bubble for p/2 ranks: the two directions are two mirrored V's
    assert simulate(dualpipe(8, 16), 2, 1, 1).step_time - 16 * 4 == 3 * 2


def test_parameters_twice_and_fewer_bubbles_than_1f1b():
    """2× parameters (two stages of 1/p of the model per rank) buy a bubble of
    ``(p/2 − 1)(t_f + t_b − t_w)`` against 1F1B's ``(p − 1)(t_f + t_b + t_w)`` (same
    stages)."""
    p, m = 8, 16
    one = simulate(make_schedule("1f1b", p, m), 1, 1, 1).step_time - m * 3
    two = simulate(dualpipe(p, m), 1, 1, 1).step_time - m * 3
    assert (one, two) == ((p - 1) * 3, (p // 2 - 1) * 1)


# ------------------------------------------------------------------------------ real ranks


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
def test_dualpipe_tied_weights_checkpoint_once_and_parameters_twice(make_case, tmp_path):
    """GPT with tied embedding/head at p = 2: each rank holds the whole model (both stages),
    the copies' gradients are summed, the result is one process's; the checkpoint holds one
    copy, which loads into the single-process model."""
    import torch
    from test_runtime import assert_matches

    from minipipe.runtime import reference, train
    from minipipe.state import merge_checkpoint

    model, loss_fn, data = make_case("gpt-tied", 4, steps=2)
    result = train(model, loss_fn, dualpipe(2, 4), data, return_grads=True, return_params=True,
                   save_dir=tmp_path, timeout=120)
    ref = reference(model, loss_fn, data)
    assert_matches(result, ref)
    whole = sum(t.numel() * t.element_size() for t in model.parameters())
    assert [r["param_bytes"] for r in result.ranks] == [whole, whole]  # p = 2: 2 × (1/2)
    state = merge_checkpoint(tmp_path)
    assert state["meta"]["schedule"]["pipelines"] == 2
    held = sorted(h for r in state["meta"]["ranks"] for h in r["holds"])
    tied = "0.tok.weight"  # embedding (stage 0) and head (stage 1): saved by both, as always
    assert held == sorted([*ref["params"], tied])  # each replica once (pipeline 0's copy)
    model.load_state_dict(state["model"])
    for name, w in ref["params"].items():
        torch.testing.assert_close(dict(model.named_parameters())[name], w, msg=name)


# ------------------------------------------------------------------------------ explorers


def test_explorers_offer_dualpipe_with_whole_stage_chunks():
    from minipipe.course.frontier import placement_diagram
    from minipipe.course.widgets import memory_explorer, schedule_explorer

    ex = schedule_explorer("dualpipe", p=4, m=8, t_b=2.0, t_w=1.0)
    assert ex.error is None
    assert ex.figures["step time"] == simulate(dualpipe(4, 8), 1, 1, 1).step_time
    assert ex.figures["formula: step time"] == ex.figures["step time"] == 8 * 3 + 1
    assert ex.figures["messages per step"] == 2 * 3 * 8
    assert ex.update(schedule="dualpipe", p=3) == {} and "even p" in ex.error
    mem = memory_explorer("dualpipe", p=4, m=8)
    assert mem.figures["peak micro-batches held"] == [5.0] * 4  # p + 1 stashes of a stage
    ax = placement_diagram(4, "v", pipelines=2)
    texts = [t.get_text() for t in ax.texts if t.get_text()]
    assert texts[:4] == [f"stage {s}" for s in range(4)] and texts[4] == "stage 4\n(= 0)"
    assert len([t for t in ax.texts if not t.get_text()]) == 6  # arrows: none from 3 to 4
