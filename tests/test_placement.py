"""Placement is part of the schedule: the validator, dry run, simulator and formulas follow it.

Messages travel on channels, one per stage boundary and direction; each delivers in the order it
is sent, independently of the others. The fast checks (``minipipe.dataflow``) are compared here
with the plain ones in ``minipipe.validate`` and with a plain simulator written below, on many
small random schedules and placements. No processes: the whole file runs in a few seconds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipipe import (
    Action,
    Kind,
    Schedule,
    ScheduleError,
    dataflow,
    dry_run,
    formulas,
    make_schedule,
    one_f_one_b,
    simulate,
    validate,
    zb_h1,
)
from minipipe.dataflow import Invalid, compile_schedule
from minipipe.schedules import zb_h2
from minipipe.schedules.base import action, make_placement
from minipipe.schedules.interleaved import interleaved
from minipipe.validate import (
    _check_channels,
    _check_complete,
    _check_local_deps,
    _dry_run_ticks,
    comm_plan,
)


def torch_zbv(p: int, m: int) -> Schedule:
    """torch.distributed.pipelining's ZB-V order (``ScheduleZBVZeroBubble``), as a Schedule.

    torch builds every rank's list in ``_calculate_single_rank_operations``; it reads only the
    three attributes set here, so no process group is needed.
    """
    from torch.distributed.pipelining.schedules import ScheduleZBVZeroBubble

    fake = type("Fake", (), {})()
    fake.pp_group_size, fake.num_stages, fake._n_microbatches = p, 2 * p, m
    kinds = {"FORWARD": Kind.F, "BACKWARD_INPUT": Kind.B, "BACKWARD_WEIGHT": Kind.W}
    ranks = []
    for r in range(p):
        ops = ScheduleZBVZeroBubble._calculate_single_rank_operations(fake, r)
        ranks.append([Action(kinds[a.computation_type.name], a.microbatch_index,
                             0 if a.stage_index == r else 1) for a in ops if a is not None])
    return Schedule(ranks, m=m, v=2, name="torch zb-v", placement="v")


def v_1f1b(p: int, m: int) -> Schedule:
    """A plain V-shaped 1F1B written by playing it (two chunks, V placement, whole backward).

    Each rank runs, as soon as its input is there, the ready action of the lowest kind-priority:
    a backward of chunk 1, then of chunk 0, then a forward of chunk 1, then of chunk 0 (at most
    ``2p`` micro-batches forwarded and not yet backwarded per rank). Played on unit costs.
    """
    s_of = make_placement("v", p, 2)
    stage = {rc: s for s, rc in enumerate(s_of)}
    done: dict[tuple[str, int, int], int] = {}
    orders: list[list[Action]] = [[] for _ in range(p)]
    nxt = [[0, 0, 0, 0] for _ in range(p)]  # next mb of F chunk 0, F chunk 1, B chunk 0, B chunk 1
    t = 0
    while any(len(o) < 4 * m for o in orders):
        ran = []
        for r in range(p):
            for kind, c in (("B", 1), ("B", 0), ("F", 1), ("F", 0)):
                i = nxt[r][(kind == "B") * 2 + c]
                s = stage[(r, c)]
                if i >= m:
                    continue
                if kind == "F":
                    ok = (s == 0 or done.get(("F", s - 1, i), t) < t) and \
                        nxt[r][0] + nxt[r][1] - nxt[r][2] - nxt[r][3] < 2 * p
                else:
                    ok = done.get(("B", s + 1, i) if s < 2 * p - 1 else ("F", s, i), t) < t
                if ok:
                    ran.append((r, kind, c, s, i))
                    break
        for r, kind, c, s, i in ran:
            done[(kind, s, i)] = t
            nxt[r][(kind == "B") * 2 + c] += 1
            orders[r].append(Action(Kind(kind), i, c))
        t += 1
    return Schedule(orders, m=m, v=2, name="v-1f1b", placement="v")


# ---------------------------------------------------------------------------- placements


def test_v_placement_puts_the_last_stage_beside_the_first():
    s = Schedule(["F0 1F0 1B0 B0", "F0 1F0 1B0 B0"], m=1, v=2, placement="v")
    assert s.placement == ((0, 0), (1, 0), (1, 1), (0, 1))
    assert [s.stage(r, c) for r in range(2) for c in range(2)] == [0, 3, 1, 2]
    assert all(s.place(s.stage(r, c)) == (r, c) for r in range(2) for c in range(2))
    assert make_placement("v", 3, 4)[6:9] == ((0, 2), (1, 2), (2, 2))  # the V again at chunk 2


def test_turn_of_the_v_is_handed_over_in_memory():
    s = v_1f1b(2, 2)
    assert validate(s) is s
    msgs = [(m.kind, m.stage, m.src, m.dst) for steps in comm_plan(s) for st_ in steps
            for m in st_.sends]
    assert ("activation", 1, 1, 1) not in msgs and ("gradient", 2, 1, 1) not in msgs
    assert {("activation", 0, 0, 1), ("activation", 2, 1, 0), ("gradient", 3, 0, 1),
            ("gradient", 1, 1, 0)} == set(msgs)
    assert simulate(s).messages == len(msgs) == formulas.messages(2, 2, 2, "v") == 2 * 2 * 1 * 2


@pytest.mark.parametrize("p,v", [(1, 2), (2, 2), (3, 2), (3, 4), (4, 3)])
def test_messages_formula_counts_the_boundaries_that_cross_ranks(p, v):
    for placement in ("loop", "v"):
        crossing = sum(a[0] != b[0] for a, b in itertools.pairwise(make_placement(placement, p, v)))
        assert formulas.messages(p, 3, v, placement) == 2 * 3 * crossing
    assert formulas.messages(p, 3, v) == (2 * (p * v - 1) * 3 if p > 1 else 0)
    assert formulas.messages(p, 3, v, "v") == (2 * v * (p - 1) * 3)


def test_same_rank_hand_off_must_come_after_what_it_needs():
    s = Schedule(["F0 1F0 1B0 B0", "1F0 F0 1B0 B0"], m=1, v=2, placement="v")  # stage 2 before 1
    with pytest.raises(ScheduleError, match="rank 1 runs F of micro-batch 0 .chunk 1. before F of "
                                            "micro-batch 0, which it needs"):
        validate(s)
    with pytest.raises(ScheduleError, match="before"):
        simulate(s)


def test_placement_changes_who_talks_to_whom():
    orders = ["F0 1F0 1B0 B0", "F0 1F0 1B0 B0"]
    loop, vee = Schedule(orders, m=1, v=2), Schedule(orders, m=1, v=2, placement="v")
    assert validate(loop) is loop and validate(vee) is vee
    assert simulate(loop).messages == 6 and simulate(vee).messages == 4
    # loop: stages 0, 1, 2, 3 alternate ranks; V: rank 1 runs stages 1 and 2 back to back
    assert [[t for t, _ in ran] for ran in dry_run(loop)] == [[0, 2, 5, 7], [1, 3, 4, 6]]
    assert [[t for t, _ in ran] for ran in dry_run(vee)] == [[0, 3, 4, 7], [1, 2, 5, 6]]


# ---------------------------------------------------------------------------- channels


def pair_fifo_mismatch(s: Schedule) -> bool:
    """Would one first-in-first-out queue per ordered rank pair deliver a wrong message?"""
    sent, got = {}, {}
    for steps in comm_plan(s):
        for step in steps:
            for msg in step.sends:
                sent.setdefault((msg.src, msg.dst), []).append(msg)
            for msg in step.recvs:
                got.setdefault((msg.src, msg.dst), []).append(msg)
    return any(sent.get(pair) != want for pair, want in got.items())


@pytest.mark.parametrize("p,m", [(2, 4), (2, 2), (3, 6), (4, 8), (4, 5)])
def test_torch_zbv_order_validates_on_separate_channels(p, m):
    s = torch_zbv(p, m)
    assert validate(s) is s
    tl = simulate(s, 1, 1, 1)
    assert tl.messages == formulas.messages(p, m, 2, "v")
    if (p, m) == (2, 4):  # one queue per rank pair would reject it (the example)
        assert pair_fifo_mismatch(s)


def test_channel_received_out_of_order_is_named():
    good = v_1f1b(2, 4)
    orders = [list(o) for o in good.ranks]
    k0, k1 = orders[0].index(Action(Kind.F, 0, 0)), orders[0].index(Action(Kind.F, 1, 0))
    orders[0][k0], orders[0][k1] = orders[0][k1], orders[0][k0]  # stage 0 sends 1 before 0
    bad = Schedule(orders, m=4, v=2, placement="v")
    with pytest.raises(ScheduleError, match=r"activation of micro-batch 0 \(stage 0\) from rank "
                                            r"0, but rank 0 sends the activation of micro-batch "
                                            r"1 \(stage 0\) on that channel first"):
        validate(bad)


# ---------------------------------------------------------------------------- fast == plain


DEPS = {Kind.F: "F(s-1)", Kind.B: "B(s+1)", Kind.W: "B(s)"}


@st.composite
def random_schedule(draw) -> Schedule:
    """Any placement; each rank's order read off one random run respecting data dependencies
    (and, if drawn, receiving each channel in the order it is sent), then perhaps two actions
    of one rank swapped."""
    p, v, m = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    split = draw(st.booleans())
    S = p * v
    pairs = [(r, c) for c in range(v) for r in range(p)]
    placement = draw(st.sampled_from(["loop", "v", "random"]))
    if placement == "random":
        placement = draw(st.permutations(pairs))
    place = make_placement(placement, p, v)
    kinds = [Kind.F, Kind.B] + ([Kind.W] if split else [])
    done: set[tuple[Kind, int, int]] = set()
    todo = [(k, s, i) for k in kinds for s in range(S) for i in range(m)]
    orders: list[list[Action]] = [[] for _ in range(p)]

    fifo = draw(st.booleans())  # receive each channel in the order it is sent: always valid
    sent: dict[tuple[Kind, int], list[int]] = {}  # (kind, sending stage) -> micro-batches
    taken: dict[tuple[Kind, int], int] = {}

    def next_on(k: Kind, src: int, dst: int, i: int) -> bool:
        if not fifo or place[src][0] == place[dst][0]:
            return True
        queue = sent.get((k, src), [])
        return queue[taken.get((k, src), 0):][:1] == [i]

    def ready(k: Kind, s: int, i: int) -> bool:
        if k is Kind.F:
            return s == 0 or ((Kind.F, s - 1, i) in done and next_on(k, s - 1, s, i))
        if k is Kind.B:
            return (Kind.F, s, i) in done and (s == S - 1 or (
                (Kind.B, s + 1, i) in done and next_on(k, s + 1, s, i)))
        return (Kind.B, s, i) in done

    while todo:
        now = [a for a in todo if ready(*a)]
        k, s, i = now[draw(st.integers(0, len(now) - 1))]
        todo.remove((k, s, i))
        done.add((k, s, i))
        sent.setdefault((k, s), []).append(i)
        src = s - 1 if k is Kind.F else s + 1
        if k is not Kind.W and 0 <= src < S:
            taken[(k, src)] = taken.get((k, src), 0) + 1
        r, c = place[s]
        orders[r].append(Action(k, i, c))
    if draw(st.booleans()):
        r = draw(st.integers(0, p - 1))
        a, b = draw(st.integers(0, len(orders[r]) - 1)), draw(st.integers(0, len(orders[r]) - 1))
        orders[r][a], orders[r][b] = orders[r][b], orders[r][a]
    return Schedule(orders, m=m, v=v, placement=placement)


def plain_accepts(s: Schedule) -> bool:
    try:
        _check_complete(s, s.m, s.v)
        _check_local_deps(s)
        _check_channels(s, comm_plan(s))
        _dry_run_ticks(s)
    except ScheduleError:
        return False
    return True


def plain_simulate(s: Schedule, tf: list[float], tb: list[float], tw: list[float],
                   comm: float) -> dict[tuple[int, Action], tuple[float, float]]:
    """Each rank's next action starts when the rank is free and its input is there: sweep the
    ranks until every action has run (a valid schedule has no deadlock)."""
    S, place, split = s.num_stages, s.placement, s.split_backward
    end: dict[tuple[Kind, int, int], float] = {}
    out, free, at = {}, [0.0] * s.p, [0] * s.p
    while any(at[r] < len(s.ranks[r]) for r in range(s.p)):
        for r in range(s.p):
            while at[r] < len(s.ranks[r]):
                a = s.ranks[r][at[r]]
                st_ = s.stage(r, a.chunk)
                dep = {Kind.F: (Kind.F, st_ - 1), Kind.W: (Kind.B, st_),
                       Kind.B: (Kind.B, st_ + 1) if st_ < S - 1 else (Kind.F, st_)}[a.kind]
                if dep[1] < 0:
                    ready = 0.0
                elif (dep[0], dep[1], a.mb) in end:
                    far = place[dep[1]][0] != r
                    ready = end[(dep[0], dep[1], a.mb)] + (comm if far else 0.0)
                else:
                    break
                start = max(free[r], ready)
                dur = {Kind.F: tf[st_], Kind.B: tb[st_] if split else tb[st_] + tw[st_],
                       Kind.W: tw[st_]}[a.kind]
                free[r] = end[(a.kind, st_, a.mb)] = start + dur
                out[(r, a)] = (start, start + dur)
                at[r] += 1
    return out


@settings(max_examples=300, deadline=None)
@given(s=random_schedule())
def test_fast_checks_accept_exactly_what_the_plain_checks_accept(s):
    plain = plain_accepts(s)
    try:
        validate(s)
        fast = True
    except ScheduleError:
        fast = False
    assert fast == plain, str(s)
    if plain:
        assert dry_run(s) == _dry_run_ticks(s)


@settings(max_examples=150, deadline=None)
@given(s=random_schedule(), data=st.data())
def test_fast_simulator_matches_the_plain_one_bit_for_bit(s, data):
    if not plain_accepts(s):
        return
    costs = st.lists(st.sampled_from([0.1, 0.5, 1.0, 1.7, 3.0]), min_size=s.num_stages,
                     max_size=s.num_stages)
    tf, tb, tw = data.draw(costs), data.draw(costs), data.draw(costs)
    comm = data.draw(st.sampled_from([0.0, 0.3, 2.0]))
    tl = simulate(s, tf, tb, tw, comm=comm)
    want = plain_simulate(s, tf, tb, tw, comm)
    assert {(e.rank, e.action): (e.start, e.end) for e in tl.events} == want


@settings(max_examples=300, deadline=None)
@given(s=random_schedule())
def test_compiled_event_loop_equals_its_python_source(s):
    """numba's compiled loop and the same function run as plain Python agree: the verdict,
    and every start time bit for bit (also on schedules that deadlock part-way)."""
    try:
        plan = compile_schedule(s, ([0.5] * s.num_stages, [1.5] * s.num_stages,
                                    [0.7] * s.num_stages), comm=0.3)
    except Invalid:
        return
    runs = []
    for run in (dataflow._run.compiled, dataflow._run.py_func):
        finish = np.full(plan.size, -1.0)
        finish[:plan.m] = 0.0
        starts, waiter = np.zeros(len(plan.keys)), np.full(plan.size, -1, np.int64)
        left = run(plan.keys, plan.deps, plan.lags, plan.durations, plan.bounds, finish, starts,
                   waiter)
        runs.append((left, starts.tolist(), finish.tolist()))
    assert runs[0] == runs[1], str(s)
    assert dataflow._run.compiled is not dataflow._run.py_func, "numba is not in use"


# ---------------------------------------------------------------------------- fast generators


def fill_w_plain(todo: list[list[Action]], limit: list[int]) -> list[list[Action]]:
    """The zero-bubble W rule played the plain way: every step, scan all ranks for the
    earliest start (a deferred W when its rank would wait, has nothing else, or holds more
    than ``limit[r]``)."""
    p = len(todo)
    ranks: list[list[Action]] = [[] for _ in range(p)]
    free, finish, waiting_w = [0] * p, {}, [[] for _ in range(p)]
    while any(todo) or any(waiting_w):
        best = None
        for r in range(p):
            a = todo[r][0] if todo[r] else None
            t = None if a is None else (
                (0 if r == 0 else finish.get((r - 1, a))) if a.kind is Kind.F
                else (0 if r == p - 1 else finish.get((r + 1, a))))
            if waiting_w[r] and (len(waiting_w[r]) > limit[r] or a is None or t is None
                                 or t > free[r]):
                cand = (free[r], r, True)
            elif a is not None and t is not None:
                cand = (max(free[r], t), r, False)
            else:
                continue
            best = cand if best is None or cand < best else best
        start, r, do_w = best
        a = Action(Kind.W, waiting_w[r].pop(0)) if do_w else todo[r].pop(0)
        if a.kind is Kind.B:
            waiting_w[r].append(a.mb)
        free[r] = finish[(r, a)] = start + 1
        ranks[r].append(a)
    return ranks


def zb_h1_plain(p: int, m: int) -> Schedule:
    """ZB-H1: 1F1B's F/B order, the W rule scanned plainly with at most ``r`` deferred."""
    todo = [list(order) for order in one_f_one_b(p, m).ranks]
    return Schedule(fill_w_plain(todo, list(range(p))), m=m, v=1, name="zb-h1")


def test_zb_h1_heap_order_equals_the_plain_scan():
    for p in range(1, 9):
        for m in range(1, 18):
            assert zb_h1(p, m) == zb_h1_plain(p, m), (p, m)
    assert zb_h1(24, 61) == zb_h1_plain(24, 61)


def interleaved_plain(p: int, m: int, v: int) -> list[list[Action]]:
    """Interleaved 1F1B assembled action by action (the generator slices shared lists)."""
    total, ranks = m * v, []

    def nth(k: int, forward: bool) -> Action:
        chunk = (k // p) % v
        return Action(Kind.F if forward else Kind.B, (k // (p * v)) * p + k % p,
                      chunk if forward else v - 1 - chunk)

    for r in range(p):
        warmup = total if m == p and v > 1 else min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [nth(k, True) for k in range(warmup)]
        for k in range(total - warmup):
            order += [nth(warmup + k, True), nth(k, False)]
        ranks.append(order + [nth(k, False) for k in range(total - warmup, total)])
    return ranks


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 6), groups=st.integers(1, 4), v=st.integers(1, 4))
def test_interleaved_equals_the_plain_assembly(p, groups, v):
    got = interleaved(p, p * groups, v)  # make_schedule reads v = 1 as 2
    assert [list(o) for o in got.ranks] == interleaved_plain(p, p * groups, v)


@pytest.mark.parametrize("name", ["interleaved", "zb-v", "dualpipev"])
def test_generated_actions_are_shared_and_equal_to_fresh_ones(name):
    s = make_schedule(name, 2, 4, 2) if name == "interleaved" else make_schedule(name, 2, 4)
    assert s.ranks[0][0] is s.ranks[1][0] and s.ranks[0][0] == Action(Kind.F, 0, 0)
    assert all(a is action(a.kind, a.mb, a.chunk) for o in s.ranks for a in o)
    assert Schedule([list(o) for o in s.ranks]) == Schedule([str(s).splitlines()[1][8:],
                                                             str(s).splitlines()[2][8:]])


def zb_h2_plain(p: int, m: int) -> list[list[Action]]:
    """ZB-H2 assembled action by action: its F/B order, then the W rule scanned plainly."""
    todo = []
    for r in range(p):
        warmup = min(2 * (p - r) - 1, m)
        order = [Action(Kind.F, i) for i in range(warmup)]
        for i in range(m - warmup):
            order += [Action(Kind.B, i), Action(Kind.F, warmup + i)]
        todo.append(order + [Action(Kind.B, i) for i in range(m - warmup, m)])
    return fill_w_plain(todo, [2 * r for r in range(p)])


def test_zb_h2_compiled_order_equals_the_plain_scan():
    for p in range(1, 8):
        for m in range(1, 16):
            assert [list(o) for o in zb_h2(p, m).ranks] == zb_h2_plain(p, m), (p, m)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 7), m=st.integers(1, 12), data=st.data())
def test_w_filling_loop_compiled_equals_its_python_source(p, m, data):
    from minipipe.schedules.zero_bubble import _fill_w_loop

    kinds, _, mbs, bounds = one_f_one_b(p, m).columns()
    limit = np.array(data.draw(st.lists(st.integers(0, 2 * p), min_size=p, max_size=p)))
    outs = []
    for run in (_fill_w_loop.compiled, _fill_w_loop.py_func):
        out = np.zeros((p, 3 * m), np.int64)
        run(kinds, mbs, bounds, m, limit, out)
        outs.append(out.tolist())
    assert outs[0] == outs[1]
    assert _fill_w_loop.compiled is not _fill_w_loop.py_func, "numba is not in use"


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 5), max_size=30), min_size=1, max_size=4),
       m=st.integers(1, 12))
def test_numbered_counts_each_kind_and_chunk_in_order(rows, m):
    """``numbered``: the k-th token of a (kind, chunk) on a rank is micro-batch k; k >= m cut."""
    from minipipe.schedules.patterns import numbered

    want = []
    for row in rows:
        seen: dict[int, int] = {}
        order = []
        for token in row:
            k = seen[token] = seen.get(token, -1) + 1
            if k < m:
                order.append(Action(Kind("FBW"[token // 2]), k, token % 2))
        want.append(order)
    got = numbered(rows, m, 2)
    assert [list(o) for o in got.ranks] == want
    assert [list(c) for c in got.columns()] == [list(c) for c in Schedule(want, m=m, v=2).columns()]


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "dualpipev"])
def test_timeline_from_events_reads_like_the_simulated_columns(name):
    """A timeline built from Event objects (as the runtime measures) gives every figure the
    simulator's column store gives, bit for bit."""
    from minipipe.timeline import Timeline

    tl = simulate(make_schedule(name, 3, 6), 1.0, 1.7, 0.6 if name != "1f1b" else 0.0, comm=0.2)
    again = Timeline(tl.schedule, list(reversed(tl.events)), source="simulated")
    assert again == tl and again.summary() == tl.summary()
    assert [again.rank_events(r) for r in range(3)] == [tl.rank_events(r) for r in range(3)]
