"""Checks for the graded exercises: each passes only for a correct answer and says what is wrong.

Every ``check_<name>(learner_function)`` calls the learner's function on several cases and
raises :class:`CheckFailed` (an ``AssertionError``) with a message that names the case, says
what is wrong and where to look, without printing the answer. A stub that still raises
``NotImplementedError`` fails with "not implemented yet". The checks know the common wrong
answers (the two bubble definitions swapped, an off-by-one 1F1B warm-up, tied gradients
averaged instead of summed, a greedy partitioner, ...) and name them when they see one.

Schedules are judged by :func:`minipipe.validate.validate` (its message is shown as is) and,
where the exercise is about real ranks, by :func:`minipipe.train` against
:func:`minipipe.reference`. Checks that start processes call the learner's function
once first, so a stub fails before anything is launched.

One module per exercise (``ex01_bubble`` … ``ex11_budget``); :mod:`.common` holds the
helpers they share (calling the learner's function, reading numbers, validating schedules).
"""

from .common import CheckFailed
from .ex01_bubble import check_bubble_fraction, check_bubble_overhead, check_micro_batches_for
from .ex02_03_schedules import check_gpipe, check_one_f_one_b
from .ex04_memory import check_peak_activation, check_peak_activation_on_ranks
from .ex05_tied import check_tied_grad_sync
from .ex06_partition import check_partition
from .ex07_zero_bubble import check_zero_bubble
from .ex08_own_schedule import check_my_schedule, check_schedule_on_ranks
from .ex09_interleaved import check_interleaved
from .ex10_fix_hang import check_fix
from .ex11_budget import check_budget_schedule

__all__ = [
    "CheckFailed",
    "check_bubble_fraction", "check_bubble_overhead", "check_micro_batches_for",
    "check_gpipe", "check_one_f_one_b",
    "check_peak_activation", "check_peak_activation_on_ranks",
    "check_tied_grad_sync",
    "check_partition",
    "check_zero_bubble",
    "check_my_schedule", "check_schedule_on_ranks",
    "check_interleaved",
    "check_fix",
    "check_budget_schedule",
]
