"""The part-2 explorers draw what the partitioner, the simulator and the formulas say.

Each explorer is driven through ``update(**values)`` (what a slider calls) under matplotlib's
Agg backend without a kernel; the tests read back what was drawn (bars, timeline rows) and
the panel's figures, and recompute them independently.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from minipipe import formulas  # noqa: E402
from minipipe.course.explorers import (checkpoint_explorer, partition_explorer,  # noqa: E402
                                stage_step_time, zb_explorer)
from minipipe.partition import balanced  # noqa: E402
from minipipe.partition import split_evenly  # noqa: E402
from minipipe.schedules import make_schedule  # noqa: E402
from minipipe.simulate import simulate  # noqa: E402


def timeline_bars(ax) -> int:
    """Action bars in a timeline chart (F, B and W collections)."""
    return sum(len(c.get_paths()) for c in ax.collections if c.get_label() in ("F", "B", "W"))


def layer_bars(ax) -> list[float]:
    """Heights of the per-layer bars of a partition chart, left to right."""
    bars = sorted((patch.get_x(), patch.get_height()) for patch in ax.patches)
    return [h for _, h in bars]


# --------------------------------------------------------------------------- partition

COSTS = [1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 2.0, 1.0]


@pytest.mark.parametrize("layer, factor, stages, m", [
    (0, 1.0, 2, 8), (7, 6.0, 3, 4), (3, 2.5, 4, 8), (5, 8.0, 2, 1), (2, 1.0, 1, 3)])
def test_partition_explorer_shows_equal_and_balanced_splits(layer, factor, stages, m):
    ex = partition_explorer(COSTS)
    figures = ex.update(layer=layer, factor=factor, stages=stages, m=m)
    assert ex.error is None
    costs = list(COSTS)
    costs[layer] *= factor
    best = balanced(costs, stages)
    assert figures["balanced: bounds"] == best.bounds
    assert figures["balanced: stage costs"] == best.stage_costs
    assert figures["balanced: bottleneck stage"] == best.bottleneck
    assert figures["equal layers: bounds"] == split_evenly(len(costs), stages)
    assert max(figures["balanced: stage costs"]) <= max(figures["equal layers: stage costs"])
    top, bottom = ex.figure.axes[:2]
    assert layer_bars(top) == costs and layer_bars(bottom) == costs  # one bar per layer
    hatched = [p for p in bottom.patches if p.get_hatch()]  # the bottleneck stage's layers
    a, b = best.bounds[best.bottleneck], best.bounds[best.bottleneck + 1]
    assert len(hatched) == b - a
    t_eq = stage_step_time(figures["equal layers: stage costs"], m)
    t_bal = stage_step_time(best.stage_costs, m)
    assert figures["speed-up of the balanced split"] == pytest.approx(t_eq / t_bal)
    assert t_bal <= t_eq + 1e-12


def test_partition_bottleneck_moves_with_the_slow_layer():
    ex = partition_explorer([1.0] * 8, stages=4)
    where = []
    for layer in (0, 2, 5, 7):
        figures = ex.update(layer=layer, factor=6.0)
        bounds = figures["balanced: bounds"]
        stage = next(s for s in range(4) if bounds[s] <= layer < bounds[s + 1])
        assert figures["balanced: bottleneck stage"] == stage  # the slow layer's stage is slowest
        where.append(stage)
    assert where == sorted(where) and where[0] == 0 and where[-1] == 3


def test_stage_step_time_is_the_slowest_stage_in_steady_state():
    # 1F1B on unequal stages: the steady state runs at the slowest stage's pace
    equal = formulas.step_time("1f1b", 2, 8, 1 / 3, 2 / 3)
    assert stage_step_time([1.0, 1.0], 8) == pytest.approx(equal)
    slow = stage_step_time([1.0, 3.0], 32) - stage_step_time([1.0, 3.0], 31)
    assert slow == pytest.approx(3.0)


# -------------------------------------------------------------------------- checkpoint

FULL, KEPT = [240_000, 250_000, 230_000], [1_000, 8_000, 8_000]
T_F, T_B = [0.01, 0.012, 0.011], [0.02, 0.025, 0.021]


@pytest.mark.parametrize("chosen, schedule, m", [
    ((), "1f1b", 8), ((0,), "1f1b", 8), ((0, 1, 2), "1f1b", 4), ((1,), "gpipe", 6),
    ((2, 0), "gpipe", 2)])
def test_checkpoint_explorer_memory_saved_and_time_added(chosen, schedule, m):
    ex = checkpoint_explorer(FULL, KEPT, T_F, T_B)
    figures = ex.update(checkpoint=chosen, schedule=schedule, m=m)
    assert ex.error is None
    sched = make_schedule(schedule, 3, m)
    held = simulate(sched, T_F, T_B).peak_inflight
    assert figures["peak micro-batches held per rank"] == held
    for s in range(3):
        assert figures["peak bytes per rank, without"][s] == held[s] * FULL[s]
        want = held[s] * (KEPT[s] if s in chosen else FULL[s])
        assert figures["peak bytes per rank, with"][s] == want
        assert figures["memory saved per rank (bytes)"][s] == held[s] * FULL[s] - want
    t_b_recompute = [b + (f if s in chosen else 0) for s, (f, b) in enumerate(zip(T_F, T_B))]
    slower = simulate(sched, T_F, t_b_recompute)
    assert figures["step time with (s)"] == pytest.approx(slower.step_time)
    assert figures["step time without (s)"] == pytest.approx(simulate(sched, T_F, T_B).step_time)
    if chosen:
        assert figures["time added"] > 0
    else:
        assert figures["time added"] == 0
    mem, tl_ax = ex.figure.axes[:2]
    assert len(mem.patches) == 6  # two bars per rank
    assert timeline_bars(tl_ax) == 2 * 3 * m  # F and B of every micro-batch on every rank


def test_checkpoint_explorer_rejects_ragged_inputs():
    with pytest.raises(ValueError, match="one number per stage"):
        checkpoint_explorer([1, 2], [1], [0.1, 0.1], [0.2, 0.2])


# --------------------------------------------------------------------------------- zb-h1


@pytest.mark.parametrize("t_w, p, m", [(1.0, 4, 8), (0.5, 4, 8), (0.0, 3, 6), (1.0, 2, 4)])
def test_zb_explorer_bubbles_match_the_formulas(t_w, p, m):
    ex = zb_explorer()
    figures = ex.update(t_w=t_w, p=p, m=m)
    assert ex.error is None
    assert figures["1F1B: idle per rank"] == pytest.approx((p - 1) * (2 + t_w))
    assert figures["ZB-H1: idle per rank (mean)"] == pytest.approx((p - 1) * (2 - t_w))
    assert figures["formula (p−1)(t_f+t_b−t_w)"] == pytest.approx((p - 1) * (2 - t_w))
    zb_step = formulas.step_time("zb-h1", p, m, 1, 1, t_w)
    assert figures["ZB-H1: step time"] == pytest.approx(zb_step)
    assert figures["ZB-H1: peak awaiting W per rank"] == [min(p, m)] * p
    assert figures["1F1B: peak micro-batches held per rank"] == [min(p - r, m) for r in range(p)]
    assert "note" not in figures
    top, bottom = ex.figure.axes[:2]
    assert timeline_bars(top) == 2 * p * m  # F, B
    assert timeline_bars(bottom) == 3 * p * m  # F, B, W
    assert [t.get_text() for t in bottom.get_yticklabels()] == [f"rank {r}" for r in range(p)]


def test_zb_explorer_equal_parts_give_a_third_of_the_bubble():
    figures = zb_explorer(p=4, m=8, t_w=1.0).figures
    assert figures["ZB-H1 bubble ÷ 1F1B bubble"] == pytest.approx(1 / 3)


def test_zb_explorer_notes_when_the_formula_does_not_apply():
    ex = zb_explorer()
    assert "note" in ex.update(t_w=2.0, p=4, m=8)
    assert "note" in ex.update(t_w=1.0, p=4, m=2)
    assert ex.error is None and ex.png.startswith(b"\x89PNG")
