# Source of exercises/08_own_schedule.ipynb and solutions/08_own_schedule.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 8 — write a schedule by hand and run it on real ranks
#
# *Goes with [notebooks 09 (capstone)](../notebooks/09_capstone_gpt.ipynb) and [10 (debugging a hung pipeline)](../notebooks/10_hang_clinic.ipynb). About 20 minutes.*
#
# No generator this time: write, by hand, the order of every action on each of **2 ranks** for
# **4 micro-batches**, such that **rank 0 never holds more than 2 micro-batches** of activations
# at once (forward run, backward not yet). GPipe would hold 4.
#
# Each rank must run `F0`…`F3` and `B0`…`B3` exactly once, each `B` after its `F`. The runtime
# inserts the messages: rank 0's forward sends to rank 1, rank 1's backward sends a gradient back
# to rank 0, and messages between two ranks are received in the order they were sent. Not every
# pair of orders works; the validator will tell you why one does not.
#
# The check validates your schedule, counts rank 0's micro-batches from the order, then trains a
# small MLP with it on 2 real ranks and compares the losses and every gradient with
# single-process training on the whole batch, and the measured activation bytes with the limit.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
from minipipe.course import checks
from minipipe import Schedule, ScheduleError, plot_timeline, simulate, validate
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# A schedule is one string per rank, e.g. `Schedule(["F0 F1 B0 B1", "F0 F1 B0 B1"])` (that one is
# GPipe for two micro-batches). Try candidates with `validate` before the check:

# %%
try:
    validate(Schedule(["F0 B0 F1 B1 F2 B2 F3 B3", "F0 F1 B0 B1 F2 F3 B2 B3"]))
except ScheduleError as err:
    print(err)

# %% [markdown]
# ## 8a. Write `my_schedule()`

# %%
def my_schedule() -> Schedule:
    """A hand-written schedule: p=2, m=4, at most 2 micro-batches held on rank 0."""
    ### BEGIN SOLUTION Exercise 8: write your schedule by hand
    return Schedule([
        "F0 F1 B0 F2 B1 F3 B2 B3",  # rank 0: two in flight, then one forward per backward
        "F0 B0 F1 B1 F2 B2 F3 B3",  # rank 1 (the loss): each backward right after its forward
    ], name="my schedule")
    ### END SOLUTION


# %%
result = checks.check_my_schedule(my_schedule)

# %% [markdown]
# ## 8b. Look at the run
#
# The measured timeline of the last step (seconds; on a laptop the tiny model makes messages and
# Python overhead dominate), next to the simulated one (`t_f = 1`, `t_b = 2`).

# %%
print(result.summary())
plot_timeline(result.timeline, title="measured on 2 real ranks");
plot_timeline(simulate(my_schedule(), t_f=1.0, t_b=2.0), title="simulated");

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 8: your own schedule on real ranks",
    {"losses": result.losses,
     "peak activation bytes per rank": result.peak_activation_bytes,
     "messages per step": result.messages},
    result=result, data="minipipe.models.mlp(layers=2, width=16), 16 samples, 2 steps",
    notes=["losses and gradients match single-process training whatever the order: that is the "
           "point of a flush schedule"])
