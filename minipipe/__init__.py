"""minipipe: pipeline-parallel training you can read, run and measure.

The reference implementation, in the order a reader meets it:

- schedules as data (:mod:`minipipe.schedules`) → the validator and dry run
  (:mod:`minipipe.validate`) → the simulator, timelines, closed forms and plots
  (:mod:`minipipe.simulate`, :mod:`minipipe.timeline`, :mod:`minipipe.formulas`,
  :mod:`minipipe.plot`); none of these imports torch;
- the runtime (:mod:`minipipe.runtime`): launch → point-to-point → the per-rank interpreter →
  the caller side (``train``, ``reference``), loaded on first use;
- model helpers, partitioning and checkpoints (:mod:`minipipe.models`,
  :mod:`minipipe.partition`, :mod:`minipipe.state`).

The course machinery (exercise checks, grader, explorers, verification report) lives in
:mod:`minipipe.course`; nothing above imports it. ``docs/architecture.md`` draws the layers.
"""
from . import formulas
from .plot import compare_timelines, plot_timeline
from .schedules import (
    Action,
    B,
    F,
    Kind,
    Schedule,
    W,
    gpipe,
    interleaved,
    make_schedule,
    naive,
    one_f_one_b,
    parse_actions,
    zb_h1,
)
from .simulate import simulate
from .timeline import Event, Timeline, text_timeline
from .validate import ScheduleError, dry_run, validate

__all__ = [
    "formulas", "compare_timelines", "plot_timeline", "text_timeline", "Action", "B", "F", "Kind",
    "Schedule", "W", "gpipe", "interleaved", "make_schedule", "naive", "one_f_one_b",
    "parse_actions", "zb_h1", "simulate", "Event", "Timeline", "ScheduleError", "dry_run",
    "validate", "train", "reference", "RunResult", "ConfigError", "WorkerError", "PipelineTimeout",
    "train_async", "generate",
]

_LAZY = {
    "train": "runtime", "reference": "runtime", "RunResult": "runtime", "ConfigError": "errors",
    "WorkerError": "runtime.launch", "PipelineTimeout": "runtime.launch",
    "train_async": "runtime.noflush", "generate": "runtime.inference",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minipipe' has no attribute {name!r}")
