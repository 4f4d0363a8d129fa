"""Notebook 11's pictures and tables: the V placement, and each schedule against the optimum.

- :func:`placement_diagram`: which rank runs which stage, and the path of one micro-batch.
- :func:`compare_to_optimum`: for 1F1B, ZB-H1, ZB-H2, ZB-V and DualPipeV, the simulated step
  and peak memory, next to the fastest schedule the solver finds under the same memory.
- :func:`optimum_curve`: the optimal step for each memory limit (what memory buys).
- :func:`frontier_explorer`: the two above behind sliders (an :class:`Explorer`), with
  DualPipe (bidirectional, two pipelines: outside the search) as one more point.
- :func:`torch_orders`: each rank's order from torch's ``ScheduleZBVZeroBubble`` or
  ``ScheduleDualPipeV``, written in minipipe's actions, to compare with ours.

Costs are per rank's share of the model, in units of ``t_f``: ``t_b`` the whole backward and
``t_w`` the part of it that a split-backward schedule defers as ``W`` (as in the explorers of
:mod:`minipipe.course.widgets`); a V-placement chunk costs half. Memory is in micro-batches
of a rank's share (a V chunk stash counts one half; DualPipe's chunks are whole stages of
two pipelines, each a whole share, and its parameters are held twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..schedules import Schedule, make_schedule
from ..schedules.base import make_placement
from ..search import solve
from ..simulate import simulate
from .widgets import Explorer

__all__ = ["placement_diagram", "compare_to_optimum", "optimum_curve", "frontier_explorer",
           "torch_orders", "FRONTIER"]

FRONTIER = ["1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipev"]  #: the schedules compared
_COLOURS = {"1f1b": "#4c72b0", "zb-h1": "#dd8452", "zb-h2": "#55a868", "zb-v": "#c44e52",
            "dualpipev": "#8172b3"}


def placement_diagram(p: int, placement: str = "v", v: int = 2, ax: Any = None,
                      pipelines: int = 1) -> Any:
    """Ranks as rows, chunks as columns; each box is a stage; arrows follow one micro-batch
    (with ``pipelines = 2``, DualPipe: one micro-batch of each direction, red and blue).

    Returns:
        The matplotlib axes.
    """
    if ax is None:
        fig = Figure(figsize=(1.6 * v + 2.5, 0.7 * p + 1.0), layout="constrained")
        ax = fig.add_subplot()
    where = make_placement(placement, p, v)
    xy = [(1.6 * c, -0.8 * r) for r, c in where]
    per = p * v // pipelines  # stages of one pipeline
    for s, (x, y) in enumerate(xy):
        red = where[s][0] == where[0][0] if pipelines == 1 else s < per
        ax.add_patch(_box(x, y, s, red))
        name = f"stage {s}" if pipelines == 1 else f"stage {s}\n(= {s % per})" if s >= per \
            else f"stage {s}"
        ax.text(x, y, name, ha="center", va="center", fontsize=8 if s < per else 7)
    for s, ((xa, ya), (xb, yb)) in enumerate(zip(xy, xy[1:])):  # from box edge to box edge
        if (s + 1) % per == 0:
            continue  # the next stage starts another pipeline: no message
        dx, dy = xb - xa, yb - ya
        t = min(0.58 / abs(dx) if dx else 1.0, 0.28 / abs(dy) if dy else 1.0)
        ax.annotate("", (xb - t * dx, yb - t * dy), (xa + t * dx, ya + t * dy),
                    arrowprops={"arrowstyle": "-|>", "color": "#555555", "lw": 1})
    ax.set_yticks([-0.8 * r for r in range(p)], [f"rank {r}" for r in range(p)])
    ax.set_xticks([1.6 * c for c in range(v)], [f"chunk {c}" for c in range(v)])
    ax.set_xlim(-0.8, 1.6 * (v - 1) + 0.8)
    ax.set_ylim(-0.8 * (p - 1) - 0.5, 0.5)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    both = f", {pipelines} pipelines" if pipelines > 1 else ""
    ax.set_title(f"{placement} placement, p={p}, v={v}{both}: a micro-batch's path", fontsize=9,
                 loc="left")
    return ax


def _box(x: float, y: float, stage: int, first_rank: bool):
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch((x - 0.55, y - 0.25), 1.1, 0.5, boxstyle="round,pad=0.03",
                          facecolor="#c44e52" if first_rank else "#4c72b0", alpha=0.3,
                          edgecolor="black")


def _simulate(s: Schedule, t_b: float, t_w: float):
    """Simulate on rank-share costs (``t_f = 1``); chunks cost ``1/v`` (DualPipe's: 1)."""
    v, split = s.v // s.pipelines, s.split_backward
    return simulate(s, 1 / v, (t_b - (t_w if split else 0)) / v, (t_w / v) if split else None)


def _memory(s: Schedule, t_b: float, t_w: float) -> float:
    return max(_simulate(s, t_b, t_w).peak_pending_w) / (s.v // s.pipelines)


def compare_to_optimum(p: int, m: int, t_b: float = 2.0, t_w: float = 1.0,
                       names: Sequence[str] = FRONTIER, time_limit: float = 10.0
                       ) -> list[dict[str, Any]]:
    """Each schedule's simulated step and peak memory, and the optimum under that memory.

    The optimum is searched with the schedule's own placement and backward (1F1B: whole
    backward; the others split it), starting from the schedule itself, so it is never slower.
    ``dualpipev`` is skipped when ``m < 2p``.

    Returns:
        One dict per schedule: ``schedule, step, memory, optimum, gap`` (``step / optimum −
        1``), ``proven`` (the solver proved the optimum) and ``solver_s``.
    """
    rows = []
    for name in names:
        if name == "dualpipev" and m < 2 * p:
            continue
        s = make_schedule(name, p, m)
        step, memory = _simulate(s, t_b, t_w).step_time, _memory(s, t_b, t_w)
        split = s.split_backward
        res = solve(p, m, 1 / s.v, (t_b - (t_w if split else 0)) / s.v,
                    (t_w / s.v) if split else None, memory_limit=memory,
                    placement=s.placement_name, time_limit=time_limit, start_from=s)
        rows.append({"schedule": name, "step": step, "memory": memory,
                     "optimum": res.step_time, "gap": step / res.step_time - 1,
                     "proven": res.optimal, "solver_s": round(res.wall_s, 2)})
    return rows


def optimum_curve(p: int, m: int, t_b: float = 2.0, t_w: float = 1.0,
                  limits: Sequence[float] | None = None, placement: str = "loop",
                  time_limit: float = 10.0) -> list[tuple[float, float, bool]]:
    """``(memory limit, optimal step, proven)`` for each limit (default ``1, 2, …, 2p``)."""
    v = 2 if placement == "v" else 1
    out = []
    for limit in limits or range(1, 2 * p + 1):
        res = solve(p, m, 1 / v, (t_b - t_w) / v, t_w / v, memory_limit=limit,
                    placement=placement, time_limit=time_limit)
        out.append((float(limit), res.step_time, res.optimal))
    return out


def frontier_explorer(p: int = 3, m: int = 6, t_b: float = 2.0, t_w: float = 1.0) -> Explorer:
    """Move ``p``, ``m`` and the costs; see each schedule against the optimum curve.

    Chart: the optimal step for each memory limit (loop placement, split backward), and each
    schedule of :data:`FRONTIER` as a point at its own peak memory. Panel: the table of
    :func:`compare_to_optimum`. Each redraw runs the solver a dozen times, at most 2 s each
    (what it has not proven by then is the best found; the panel's numbers are then upper
    bounds on the optimum).
    """
    style = {"description_width": "initial"}
    controls = {
        "p": widgets.IntSlider(value=p, min=2, max=4, description="p (ranks)", style=style,
                               continuous_update=False),
        "m": widgets.IntSlider(value=m, min=2, max=10, description="m (micro-batches)",
                               style=style, continuous_update=False),
        "t_b": widgets.FloatSlider(value=t_b, min=1.0, max=3.0, step=0.5, description="t_b / t_f",
                                   style=style, continuous_update=False),
        "t_w": widgets.FloatSlider(value=t_w, min=0.5, max=1.5, step=0.5,
                                   description="t_w / t_f (W part of t_b)", style=style,
                                   continuous_update=False),
    }

    def draw(vals: dict[str, Any], fig: Figure) -> dict[str, Any]:
        p, m, t_b, t_w = vals["p"], vals["m"], vals["t_b"], min(vals["t_w"], vals["t_b"] - 0.5)
        rows = compare_to_optimum(p, m, t_b, t_w, time_limit=2.0)
        curve = optimum_curve(p, m, t_b, t_w, time_limit=2.0)
        ax = fig.add_subplot()
        ax.step([c[0] for c in curve], [c[1] for c in curve], where="post", color="black",
                lw=1.2, label="optimum (search, loop placement)")
        for row in rows:
            ax.plot(row["memory"], row["step"], "o", color=_COLOURS[row["schedule"]],
                    label=row["schedule"])
        out = {}
        if p % 2 == 0 and m % 2 == 0 and m >= 2 * p:  # DualPipe: outside the search
            dual = make_schedule("dualpipe", p, m)
            step, memory = _simulate(dual, t_b, t_w).step_time, _memory(dual, t_b, t_w)
            ax.plot(memory, step, "s", color="#937860", label="dualpipe (2× parameters)")
            out["dualpipe"] = (f"step {step:g} at {memory:g} mb, parameters twice; the search "
                               "does not place two pipelines")
        ax.axhline(m * (1 + t_b), color="#999999", ls=":", lw=1, label="no bubble: m(t_f + t_b)")
        ax.set_xlabel("peak activation memory per rank (micro-batches)")
        ax.set_ylabel("step time (t_f)")
        ax.legend(fontsize=7, frameon=False, loc="upper right")
        ax.set_title(f"p={p} m={m} t_b={t_b:g} t_w={t_w:g} (simulated)", fontsize=9, loc="left")
        return {**{r["schedule"]: f"step {r['step']:g} at {r['memory']:g} mb; optimum there "
                                  f"{r['optimum']:g} ({100 * r['gap']:.0f}% slower)"
                   for r in rows}, **out}

    return Explorer(controls, draw, title="against the optimum (simulated)", figsize=(7.0, 3.2))


def torch_orders(name: str, p: int, m: int) -> tuple[list[list[tuple[str, int, int]]], list[int]]:
    """torch 2.13's per-rank order for ``"zb-v"`` or ``"dualpipev"``, as ``(kind, mb, chunk)``.

    Calls the schedule class's own generator (``_calculate_single_rank_operations``, what
    fills its ``pipeline_order``) on a bare instance: no process group or stage is needed.
    Written in minipipe's terms: torch's ``I`` (input gradient) is ``B``; a ``FULL_BACKWARD``
    is ``B`` directly followed by ``W``; an ``OVERLAP_F_B`` unit is its forward, then its
    backward; ``None`` (an idle tick in torch's grid) is dropped; the chunk is 0 for stage
    ``rank`` and 1 for stage ``2p − 1 − rank`` (the V placement).

    Returns:
        The orders, and per rank the number of overlapped F&B units.
    """
    from torch.distributed.pipelining import schedules

    cls = {"zb-v": schedules.ScheduleZBVZeroBubble, "dualpipev": schedules.ScheduleDualPipeV}[name]
    bare = cls.__new__(cls)
    bare.pp_group_size, bare._n_microbatches = p, m
    bare.num_stages = bare._num_stages = 2 * p
    orders, pairs = [], []
    for r in range(p):
        out, units = [], 0
        for op in bare._calculate_single_rank_operations(r):
            if op is None:
                continue
            units += bool(op.sub_actions)
            for a in op.sub_actions or (op,):
                chunk, kind = (0 if a.stage_index == r else 1), a.computation_type.value
                steps = ["B", "W"] if kind == "B" else ["B" if kind == "I" else kind]
                out += [(k, a.microbatch_index, chunk) for k in steps]
        orders.append(out)
        pairs.append(units)
    return orders, pairs
