"""Draw a timeline: a Gantt chart per rank (matplotlib) or a few lines of text.

Nothing here picks a matplotlib backend or calls ``plt.show()``: in a notebook the figure shows
itself, in a script save it with ``ax.figure.savefig(...)``. matplotlib is imported only when
a chart is drawn, so :func:`text_timeline` (and ``str(timeline)``) work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .schedules import Kind

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .schedules import Schedule
    from .timeline import Timeline

__all__ = ["compare_timelines", "plot_timeline"]

_IDLE_COLOR = "#ececec"
_STYLE = {  # per kind: colour change (< 1 darker, > 1 mixed with white), hatch, text colour
    Kind.F: (1.0, "", "black"),
    Kind.B: (0.7, "///", "white"),
    Kind.W: (1.5, "...", "black"),
}
_NAMES = {Kind.F: "F forward", Kind.B: "B backward", Kind.W: "W weight grad"}
_RASTER = {Kind.F: "#4c72b0", Kind.B: "#dd8452", Kind.W: "#55a868"}  # large timelines: by kind


def _colour(mb: int, shade: float) -> tuple[float, float, float]:
    """A qualitative colour per micro-batch (tab20: 10 strong, then 10 light ones)."""
    from matplotlib import colormaps

    i = mb % 20
    r, g, b, _ = colormaps["tab20"](2 * (i % 10) + i // 10)
    if shade <= 1:
        return r * shade, g * shade, b * shade
    w = shade - 1  # mix with white
    return r + (1 - r) * w, g + (1 - g) * w, b + (1 - b) * w


def _rank_labels(schedule: Schedule) -> list[str]:
    """``rank r``; with a placement other than the loop, the stages each rank runs too."""
    if schedule.placement_name == "loop":
        return [f"rank {r}" for r in range(schedule.p)]
    return [f"rank {r}\nstages " + ", ".join(str(schedule.stage(r, c)) for c in range(schedule.v))
            for r in range(schedule.p)]


def plot_timeline(timeline: Timeline, ax: Axes | None = None, title: str | None = None,
                  labels: bool = True, legend: bool = True) -> Axes:
    """Gantt chart of a timeline: one row per rank (rank 0 on top), one bar per action.

    Bars are coloured by micro-batch; F bars are plain, B bars darker and hatched ``///``,
    W bars lighter and dotted. The light grey band behind each row is the rank's idle time.
    Each bar carries its label (``F3``, ``1B3`` for chunk 1) when it fits.

    Args:
        timeline: what to draw (simulated or measured).
        ax: axes to draw on; a new figure when ``None``.
        title: default: the schedule, ``p``, ``m``, ``v``, step time and both bubbles.
        labels: write the action labels inside bars wide enough for them.
        legend: add a legend for F / B / W and idle.

    A timeline of more than :data:`RASTER_ABOVE` events (cluster sizes) is drawn as an image
    instead, one pixel column per slice of time coloured by kind (no labels, no hatching):
    instant at ``p = 64, m = 1024``.

    Returns:
        The axes. Bars are in ``ax.collections`` whose label is ``F``, ``B`` or ``W`` (an
        image in ``ax.images`` for a large timeline).
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    if ax is None:
        rows = min(timeline.p, 16)  # beyond 16 ranks the rows get thinner
        _, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * rows), layout="constrained")
    p, t0, step = timeline.p, timeline.start, timeline.step_time
    height = 0.8

    def box(y: float, x0: float, x1: float) -> list[tuple[float, float]]:
        top, bottom = y - height / 2, y + height / 2
        return [(x0, top), (x1, top), (x1, bottom), (x0, bottom)]

    raster = len(timeline._starts) > RASTER_ABOVE
    if raster:  # too many bars to draw one by one: an image, one pixel column per time slice
        labels = False
        bars = _raster(timeline, ax)
    else:
        ax.add_collection(PolyCollection([box(r, 0, step) for r in range(p)],
                                         facecolors=_IDLE_COLOR, edgecolors="none", zorder=0,
                                         label="idle"))
        bars = _bars(timeline, box)
    for kind, (verts, colours) in bars.items():
        if verts and not raster:
            ax.add_collection(PolyCollection(verts, facecolors=colours, edgecolors="white",
                                             linewidths=0.5, hatch=_STYLE[kind][1] or None,
                                             zorder=2, label=kind.value))
    ax.set_xlim(0, step if step > 0 else 1)
    ax.set_ylim(p - 0.5, -0.5)  # rank 0 on top
    ticks = range(0, p, max(1, p // 16))  # at most ~16 rank labels
    ax.set_yticks(ticks, [_rank_labels(timeline.schedule)[r] for r in ticks])
    ax.set_xlabel("time")
    ax.set_title(title if title is not None else timeline.title(), fontsize=9, loc="left")

    if labels and step > 0:
        fontsize = 7 if p <= 16 else 5
        px_per_unit = ax.get_window_extent().width / step
        char_px = 0.62 * fontsize * ax.figure.dpi / 72
        show_chunk = timeline.schedule.v > 1
        for e in timeline.events:
            text = e.action.label(show_chunk)
            if (e.end - e.start) * px_per_unit >= len(text) * char_px + 2:
                ax.text((e.start + e.end) / 2 - t0, e.rank, text, ha="center", va="center",
                        fontsize=fontsize, color=_STYLE[e.action.kind][2], zorder=3, clip_on=True)
    if legend:
        kinds = [k for k in Kind if bars[k][0]]
        handles = [Patch(facecolor=_RASTER[k] if raster else _colour(0, _STYLE[k][0]),
                         hatch=None if raster else
                         _STYLE[k][1], edgecolor="white", label=_NAMES[k]) for k in kinds]
        handles.append(Patch(facecolor=_IDLE_COLOR, label="idle"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=7,
                  frameon=False, title="colour: kind" if raster else "colour: micro-batch",
                  title_fontsize=7)
    return ax


RASTER_ABOVE = 4000  #: timelines with more events are drawn as an image (one colour per kind)


def _bars(timeline: Timeline, box) -> dict[Kind, tuple[list, list]]:
    """Per kind: each event's box and colour (by micro-batch)."""
    t0 = timeline.start
    bars: dict[Kind, tuple[list, list]] = {kind: ([], []) for kind in Kind}
    for e in timeline.events:
        verts, colours = bars[e.action.kind]
        verts.append(box(e.rank, e.start - t0, e.end - t0))
        colours.append(_colour(e.action.mb, _STYLE[e.action.kind][0]))
    return bars


def _raster(timeline: Timeline, ax: Axes, width: int = 1200) -> dict[Kind, tuple[list, list]]:
    """Draw a large timeline as a ``p × width`` image: each pixel column is ``step / width``
    of time, coloured by the kind of action that covers most of it (idle: grey). Built with
    numpy from the timeline's columns, in milliseconds for half a million events."""
    import numpy as np

    p, t0, step = timeline.p, timeline.start, timeline.step_time or 1.0
    scale = width / step
    a = np.clip(((timeline._starts - t0) * scale).astype(np.int64), 0, width - 1)
    b = np.clip(np.ceil((timeline._ends - t0) * scale).astype(np.int64), a + 1, width)
    cover = np.zeros((3, p, width + 1))  # per kind: how many events cover each pixel column
    for k in range(3):
        sel = timeline._kinds == k
        np.add.at(cover[k], (timeline._ranks[sel], a[sel]), 1)
        np.add.at(cover[k], (timeline._ranks[sel], b[sel]), -1)
    cover = np.cumsum(cover, axis=2)[:, :, :width]
    palette = np.array([_hex(_RASTER[k]) for k in Kind] + [_hex(_IDLE_COLOR)])
    busiest = np.where(cover.max(0) > 0, cover.argmax(0), 3)
    ax.imshow(palette[busiest], aspect="auto", interpolation="nearest", zorder=1,
              extent=(0, step, p - 0.5, -0.5))
    return {kind: ([None] if (timeline._kinds == k).any() else [], [])
            for k, kind in enumerate(Kind)}


def _hex(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))


def compare_timelines(a: Timeline, b: Timeline, titles: tuple[str, str] | None = None,
                      sharex: bool | None = None) -> Figure:
    """Two timelines one above the other, e.g. predicted (simulated) and measured.

    Args:
        a, b: the timelines (top, bottom).
        titles: the two axes' titles; default each timeline's own figures.
        sharex: share the time axis; default: when the step times are within a factor of 2
            of each other (then they are most likely in the same unit).

    Returns:
        The figure; its two axes are ``fig.axes[0]`` and ``fig.axes[1]``.
    """
    import matplotlib.pyplot as plt

    if sharex is None:
        lo, hi = sorted([a.step_time, b.step_time])
        sharex = lo > 0 and hi <= 2 * lo
    rows = (a.p + 1.5, b.p + 1.5)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=sharex, figsize=(10, 1.0 + 0.45 * sum(rows)),
                                      height_ratios=rows, layout="constrained")
    plot_timeline(a, ax=top, title=titles[0] if titles else None)
    plot_timeline(b, ax=bottom, title=titles[1] if titles else None, legend=False)
    if sharex:
        top.set_xlim(0, max(a.step_time, b.step_time))
        top.set_xlabel("")
    return fig


