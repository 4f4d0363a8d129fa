"""The explorers redraw what the simulator and the formulas say, and survive invalid settings.

Each explorer is driven through ``update(**values)`` (the same callback a slider calls), with
matplotlib's Agg backend and no kernel. The tests read back what was drawn (rows, bars) and
the panel's figures, and compare them with :func:`minipipe.simulate.simulate` for the same
setting.
"""

from __future__ import annotations

import base64
import warnings

import matplotlib

matplotlib.use("Agg")

import ipywidgets as widgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minipipe import formulas  # noqa: E402
from minipipe.schedules import make_schedule  # noqa: E402
from minipipe.simulate import simulate  # noqa: E402
from minipipe.course.widgets import (Explorer, figures_table, memory_explorer,  # noqa: E402
                              schedule_explorer)


def expected_timeline(name, p, m, v=1, t_b=2.0, t_w=0.0, slow=0, factor=1.0):
    """The simulation the schedule explorer should show, built independently of widgets.py."""
    v = v if name == "interleaved" else 1
    t_w = t_w if name == "zb-h1" else 0.0
    stages = p * v

    def cost(c):
        return [c / v * (factor if s == slow else 1.0) for s in range(stages)]

    return simulate(make_schedule(name, p, m, v), cost(1.0), cost(t_b - t_w), cost(t_w))


def bars_drawn(ax) -> int:
    """Number of action bars in a timeline chart (F, B and W collections)."""
    return sum(len(c.get_paths()) for c in ax.collections if c.get_label() in ("F", "B", "W"))


SETTINGS = [
    dict(schedule="gpipe", p=4, m=16),
    dict(schedule="1f1b", p=3, m=5, t_b=3.0),
    dict(schedule="naive", p=2, m=1),
    dict(schedule="interleaved", p=4, m=8, v=2),
    dict(schedule="interleaved", p=2, m=4, v=3, t_b=1.5),
    dict(schedule="zb-h1", p=4, m=8, t_b=2.0, t_w=1.0),
    dict(schedule="1f1b", p=4, m=8, slow_stage=2, slow_factor=2.0),
]


@pytest.fixture(scope="module")
def explorer():
    return schedule_explorer()


def _name(setting: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in setting.items())


@pytest.mark.parametrize("setting", SETTINGS, ids=_name)
def test_schedule_explorer_draws_the_simulated_timeline(explorer, setting):
    values = dict(v=2, t_b=2.0, t_w=1.0, slow_stage=0, slow_factor=1.0) | setting
    figures = explorer.update(**values)
    tl = expected_timeline(values["schedule"], values["p"], values["m"], values["v"], values["t_b"],
                           values["t_w"], values["slow_stage"], values["slow_factor"])
    assert explorer.error is None
    ax = explorer.figure.axes[0]
    assert len(ax.get_yticks()) == values["p"]  # one row per rank
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"rank {r}" for r in range(values["p"])]
    assert bars_drawn(ax) == len(tl.events)  # one bar per action
    assert figures["step time"] == pytest.approx(tl.step_time)
    assert figures["bubble, share of the step"] == pytest.approx(tl.bubble_fraction)
    assert figures["bubble, relative to useful work"] == pytest.approx(tl.bubble_overhead)
    assert figures["peak in-flight per rank"] == tl.peak_inflight
    assert figures["messages per step"] == tl.messages
    for key in ("step time", "bubble, share of the step", "bubble, relative to useful work"):
        assert f"{figures[key]:.4g}" in explorer.html  # the panel shows the same numbers
    assert str(tl.messages) in explorer.html
    assert explorer.png and explorer.png.startswith(b"\x89PNG")
    (shown,) = explorer.output.outputs  # exactly one chart, the current one
    assert base64.b64decode(shown["data"]["image/png"]) == explorer.png


def test_schedule_explorer_shows_the_formulas_on_equal_stages(explorer):
    figures = explorer.update(schedule="gpipe", p=4, m=16, t_b=2.0, slow_factor=1.0)
    assert figures["formula: (p−1)/(v·m+p−1)"] == pytest.approx(3 / 19)
    assert figures["formula: (p−1)/(v·m)"] == pytest.approx(3 / 16)
    assert figures["bubble, share of the step"] == pytest.approx(3 / 19)
    assert figures["bubble, relative to useful work"] == pytest.approx(3 / 16)
    assert figures["formula: step time"] == pytest.approx(57.0)
    figures = explorer.update(schedule="interleaved", p=4, m=8, v=4)
    assert figures["formula: 2(p·v−1)·m"] == formulas.messages(4, 8, 4)
    assert figures["messages per step"] == formulas.messages(4, 8, 4)
    slow = explorer.update(schedule="1f1b", slow_stage=1, slow_factor=2.0)
    assert not any(k.startswith("formula") for k in slow) and "equal stages" in slow["note"]


def test_schedule_explorer_reports_m_not_multiple_of_p_in_the_panel(explorer):
    explorer.update(schedule="gpipe", p=4, m=8, slow_factor=1.0)
    figures = explorer.update(schedule="interleaved", p=4, m=6, v=2)
    assert figures == {}
    assert explorer.figure is None and explorer.png is None
    assert explorer.output.outputs == ()  # no stale chart next to the error text
    assert "multiple" in explorer.error and "m=6" in explorer.error
    assert "cannot run" in explorer.html and "m=6" in explorer.html
    assert explorer.update(m=8)["messages per step"] == formulas.messages(4, 8, 2)  # recovers
    assert explorer.error is None


def test_schedule_explorer_shows_only_the_controls_that_apply(explorer):
    def shown():
        return {n for n, c in explorer.controls.items() if c.layout.display != "none"}

    explorer.update(schedule="gpipe", p=4, m=8)
    assert "v" not in shown() and "t_w" not in shown()
    explorer.update(schedule="interleaved")
    assert "v" in shown() and "t_w" not in shown()
    explorer.update(schedule="zb-h1")
    assert "t_w" in shown() and "v" not in shown()


def test_schedule_explorer_keeps_the_slow_stage_in_range(explorer):
    explorer.update(schedule="1f1b", p=4, m=8, slow_stage=3, slow_factor=2.0)
    explorer.update(p=2)
    assert explorer.controls["slow_stage"].max == 1
    assert explorer.values["slow_stage"] <= 1
    explorer.update(schedule="interleaved", p=2, m=4, v=3)
    assert explorer.controls["slow_stage"].max == 5  # p·v stages
    explorer.update(slow_factor=1.0)


def test_moving_a_control_redraws(explorer):
    explorer.update(schedule="gpipe", p=2, m=2, slow_factor=1.0)
    explorer.controls["m"].value = 5  # what a slider does
    expected = simulate(make_schedule("gpipe", 2, 5)).step_time
    assert explorer.figures["step time"] == pytest.approx(expected)


def test_update_rejects_unknown_controls(explorer):
    with pytest.raises(TypeError, match="no control named"):
        explorer.update(stages=3)


def test_redraws_leak_no_figures_and_warn_nothing():
    before = set(plt.get_fignums())
    ex = schedule_explorer(p=2, m=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in range(1, 23):  # more than pyplot's 20-figure warning threshold
            ex.update(m=m)
    assert set(plt.get_fignums()) == before


def test_explorer_is_a_displayable_widget(explorer):
    assert isinstance(explorer.widget, widgets.VBox)
    assert isinstance(explorer.output, widgets.Output)
    assert set(explorer.controls.values()) <= set(explorer.widget.children[0].children)
    assert hasattr(explorer, "_ipython_display_")


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1),
                                        ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 4)])
def test_memory_explorer_bars_are_the_predicted_peaks(name, p, m, v):
    ex = memory_explorer(schedule=name, p=p, m=m, v=v if v > 1 else 2, bytes_per_mb=1000)
    figures = ex.figures
    held = simulate(make_schedule(name, p, m, v)).peak_inflight  # (chunk, micro-batch) pairs
    ax = ex.figure.axes[0]
    bars = ax.containers[0]
    assert len(bars) == p
    assert [b.get_height() for b in bars] == pytest.approx([h / v for h in held])
    assert figures["formula"] == formulas.peak_inflight(name, p, m, v) == held
    assert figures["peak bytes per rank"] == [round(h / v * 1000) for h in held]
    assert figures["rank 0 vs 1F1B's min(p, m)"] == pytest.approx(held[0] / v / min(p, m))
    assert ax.lines[0].get_ydata()[0] == m  # GPipe's m, for comparison


def test_memory_explorer_interleaved_matches_the_rule_of_thumb():
    figures = memory_explorer(schedule="interleaved", p=4, m=16, v=2).figures
    assert figures["rank 0 vs 1F1B's min(p, m)"] == pytest.approx(
        formulas.activation_memory_ratio_interleaved(4, 2))


def test_memory_explorer_without_bytes_and_with_an_invalid_setting():
    ex = memory_explorer(schedule="gpipe", p=3, m=4)
    assert "peak bytes per rank" not in ex.figures
    assert ex.figures["peak micro-batches held"] == [4, 4, 4]
    assert ex.update(schedule="interleaved", m=4) == {}  # 4 % 3 != 0
    assert "multiple" in ex.error and "cannot run" in ex.html
    pairs = ex.update(m=6)["peak (chunk, micro-batch) pairs"]
    assert pairs == formulas.peak_inflight("interleaved", 3, 6, 2)


def test_a_custom_explorer_follows_the_convention():
    def draw(values, fig):
        if values["n"] == 0:
            raise ValueError("n must be positive")
        ax = fig.add_subplot()
        ax.bar(range(values["n"]), [1] * values["n"])
        return {"n squared": values["n"] ** 2}

    ex = Explorer({"n": widgets.IntSlider(value=2, min=0, max=5)}, draw, title="squares")
    assert ex.figures == {"n squared": 4}
    assert ex.update(n=3) == {"n squared": 9} and "squares" in ex.html
    assert ex.update(n=0) == {} and ex.error == "n must be positive"
    assert figures_table({"x": 0.123456, "y": [1, 2.5]}).count("<tr>") == 2


def test_in_a_kernel_the_chart_shows_and_an_invalid_setting_clears_it():
    """Through a real kernel (nbclient keeps the Output widget's state as a front-end would)."""
    import nbformat
    from nbclient import NotebookClient

    def chart_outputs(cells: list[str]) -> list:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
        NotebookClient(nb, timeout=120, kernel_name="python3").execute()
        state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
        (outputs,) = [v["state"]["outputs"] for v in state.values()
                      if v["model_name"] == "OutputModel"]
        return outputs

    start = ["from minipipe.course.widgets import schedule_explorer",
             "ex = schedule_explorer(p=4, m=8)\nex", "ex.update(m=5);"]
    shown = chart_outputs(start)
    assert len(shown) == 1 and "image/png" in shown[0]["data"]
    invalid = "ex.update(schedule='interleaved', m=6);"
    assert chart_outputs(start + [invalid]) == []  # no stale chart beside the error text


def test_explorers_take_cluster_sizes():
    """p = 64, m = 1024 (half a million actions for interleaved v = 4): the schedule explorer
    shows the simulated step next to its closed form, the chart is drawn as an image."""
    from minipipe import formulas

    ex = schedule_explorer()
    figures = ex.update(schedule="interleaved", p=64, m=1024, v=4, t_b=2.0)
    assert figures["step time"] == pytest.approx(formulas.step_time("interleaved", 64, 1024, 1, 2,
                                                                    v=4))
    assert memory_explorer().update(schedule="zb-v", p=64, m=1024)["peak micro-batches held"][0] \
        == formulas.peak_pending_w("zb-v", 64, 1024)[0] / 2


def test_large_timeline_is_drawn_as_an_image_of_the_right_kinds():
    import matplotlib

    matplotlib.use("Agg")
    from minipipe import make_schedule, plot_timeline, simulate
    from minipipe.plot import _RASTER, RASTER_ABOVE

    tl = simulate(make_schedule("zb-h1", 16, 128), 1, 1, 1)
    assert len(tl.events) > RASTER_ABOVE
    ax = plot_timeline(tl)
    image = ax.images[0].get_array()
    assert image.shape[:2] == (16, 1200)
    colours = {tuple(np.round(px, 3)) for px in image.reshape(-1, 3)}
    want = {tuple(np.round(matplotlib.colors.to_rgb(c), 3)) for c in _RASTER.values()}
    assert want <= colours  # F, B and W all visible
    # rank 15 starts its first forward after 15 forwards upstream: idle on its left edge
    assert tuple(np.round(image[15, 0], 3)) not in want
