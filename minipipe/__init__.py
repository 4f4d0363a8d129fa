"""minipipe: pipeline-parallel training you can read, run and measure."""
from .schedules import (Action, B, F, Kind, Schedule, W, gpipe, interleaved, make_schedule,
                        naive, one_f_one_b, parse_actions, zb_h1)
from .validate import ScheduleError, dry_run, validate
from . import formulas
from .plot import compare_timelines, plot_timeline, text_timeline
from .simulate import Event, Timeline, simulate
