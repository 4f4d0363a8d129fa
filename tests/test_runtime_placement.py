"""The runtime follows the placement, and agrees with the validator about message order.

V-placed schedules on real gloo ranks train exactly like one process (``reference()``): the
turn of the V is handed over in memory, the last stage sits on rank 0, and one pair of ranks
exchanges the activations of one stage and the gradients of another in both directions, each
on its own channel (a gloo tag). Two steps each, so the second step runs with the receives
posted ahead per channel. A schedule the validator rejects for its message order really goes
wrong when run unchecked: it hangs (deadlock) or computes with the wrong micro-batch.
"""

from __future__ import annotations

import pytest
from test_placement import pair_fifo_mismatch, torch_zbv, v_1f1b
from test_runtime import assert_matches

from minipipe.runtime import PipelineTimeout, WorkerError, reference, train
from minipipe.schedules import Action, Kind, Schedule
from minipipe.validate import ScheduleError, validate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftover_ranks")]


def run(make_case, schedule: Schedule, kind: str = "mlp", **kwargs):
    model, loss_fn, data = make_case(kind, schedule.m, steps=2)
    result = train(model, loss_fn, schedule, data, return_grads=True, return_params=True,
                   timeout=kwargs.pop("timeout", 120), **kwargs)
    return result, reference(model, loss_fn, data)


@pytest.mark.parametrize("case", ["v-1f1b-p2-m4", "torch-zbv-p2-m4", "v-1f1b-p2-m2-gpt-tied"])
def test_v_placed_schedules_match_single_process_training(make_case, case):
    schedule = {"v-1f1b-p2-m4": v_1f1b(2, 4), "torch-zbv-p2-m4": torch_zbv(2, 4),
                "v-1f1b-p2-m2-gpt-tied": v_1f1b(2, 2)}[case]
    result, ref = run(make_case, schedule, "gpt-tied" if "gpt" in case else "mlp")
    assert_matches(result, ref)
    assert result.messages == 2 * 2 * (schedule.p - 1) * schedule.m  # the turn sends nothing
    if case.startswith("torch"):  # one queue per rank pair would deliver out of order here
        assert pair_fifo_mismatch(schedule)
    if "gpt" in case:  # embedding (stage 0) and LM head (stage 3) both on rank 0: one copy
        assert len(result.copies("0.tok.weight")) == 1


def swapped(schedule: Schedule, rank: int, a: Action, b: Action) -> Schedule:
    order = list(schedule.ranks[rank])
    i, j = order.index(a), order.index(b)
    order[i], order[j] = order[j], order[i]
    return Schedule([order if r == rank else o for r, o in enumerate(schedule.ranks)],
                    m=schedule.m, v=schedule.v, name="swapped", placement=schedule.placement)


def test_rejected_channel_order_really_computes_with_the_wrong_micro_batch(make_case):
    bad = swapped(v_1f1b(2, 4), 0, Action(Kind.F, 0), Action(Kind.F, 1))  # stage 0 sends 1, 0
    with pytest.raises(ScheduleError, match="on that channel first"):
        validate(bad)
    result, ref = run(make_case, bad, check_schedule=False, timeout=60)
    with pytest.raises(AssertionError):  # rank 1 took micro-batch 1's activation for 0's
        assert_matches(result, ref)


def test_rejected_deadlock_really_hangs(make_case):
    # rank 1 waits for micro-batch 1 before it returns 0's gradient, which rank 0 waits for
    bad = Schedule(["F0 1F0 1B0 B0 F1 1F1 1B1 B1", "F0 F1 1F0 1B0 B0 1F1 1B1 B1"], m=2, v=2,
                   placement="v")
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(bad)
    with pytest.raises((PipelineTimeout, WorkerError)):
        run(make_case, bad, check_schedule=False, timeout=20, pg_timeout=3)
