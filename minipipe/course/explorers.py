"""Explorers for notebooks 06–08: partitioning, activation checkpointing, zero-bubble.

They follow the convention of :mod:`minipipe.course.widgets` (read its docstring): each function
returns an :class:`~minipipe.course.widgets.Explorer`, ``explorer.update(**values)`` redraws once and
returns the figures of the panel, and ``explorer.widget`` is what a notebook displays.

- :func:`partition_explorer`: make one layer slower; see how the equal-layer split and the
  balanced split divide the work, which stage is the bottleneck, and the step time.
- :func:`checkpoint_explorer`: pick the stages to checkpoint; see activation memory per rank
  saved and step time added, from a model's measured bytes and times.
- :func:`zb_explorer`: move ``t_w``; see 1F1B and ZB-H1 timelines and both bubbles.

And one static picture for notebook 08: :func:`grid_diagram`, the ranks of data × pipeline
parallelism and who talks to whom.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from .. import formulas
from ..partition import Partition, balanced, split_evenly
from ..plot import plot_timeline
from ..schedules import make_schedule
from ..simulate import simulate
from .widgets import Explorer

__all__ = ["partition_explorer", "checkpoint_explorer", "zb_explorer", "stage_step_time",
           "grid_groups", "grid_diagram"]

_STYLE = {"description_width": "initial"}
_STAGE_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
                  "#8c8c8c"]


def _int(description: str, value: int, lo: int, hi: int) -> widgets.IntSlider:
    return widgets.IntSlider(value=value, min=lo, max=hi, description=description, style=_STYLE,
                             continuous_update=False)


def _float(description: str, value: float, lo: float, hi: float,
           step: float) -> widgets.FloatSlider:
    return widgets.FloatSlider(value=value, min=lo, max=hi, step=step, description=description,
                               style=_STYLE, continuous_update=False)


def stage_step_time(stage_costs: Sequence[float], m: int, schedule: str = "1f1b") -> float:
    """Simulated step time when stage ``s`` costs ``stage_costs[s]`` per micro-batch.

    Each stage's cost is its forward plus backward; it is split ``1 : 2`` into ``t_f`` and
    ``t_b`` (the usual ratio). One stage per rank.
    """
    costs = [float(c) for c in stage_costs]
    tl = simulate(make_schedule(schedule, len(costs), m), [c / 3 for c in costs],
                  [2 * c / 3 for c in costs])
    return tl.step_time


# ---------------------------------------------------------------------- partition explorer


def _draw_split(ax: Any, part: Partition, title: str) -> None:
    """Per-layer cost bars coloured by stage; the bottleneck stage's bars are hatched."""
    for s, (a, b) in enumerate(zip(part.bounds, part.bounds[1:])):
        ax.bar(range(a, b), part.costs[a:b], color=_STAGE_COLOURS[s % len(_STAGE_COLOURS)],
               edgecolor="black" if s == part.bottleneck else "white",
               hatch="//" if s == part.bottleneck else None, width=0.85,
               label=f"stage {s}: {part.stage_costs[s]:.3g}")
        if b < len(part.costs):
            ax.axvline(b - 0.5, color="black", lw=1.2, ls="--")
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_ylabel("layer cost")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1), frameon=False,
              title="stage: total (hatched: slowest)", title_fontsize=7)


def partition_explorer(costs: Sequence[float] | None = None, stages: int = 2, m: int = 8,
                       layer: int = 0, factor: float = 1.0, unit: str = "time unit") -> Explorer:
    """Make one layer slower and compare the equal-layer split with the balanced split.

    The chart shows each layer's cost as a bar, coloured by the stage it lands in, for the
    split by layer count (top; DeepSpeed's ``uniform``, ``train``'s default) and the exact
    balanced split (bottom, :func:`minipipe.partition.balanced`); the bottleneck stage is
    hatched. The panel gives the bounds, stage costs, bottleneck and imbalance of each, and
    the simulated 1F1B step time of each split with ``m`` micro-batches.

    Args:
        costs: forward + backward cost of each layer (e.g. from
            :func:`~minipipe.partition.profile_layers`); default eight equal layers.
        stages: number of pipeline stages. m: micro-batches for the step time.
        layer, factor: the layer to slow down and by how much (controls).
        unit: the unit of ``costs``, for labels ("s", "ms", ...).

    Returns:
        An :class:`Explorer` with controls ``layer, factor, stages, m``.
    """
    base = [float(c) for c in (costs if costs is not None else [1.0] * 8)]
    if not base or any(c < 0 for c in base):
        raise ValueError("costs must be a non-empty list of non-negative numbers")
    L = len(base)
    controls = {
        "layer": _int("slow layer", min(layer, L - 1), 0, L - 1),
        "factor": _float("slower ×", factor, 1.0, 8.0, 0.5),
        "stages": _int("stages", min(stages, L), 1, min(L, 8)),
        "m": _int("m (micro-batches)", m, 1, 32),
    }

    def draw(vals: dict[str, Any], fig: Figure) -> dict[str, Any]:
        now = list(base)
        now[vals["layer"]] *= vals["factor"]
        n = vals["stages"]
        uniform = Partition(split_evenly(L, n), now, "layers")
        best = balanced(now, n, "time")
        top, bottom = fig.subplots(2, 1, sharex=True, sharey=True)
        _draw_split(top, uniform, f"equal layer counts: bottleneck stage {uniform.bottleneck}, "
                                  f"imbalance {uniform.imbalance:.2f}")
        _draw_split(bottom, best, f"balanced on cost: bottleneck stage {best.bottleneck}, "
                                  f"imbalance {best.imbalance:.2f}")
        bottom.set_xticks(range(L))
        bottom.set_xlabel(f"layer (cost in {unit}; layer {vals['layer']} × {vals['factor']:g})")
        t_uniform = stage_step_time(uniform.stage_costs, vals["m"])
        t_best = stage_step_time(best.stage_costs, vals["m"])
        return {
            "equal layers: bounds": uniform.bounds,
            "equal layers: stage costs": uniform.stage_costs,
            "equal layers: bottleneck stage": uniform.bottleneck,
            "equal layers: imbalance": uniform.imbalance,
            "balanced: bounds": best.bounds,
            "balanced: stage costs": best.stage_costs,
            "balanced: bottleneck stage": best.bottleneck,
            "balanced: imbalance": best.imbalance,
            f"1F1B step ({unit}), equal layers": t_uniform,
            f"1F1B step ({unit}), balanced": t_best,
            "speed-up of the balanced split": t_uniform / t_best if t_best > 0 else 1.0,
        }

    return Explorer(controls, draw, title="partition (simulated 1F1B, t_b = 2 t_f)",
                    figsize=(9.0, 4.4))


# -------------------------------------------------------------------- checkpoint explorer


def checkpoint_explorer(bytes_per_mb: Sequence[int], boundary_bytes: Sequence[int],
                        t_f: Sequence[float], t_b: Sequence[float], *, schedule: str = "1f1b",
                        m: int = 8, checkpoint: Sequence[int] = (), unit: str = "s") -> Explorer:
    """Choose the stages to checkpoint; see memory saved per rank and step time added.

    The inputs are one number per stage (one stage per rank), e.g. measured on real ranks:
    ``bytes_per_mb`` from a run without checkpointing and ``boundary_bytes`` from one with it
    (``RunResult.activation_bytes_per_mb``), ``t_f`` and ``t_b`` the mean forward and backward
    time of one micro-batch from the first run's timeline.

    The model: a rank keeps ``peak_inflight`` micro-batches of activations between forward
    and backward (:attr:`~minipipe.simulate.Timeline.peak_inflight`); a checkpointed stage
    keeps only its input, ``boundary_bytes``, per micro-batch, and its backward first runs
    the forward again, so ``t_b`` grows by ``t_f``. During that recomputation one
    micro-batch's full activations exist for a moment; the panel lists that transient too.

    Returns:
        An :class:`Explorer` with controls ``checkpoint`` (a tuple of stage indices),
        ``schedule`` (``gpipe`` or ``1f1b``) and ``m``.
    """
    p = len(bytes_per_mb)
    lists = (boundary_bytes, t_f, t_b)
    if p < 1 or any(len(x) != p for x in lists):
        raise ValueError("give one number per stage in each of bytes_per_mb, boundary_bytes, "
                         f"t_f and t_b; got lengths {[p] + [len(x) for x in lists]}")
    full = [int(b) for b in bytes_per_mb]
    kept = [int(b) for b in boundary_bytes]
    tf = [float(t) for t in t_f]
    tb = [float(t) for t in t_b]
    controls = {
        "checkpoint": widgets.SelectMultiple(options=[(f"stage {s}", s) for s in range(p)],
                                             value=tuple(checkpoint), rows=min(p, 4),
                                             description="checkpoint", style=_STYLE),
        "schedule": widgets.Dropdown(options=["gpipe", "1f1b"], value=schedule,
                                     description="schedule", style=_STYLE),
        "m": _int("m (micro-batches)", m, 1, 32),
    }

    def draw(vals: dict[str, Any], fig: Figure) -> dict[str, Any]:
        chosen = set(vals["checkpoint"])
        sched = make_schedule(vals["schedule"], p, vals["m"])
        plain = simulate(sched, tf, tb)
        recompute = simulate(sched, tf, [b + (f if s in chosen else 0.0)
                                         for s, (f, b) in enumerate(zip(tf, tb))])
        held = plain.peak_inflight
        before = [n * full[s] for s, n in enumerate(held)]
        after = [n * (kept[s] if s in chosen else full[s]) for s, n in enumerate(held)]
        transient = [after[s] + (full[s] if s in chosen else 0) for s in range(p)]
        mem, tl_ax = fig.subplots(1, 2, width_ratios=(1, 2.2))
        xs = range(p)
        mem.bar([x - 0.2 for x in xs], [b / 1024 for b in before], width=0.4, color="#c44e52",
                label="no checkpointing")
        mem.bar([x + 0.2 for x in xs], [a / 1024 for a in after], width=0.4, color="#4c72b0",
                label="with the chosen stages")
        mem.set_xticks(list(xs), [f"rank {r}" + (" ✓" if r in chosen else "") for r in xs])
        mem.set_ylabel("peak activation KiB")
        mem.set_title("activations held (✓: checkpointed)", fontsize=9, loc="left")
        mem.legend(fontsize=7, frameon=False)
        added = recompute.step_time / plain.step_time - 1
        plot_timeline(recompute, ax=tl_ax, legend=False, labels=p * vals["m"] <= 48,
                      title=f"{sched.name} with recomputation: step "
                            f"{recompute.step_time:.3g} {unit} ({added:+.1%})")
        tl_ax.set_xlabel(f"time ({unit})")
        return {
            "stages checkpointed": sorted(chosen),
            "peak micro-batches held per rank": held,
            "peak bytes per rank, without": before,
            "peak bytes per rank, with": after,
            "memory saved per rank (bytes)": [b - a for b, a in zip(before, after)],
            "with the recomputed micro-batch (transient)": transient,
            f"step time without ({unit})": plain.step_time,
            f"step time with ({unit})": recompute.step_time,
            "time added": recompute.step_time / plain.step_time - 1,
        }

    return Explorer(controls, draw, title="checkpointing: predicted from measured numbers",
                    figsize=(10.0, 1.6 + 0.5 * p))


# ---------------------------------------------------------------------- zero-bubble explorer


def zb_explorer(p: int = 4, m: int = 8, t_w: float = 1.0) -> Explorer:
    """Move ``t_w`` (the weight-gradient part of backward) and compare 1F1B with ZB-H1.

    Costs in units of ``t_f``: forward ``t_f = 1``, input-gradient backward ``t_b = 1``, weight
    gradient ``t_w`` (the zero-bubble paper's setting is ``t_w = 1``). 1F1B runs the whole
    backward, ``t_b + t_w``, as one ``B``; ZB-H1 runs ``B`` then, later, ``W``. The chart shows
    both simulated timelines on one time axis; the panel gives each rank's idle time next to
    the formulas ``(p − 1)(t_f + t_b + t_w)`` and ``(p − 1)(t_f + t_b − t_w)`` (exact for
    ``t_w <= 1`` and ``m >= p``), both bubble figures and the peak memory in micro-batches.

    Returns:
        An :class:`Explorer` with controls ``t_w, p, m``.
    """
    controls = {
        "t_w": _float("t_w / t_f", t_w, 0.0, 2.0, 0.25),
        "p": _int("p (ranks)", p, 2, 8),
        "m": _int("m (micro-batches)", m, 1, 32),
    }

    def draw(vals: dict[str, Any], fig: Figure) -> dict[str, Any]:
        tw, p_, m_ = float(vals["t_w"]), vals["p"], vals["m"]
        tf = tb = 1.0
        one = simulate(make_schedule("1f1b", p_, m_), tf, tb, tw)
        zb = simulate(make_schedule("zb-h1", p_, m_), tf, tb, tw)
        top, bottom = fig.subplots(2, 1, sharex=True)
        labels = p_ * m_ <= 64
        plot_timeline(one, ax=top, labels=labels, legend=False)
        plot_timeline(zb, ax=bottom, labels=labels)
        top.set_xlim(0, max(one.step_time, zb.step_time))
        top.set_xlabel("")
        bottom.set_xlabel("time (units of t_f)")
        idle_one = sum(one.idle_per_rank()) / p_
        idle_zb = sum(zb.idle_per_rank()) / p_
        figures: dict[str, Any] = {
            "1F1B: idle per rank": idle_one,
            "formula (p−1)(t_f+t_b+t_w)": (p_ - 1) * (tf + tb + tw),
            "ZB-H1: idle per rank (mean)": idle_zb,
            "formula (p−1)(t_f+t_b−t_w)": (p_ - 1) * (tf + tb - tw),
            "1F1B: step time": one.step_time,
            "ZB-H1: step time": zb.step_time,
            "ZB-H1 bubble ÷ 1F1B bubble": idle_zb / idle_one if idle_one > 0 else 0.0,
            "1F1B: bubble share of step / of work": [one.bubble_fraction, one.bubble_overhead],
            "ZB-H1: bubble share of step / of work": [zb.bubble_fraction, zb.bubble_overhead],
            "1F1B: peak micro-batches held per rank": one.peak_inflight,
            "ZB-H1: peak awaiting W per rank": zb.peak_pending_w,
            "formula: ZB-H1 step time": float(formulas.step_time("zb-h1", p_, m_, tf, tb, tw)),
        }
        if tw > min(tf, tb) or m_ < p_:
            figures["note"] = ("the closed forms assume t_w <= t_f and m >= p; outside that, "
                               "read the simulated timeline")
        return figures

    return Explorer(controls, draw, title="1F1B vs ZB-H1 (simulated, t_f = t_b = 1)",
                    figsize=(10.0, 2.0 + 0.8 * p))


# ------------------------------------------------------------- data × pipeline: the grid


def grid_groups(dp: int, p: int) -> dict[str, list[tuple[int, ...]]]:
    """Which global ranks talk, for ``dp`` pipeline replicas of ``p`` stages (as in ``train``).

    Global rank ``d·p + r`` is stage ``r`` of replica ``d``. Returns ``{"p2p": [(a, b), ...],
    "all_reduce": [(ranks of one stage across replicas), ...]}``: neighbouring stages of one
    replica exchange activations and gradients point to point; the copies of one stage in all
    replicas sum their gradients with an all-reduce before the optimizer step.
    """
    p2p = [(d * p + r, d * p + r + 1) for d in range(dp) for r in range(p - 1)]
    groups = [tuple(d * p + r for d in range(dp)) for r in range(p)] if dp > 1 else []
    return {"p2p": p2p, "all_reduce": groups}


def grid_diagram(dp: int, p: int, ax: Any = None) -> Any:
    """Draw the ranks of ``dp × p`` data × pipeline parallelism and their communication.

    One box per rank (rows: replicas, columns: stages); solid arrows are the point-to-point
    messages of a pipeline, dashed lines the gradient all-reduce of each stage's group.

    Returns:
        The matplotlib axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(2.6 * p + 1.5, 1.5 * dp + 1.2), layout="constrained")
    groups = grid_groups(dp, p)

    def centre(g: int) -> tuple[float, float]:
        d, r = divmod(g, p)
        return 2.6 * r, -1.6 * d

    for g in range(dp * p):
        x, y = centre(g)
        d, r = divmod(g, p)
        ax.add_patch(FancyBboxPatch((x - 0.8, y - 0.45), 1.6, 0.9, boxstyle="round,pad=0.05",
                                    facecolor=_STAGE_COLOURS[r % len(_STAGE_COLOURS)], alpha=0.35,
                                    edgecolor="black"))
        ax.text(x, y, f"rank {g}\nstage {r}, replica {d}", ha="center", va="center", fontsize=8)
    for a, b in groups["p2p"]:
        (xa, ya), (xb, yb) = centre(a), centre(b)
        ax.add_patch(FancyArrowPatch((xa + 0.85, ya + 0.12), (xb - 0.85, yb + 0.12),
                                     arrowstyle="-|>", mutation_scale=12, color="black"))
        ax.add_patch(FancyArrowPatch((xb - 0.85, yb - 0.12), (xa + 0.85, ya - 0.12),
                                     arrowstyle="-|>", mutation_scale=12, color="#666666"))
    for group in groups["all_reduce"]:
        xs, ys = zip(*(centre(g) for g in group))
        ax.plot([xs[0] + 0.55] * 2, [ys[0] - 0.5, ys[-1] + 0.5], ls="--", color="#c44e52", lw=1.5)
    ax.set_xlim(-1.2, 2.6 * (p - 1) + 1.2)
    ax.set_ylim(-1.6 * (dp - 1) - 0.9, 0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"data × pipeline: dp={dp} replicas × p={p} stages = {dp * p} ranks", fontsize=9,
                 loc="left")
    handles = [Line2D([], [], color="black", marker=">", label="point to point: activations →, "
                                                               "gradients ←"),
               Line2D([], [], color="#c44e52", ls="--",
                      label="all-reduce of one stage's gradients")]
    ax.legend(handles=handles[:1] + (handles[1:] if dp > 1 else []), loc="upper center",
              bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False, ncols=2)
    return ax
