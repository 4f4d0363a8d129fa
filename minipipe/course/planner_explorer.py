"""The planner explorer for notebook 12: pick a model, the cluster size and the global batch;
see the best configurations the planner finds (:func:`minipipe.planner.plan`).

It follows the convention of :mod:`minipipe.course.widgets` (read its docstring):
``explorer.update(**values)`` redraws once and returns the panel's figures.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from ..planner import HARDWARE, MODELS, plan
from .widgets import Explorer

__all__ = ["planner_explorer"]

_STYLE = {"description_width": "initial"}


def planner_explorer(model: str = "llama-7b", hardware: str = "h100-80gb", gpus: int = 64,
                     global_batch: int = 512, top: int = 8) -> Explorer:
    """Controls: ``model``, ``hardware``, ``gpus`` (powers of two) and ``global_batch``
    (sequences). Chart: the ``top`` configurations' predicted step time split into compute,
    bubble and data-parallel reduction (the best few simulated, the rest closed form, as the
    labels say). Panel: the best configuration, its step time, MFU and peak memory, how many
    configurations fit, and the closest one that does not, with the reason.
    """
    controls = {
        "model": widgets.Dropdown(options=sorted(MODELS), value=model, description="model",
                                  style=_STYLE),
        "hardware": widgets.Dropdown(options=sorted(HARDWARE), value=hardware,
                                     description="device", style=_STYLE),
        "gpus": widgets.SelectionSlider(options=[2 ** k for k in range(3, 14)], value=gpus,
                                        description="devices", style=_STYLE,
                                        continuous_update=False),
        "global_batch": widgets.SelectionSlider(options=[2 ** k for k in range(5, 13)],
                                                value=global_batch,
                                                description="global batch (sequences)",
                                                style=_STYLE, continuous_update=False),
    }

    def draw(vals: dict[str, Any], fig: Figure) -> dict[str, Any]:
        result = plan(MODELS[vals["model"]], HARDWARE[vals["hardware"]], vals["global_batch"],
                      vals["gpus"], simulate_top=3)
        best = result.best  # ValueError (shown in the panel) when nothing fits
        result.plot(ax=fig.add_subplot(), top=top)
        figures: dict[str, Any] = {
            "best": str(best.config),
            f"step time (s, {best.source})": best.step_time,
            "MFU": f"{best.mfu:.1%}",
            "bubble, share of the pipeline step": best.bubble,
            "peak memory per rank (GiB)": max(best.memory) / 2**30,
            "configurations that fit / do not": f"{len(result.feasible)} / {len(result.rejected)}",
        }
        if result.rejected:
            figures["closest that does not fit"] = (f"{result.rejected[0].config}: "
                                                    f"{result.rejected[0].reason}")
        return figures

    return Explorer(controls, draw, title="planner (predicted: cost model + simulator)",
                    figsize=(9.0, 4.2))
