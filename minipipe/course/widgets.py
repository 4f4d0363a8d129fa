"""Interactive explorers for the notebooks: move a control, see the schedule or the memory change.

The convention every explorer in the course follows (notebooks 05–10 add theirs the same way):

1. An explorer is an :class:`Explorer`: a dict of ipywidgets *controls* (name -> a widget with
   a ``.value``) and a *draw* function ``draw(values, fig) -> figures``. ``values`` maps each
   control's name to its value; ``fig`` is a fresh :class:`matplotlib.figure.Figure` to draw
   on; ``figures`` is a dict (name -> number, list or text) shown in the HTML panel next to the
   chart. A draw function that raises ``ValueError`` (``ScheduleError`` and ``ConfigError``
   are ones) puts the error text in the panel instead of a chart: learners see *why* a
   setting is invalid, and the explorer keeps working.
2. ``explorer.update(**values)`` sets controls and redraws once, synchronously, and returns the
   figures: tests and notebooks drive an explorer without a browser. Moving a slider calls the
   same code.
3. ``explorer.widget`` is the ``VBox`` to display (controls, then chart and panel side by
   side); an explorer left as the last expression of a cell displays it. ``explorer.figure``
   is the last chart, ``explorer.figures`` the last panel values, ``explorer.error`` the last
   error text (``None`` when the setting was valid), ``explorer.html`` the panel's HTML.
4. Charts are plain ``Figure`` objects, never registered with pyplot: no figure piles up
   (no "too many open figures" warning), nothing is shown twice by the inline backend. The
   chart goes into the Output widget as a PNG by setting its ``outputs`` (never through a
   ``with output:`` block): it renders under any matplotlib backend, an error leaves no stale
   chart, and headless runs (nbmake) do not stall on output capture.
5. Optional hooks: ``adjust(explorer, values)`` runs before each draw to fix control ranges
   that depend on other controls (it may change values; no redraw is triggered meanwhile);
   ``visible(values) -> set of control names`` hides the controls that do not apply.

Costs in the explorers are in units of ``t_f`` (one forward of one micro-batch on one rank's
share of the model), as in :mod:`minipipe.formulas`.
"""

from __future__ import annotations

import base64
import html as _html
import io
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from .. import formulas
from ..plot import plot_timeline
from ..schedules import SCHEDULES, make_schedule
from ..simulate import simulate

__all__ = ["Explorer", "schedule_explorer", "memory_explorer", "figures_table"]

DrawFn = Callable[[dict[str, Any], Figure], dict[str, Any]]


def _fmt(value: Any) -> str:
    """A panel cell: floats to 4 significant digits, lists and text as they are."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def figures_table(figures: dict[str, Any], title: str = "") -> str:
    """The HTML panel: one row per figure, name then value (values formatted by ``_fmt``)."""
    rows = "".join(
        f"<tr><td style='padding:1px 8px 1px 0'>{_html.escape(str(k))}</td>"
        f"<td style='font-family:monospace'>{_html.escape(_fmt(v))}</td></tr>"
        for k, v in figures.items())
    head = f"<b>{_html.escape(title)}</b>" if title else ""
    return f"<div>{head}<table style='font-size:12px'>{rows}</table></div>"


def _error_html(text: str) -> str:
    return ("<div style='color:#b00020'><b>This setting cannot run:</b>"
            f"<pre style='white-space:pre-wrap;font-size:11px'>{_html.escape(text)}</pre></div>")


class Explorer:
    """Controls -> a callback that redraws a matplotlib chart and an HTML figures panel.

    Args:
        controls: name -> ipywidget with a ``value`` (sliders, dropdowns, ...), in display order.
        draw: ``draw(values, fig) -> figures`` (see the module docstring).
        title: shown above the panel's table.
        figsize: size of each fresh figure, inches.
        adjust: ``adjust(explorer, values)``: fix dependent control ranges before drawing.
        visible: ``visible(values) -> names``: the controls to show (default: all).
        dpi: resolution of the PNG shown in the Output widget.
    """

    def __init__(self, controls: dict[str, widgets.ValueWidget], draw: DrawFn, *, title: str = "",
                 figsize: tuple[float, float] = (9.0, 3.0),
                 adjust: Callable[[Explorer, dict[str, Any]], None] | None = None,
                 visible: Callable[[dict[str, Any]], set[str]] | None = None,
                 dpi: int = 90) -> None:
        self.controls = dict(controls)
        self._draw, self._adjust, self._visible = draw, adjust, visible
        self.title, self.figsize, self.dpi = title, figsize, dpi
        self.output = widgets.Output(layout=widgets.Layout(min_width="480px"))
        self.panel = widgets.HTML(layout=widgets.Layout(min_width="260px"))
        self.widget = widgets.VBox([
            widgets.HBox(list(self.controls.values()),
                         layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([self.output, self.panel]),
        ])
        self.figure: Figure | None = None
        self.figures: dict[str, Any] = {}
        self.error: str | None = None
        self.png: bytes | None = None
        self._holding = False
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self.redraw()

    # -- driving it -----------------------------------------------------------------
    @property
    def values(self) -> dict[str, Any]:
        """Current value of every control, by name."""
        return {name: c.value for name, c in self.controls.items()}

    @property
    def html(self) -> str:
        """The panel's HTML (figures table, or the error text)."""
        return self.panel.value

    def update(self, **values: Any) -> dict[str, Any]:
        """Set controls by name, redraw once, return the panel's figures (``{}`` on error).

        Raises:
            TypeError: a name that is not one of the controls.
        """
        unknown = set(values) - set(self.controls)
        if unknown:
            raise TypeError(f"no control named {sorted(unknown)}; controls: {list(self.controls)}")
        self._holding = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._holding = False
        return self.redraw()

    def _on_change(self, change: dict) -> None:
        if not self._holding:
            self.redraw()

    def redraw(self) -> dict[str, Any]:
        """Draw the current setting on a fresh figure; update chart, panel and ``figures``."""
        self._holding = True
        try:
            if self._adjust is not None:
                self._adjust(self, self.values)
        finally:
            self._holding = False
        values = self.values
        if self._visible is not None:
            shown = self._visible(values)
            for name, c in self.controls.items():
                c.layout.display = "" if name in shown else "none"
        fig = Figure(figsize=self.figsize, layout="constrained")
        try:
            figures = self._draw(values, fig)
        except ValueError as err:  # ScheduleError, ConfigError: an invalid setting, explained
            self.figure, self.figures, self.error, self.png = None, {}, str(err), None
            self.panel.value = _error_html(str(err))
            self._show(None)
            return {}
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi)
        self.figure, self.figures, self.error, self.png = fig, figures, None, buf.getvalue()
        self.panel.value = figures_table(figures, self.title)
        self._show(self.png)
        return figures

    def _show(self, png: bytes | None) -> None:
        """Put the chart in the Output widget, replacing the last one (none for an error).

        The widget's ``outputs`` are set directly, in one state update: no ``with output:``
        capture (whose stream flushes can stall a busy kernel) and no deferred clear that
        could leave a stale chart next to an error.
        """
        if png is None:
            self.output.outputs = ()
            return
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": base64.b64encode(png).decode("ascii"),
                                         "text/plain": f"<{self.title or 'explorer'} chart>"}},)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


# ----------------------------------------------------------------------- schedule explorer

_STYLE = {"description_width": "initial"}


def _int(description: str, value: int, lo: int, hi: int) -> widgets.IntSlider:
    return widgets.IntSlider(value=value, min=lo, max=hi, description=description,
                             style=_STYLE, continuous_update=False)


def _float(description: str, value: float, lo: float, hi: float,
           step: float) -> widgets.FloatSlider:
    return widgets.FloatSlider(value=value, min=lo, max=hi, step=step, description=description,
                               style=_STYLE, continuous_update=False)


_SPLIT = {"zb-h1", "zb-h2", "zb-v", "dualpipev", "dualpipe"}  # backward split into B and W
_V_SHAPE = {"zb-v", "dualpipev", "dualpipe"}  # two chunks per rank on the V placement


def _share(name: str, v: int) -> int:
    """A rank's share over one chunk's: ``v``, but 1 for DualPipe, whose two chunks are whole
    stages of two pipelines (each micro-batch visits one of them)."""
    return 1 if name == "dualpipe" else v


def _chunks(name: str, v: int) -> int:
    """Chunks per rank the schedule uses: ``v`` for interleaved, 2 for the V shapes, else 1."""
    return v if name == "interleaved" else 2 if name in _V_SHAPE else 1


def _costs(name: str, p: int, v: int, t_b: float, t_w: float, slow: int, factor: float):
    """Per-stage costs for :func:`simulate`, per rank's share as in :mod:`minipipe.formulas`.

    ``t_b`` is the whole backward (COURSE notation); for the split-backward schedules (zb-h1,
    zb-h2, zb-v, dualpipev) ``t_w`` of it is the W part, so B costs ``t_b − t_w``. Chunks
    (interleaved, V shapes) cost ``1/v`` of a rank's share each (DualPipe's: a whole share).
    """
    stages, div = p * v, _share(name, v)
    split = t_w if name in _SPLIT else 0.0
    base = [1.0 / div, (t_b - split) / div, split / div]
    return [[c * (factor if s == slow else 1.0) for s in range(stages)] for c in base]


def _placement_text(sched) -> str:
    """Which stages each rank runs, e.g. ``rank 0: 0, 3 · rank 1: 1, 2`` (V placement)."""
    return " · ".join(f"rank {r}: " + ", ".join(str(sched.stage(r, c)) for c in range(sched.v))
                      for r in range(sched.p))


def _formula_figures(sched, name: str, t_b: float, t_w: float) -> dict[str, Any]:
    """The closed forms next to the simulated figures (equal stages; costs per rank's share)."""
    p, m, v = sched.p, sched.m, sched.v
    b_in = t_b - t_w
    out: dict[str, Any] = {
        "formula: step time": float(formulas.step_time(name, p, m, 1.0, b_in, t_w, v))}
    if name in ("gpipe", "1f1b", "interleaved"):
        out["formula: (p−1)/(v·m+p−1)"] = formulas.bubble_fraction(p, m, v)
        out["formula: (p−1)/(v·m)"] = formulas.bubble_overhead(p, m, v)
    else:
        out["formula: 1 − utilization"] = 1 - formulas.utilization(name, p, m, 1.0, b_in, t_w, v)
    out["formula: peak in-flight"] = formulas.peak_inflight(name, p, m, v)
    if sched.pipelines > 1:
        out["formula: 2(p−1)·m (two pipelines of m/2)"] = formulas.messages(
            p, m, v, "v", sched.pipelines)
    elif sched.placement_name == "v":
        out["formula: 2·v·(p−1)·m (V: the turns stay on one rank)"] = formulas.messages(
            p, m, v, "v")
    else:
        out["formula: 2(p·v−1)·m"] = formulas.messages(p, m, v)
    return out


def schedule_explorer(schedule: str = "gpipe", p: int = 4, m: int = 8, v: int = 2,
                      t_b: float = 2.0, t_w: float = 1.0, slow_stage: int = 0,
                      slow_factor: float = 1.0) -> Explorer:
    """Pick a schedule, ``p``, ``m`` (``v``), the cost ratios and a slow stage; see the timeline.

    The chart is the simulated timeline (:func:`~minipipe.plot.plot_timeline`); the panel has
    the step time, both bubble figures, peak in-flight micro-batches per rank and the message
    count, each next to its closed form (:mod:`minipipe.formulas`) when the stages are equal.
    Times are in units of ``t_f``. ``t_b`` is the whole backward; for the split-backward
    schedules (``zb-h1``, ``zb-h2``, ``zb-v``, ``dualpipev``) its part ``t_w`` is the deferred
    weight gradient W (so B costs ``t_b − t_w``). ``zb-v`` and ``dualpipev`` run two chunks per
    rank on the V placement (the panel lists each rank's stages); ``dualpipe`` too, one stage
    of each direction, each a whole rank's share. An invalid setting (interleaved with
    ``m % p != 0``, dualpipev with ``m < 2p``, dualpipe with an odd p) shows the error text.

    Returns:
        An :class:`Explorer` with controls ``schedule, p, m, v, t_b, t_w, slow_stage,
        slow_factor``; ``update(**values)`` returns the panel's figures.
    """
    controls = {
        "schedule": widgets.Dropdown(options=list(SCHEDULES), value=schedule,
                                     description="schedule", style=_STYLE),
        "p": _int("p (ranks)", p, 1, 64),
        "m": _int("m (micro-batches)", m, 1, 1024),
        "v": _int("v (chunks/rank)", v, 2, 4),
        "t_b": _float("t_b / t_f", t_b, 0.5, 4.0, 0.25),
        "t_w": _float("t_w / t_f (W; backward = t_b + t_w)", t_w, 0.0, 2.0, 0.25),
        "slow_stage": _int("slow stage", slow_stage, 0, 255),
        "slow_factor": _float("slow ×", slow_factor, 1.0, 4.0, 0.25),
    }

    def adjust(ex: Explorer, vals: dict[str, Any]) -> None:
        stages = vals["p"] * _chunks(vals["schedule"], vals["v"])
        ex.controls["slow_stage"].max = stages - 1  # clamps the value too
        ex.controls["t_w"].max = vals["t_b"]

    def visible(vals: dict[str, Any]) -> set[str]:
        names = {"schedule", "p", "m", "t_b", "slow_stage", "slow_factor"}
        if vals["schedule"] == "interleaved":
            names.add("v")
        if vals["schedule"] in _SPLIT:
            names.add("t_w")
        return names

    def draw(vals: dict[str, Any], fig: Figure) -> dict[str, Any]:
        name, p, m = vals["schedule"], vals["p"], vals["m"]
        v = _chunks(name, vals["v"])
        t_b, t_w = vals["t_b"], (min(vals["t_w"], vals["t_b"]) if name in _SPLIT else 0.0)
        factor = vals["slow_factor"]
        sched = make_schedule(name, p, m, v)  # ValueError for m % p with interleaved
        tf, tb, tw = _costs(name, p, v, t_b, t_w, vals["slow_stage"], factor)
        tl = simulate(sched, tf, tb, tw)
        ax = fig.add_subplot()
        plot_timeline(tl, ax=ax, title=tl.title(), labels=p * m * v <= 96)
        ax.set_xlabel("time (units of t_f)")
        figures: dict[str, Any] = {
            "step time": tl.step_time,
            "bubble, share of the step": tl.bubble_fraction,
            "bubble, relative to useful work": tl.bubble_overhead,
            "peak in-flight per rank": tl.peak_inflight,
            "messages per step": tl.messages,
        }
        if name in _SPLIT:
            figures["peak awaiting W per rank"] = tl.peak_pending_w
        if sched.placement_name != "loop":
            figures["placement"] = f"{sched.placement_name}: {_placement_text(sched)}"
        if factor == 1.0:  # the closed forms assume equal stages
            figures.update(_formula_figures(sched, name, t_b, t_w))
        else:
            figures["note"] = (f"stage {vals['slow_stage']} is {factor:g}× slower: "
                               "closed forms assume equal stages")
        return figures

    return Explorer(controls, draw, title="simulated (times in units of t_f)",
                    figsize=(9.0, 1.3 + 0.42 * min(p, 16)), adjust=adjust, visible=visible)


# ------------------------------------------------------------------------- memory explorer


def memory_explorer(schedule: str = "1f1b", p: int = 4, m: int = 8, v: int = 2,
                    bytes_per_mb: int = 0) -> Explorer:
    """Peak activation memory per rank, predicted from the schedule's order.

    Bars: the most micro-batches whose activations a rank holds at once (forward done,
    backward — for the split-backward schedules, its W — not yet). For ``interleaved`` and the
    V shapes (``zb-v``, ``dualpipev``: two chunks) a rank holds (chunk, micro-batch) pairs,
    each ``1/v`` of its layers (``dualpipe``: each a whole share, 2× parameters); the bars
    count them in micro-batch units (pairs ÷ ``v``, ÷ 1 for ``dualpipe``) so
    all schedules compare on one axis, and the panel gives the raw pairs too. The dashed
    line is GPipe's ``m``. With ``bytes_per_mb`` (activation bytes one micro-batch leaves on
    one rank's share of the model, e.g. ``RunResult.activation_bytes_per_mb``) a right axis
    and the panel show bytes.

    Returns:
        An :class:`Explorer` with controls ``schedule, p, m, v, bytes_per_mb``.
    """
    controls = {
        "schedule": widgets.Dropdown(options=["gpipe", "1f1b", "interleaved", "zb-h1", "zb-h2",
                                              "zb-v", "dualpipev", "dualpipe"], value=schedule,
                                     description="schedule", style=_STYLE),
        "p": _int("p (ranks)", p, 1, 64),
        "m": _int("m (micro-batches)", m, 1, 1024),
        "v": _int("v (chunks/rank)", v, 2, 4),
        "bytes_per_mb": widgets.BoundedIntText(value=bytes_per_mb, min=0, max=10**15,
                                               description="bytes / micro-batch (0: none)",
                                               style=_STYLE),
    }

    def visible(vals: dict[str, Any]) -> set[str]:
        names = {"schedule", "p", "m", "bytes_per_mb"}
        return names | {"v"} if vals["schedule"] == "interleaved" else names

    def draw(vals: dict[str, Any], fig: Figure) -> dict[str, Any]:
        name, p, m = vals["schedule"], vals["p"], vals["m"]
        v = _chunks(name, vals["v"])
        per_mb = vals["bytes_per_mb"]
        split = name in _SPLIT  # then a micro-batch is held until its W
        div = _share(name, v)
        tl = simulate(make_schedule(name, p, m, v), 1.0 / div, (1.0 if split else 2.0) / div,
                      1.0 / div if split else None)
        stashes = tl.peak_pending_w  # (chunk, micro-batch) pairs; peak_inflight without W
        units = [s / div for s in stashes]  # micro-batches of a rank's share
        ax = fig.add_subplot()
        ax.bar(range(p), units, color="#4c72b0", width=0.6, label=f"{name}: peak held")
        ax.axhline(m, color="#c44e52", ls="--", lw=1, label=f"GPipe: m = {m}")
        ticks = range(0, p, max(1, p // 16))
        ax.set_xticks(ticks, [f"rank {r}" for r in ticks])
        ax.set_ylabel("micro-batches held")
        ax.set_ylim(0, max(max(units), m) * 1.4)  # room for the legend above the bars
        ax.set_title(f"{name} p={p} m={m}" + (f" v={v}" if v > 1 else "")
                     + ": peak activations per rank (predicted)", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right", frameon=False, ncol=2)
        figures: dict[str, Any] = {"peak micro-batches held": units}
        if v > 1:
            figures["peak (chunk, micro-batch) pairs"] = stashes
        figures["formula"] = formulas.peak_pending_w(name, p, m, v)
        one_f = formulas.peak_inflight("1f1b", p, m)[0]
        figures["rank 0 vs 1F1B's min(p, m)"] = units[0] / one_f
        if per_mb:
            ax.secondary_yaxis("right", functions=(lambda n: n * per_mb, lambda b: b / per_mb)
                               ).set_ylabel("bytes")
            figures["peak bytes per rank"] = [int(round(u * per_mb)) for u in units]
        return figures

    return Explorer(controls, draw, title="predicted from the schedule order",
                    figsize=(7.0, 3.0), visible=visible)
