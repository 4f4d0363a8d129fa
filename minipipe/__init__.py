"""minipipe: pipeline-parallel training you can read, run and measure.

Schedules, the validator, the simulator and the formulas need no torch; ``train`` and
``reference`` (which do) are loaded on first use. Ranks are started by :mod:`minipipe.launch`.
"""
from . import formulas
from .plot import compare_timelines, plot_timeline, text_timeline
from .schedules import (Action, B, F, Kind, Schedule, W, gpipe, interleaved, make_schedule,
                        naive, one_f_one_b, parse_actions, zb_h1)
from .simulate import Event, Timeline, simulate
from .validate import ScheduleError, dry_run, validate

_LAZY = {
    "train": "runtime", "reference": "runtime", "RunResult": "runtime", "ConfigError": "runtime",
    "WorkerError": "launch", "PipelineTimeout": "launch",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minipipe' has no attribute {name!r}")
