# Source of exercises/02_gpipe.ipynb and solutions/02_gpipe.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 2 — a GPipe schedule generator
#
# *Goes with [notebook 02 (micro-batches and GPipe)](../notebooks/02_gpipe.ipynb). About 20 minutes.*
#
# In minipipe a schedule is plain data: for every rank, the order in which it runs its compute
# actions. `F3` is the forward of micro-batch 3 on that rank's stage, `B3` its backward. The
# runtime adds the messages itself: a forward receives its input from the previous rank and
# sends its output to the next; a backward receives the gradient from the next rank and sends
# one to the previous.
#
# You will write the generator for **GPipe** (Huang et al. 2019), "fill–drain": every rank runs
# the forwards of all `m` micro-batches, then all the backwards. Then you will run your schedule
# through the validator, the simulator, and real ranks.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
from minipipe.course import checks
from minipipe import B, F, Schedule, ScheduleError, plot_timeline, simulate, validate
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# A schedule is built from one order per rank, as strings or as lists of actions. Here is naive
# model parallelism for two ranks and two micro-batches, written both ways:

# %%
naive = Schedule(["F0 B0 F1 B1", "F0 B0 F1 B1"], m=2, name="naive")
same = Schedule([[F(0), B(0), F(1), B(1)]] * 2, m=2, name="naive")
print(naive)
print("equal:", naive == same, "| valid:", validate(naive) is naive)

# %% [markdown]
# ## 2a. Write `gpipe(p, m)`
#
# Return a `Schedule` with `p` ranks in which every rank runs all `m` forwards (micro-batch 0
# first), then the `m` backwards. Pass `m=m` and a `name` to `Schedule`. Before you run the
# check, ask yourself: does the order of the backwards matter? Must it be the same on every rank?

# %%
def gpipe(p: int, m: int) -> Schedule:
    """GPipe (fill–drain) for p ranks and m micro-batches."""
    ### BEGIN SOLUTION Exercise 2: write the GPipe generator
    order = [F(i) for i in range(m)] + [B(i) for i in range(m)]  # fill, then drain
    return Schedule([order] * p, m=m, name="my gpipe")
    ### END SOLUTION


# %%
checks.check_gpipe(gpipe)

# %% [markdown]
# ## 2b. What the validator catches
#
# The check ran your schedules through `minipipe.validate`, which plays the runtime's message
# protocol without starting processes. Here is a GPipe variant that runs the backwards in the
# opposite order on rank 0 only. Read the validator's message: why would this hang on real ranks?

# %%
broken = Schedule(["F0 F1 F2 F3 B3 B2 B1 B0", "F0 F1 F2 F3 B0 B1 B2 B3"], name="broken gpipe")
try:
    validate(broken)
except ScheduleError as err:
    print(err)

# %% [markdown]
# ## 2c. Simulate it, then run it on real ranks
#
# The simulator plays your schedule with `t_f = 1`, `t_b = 2`. Then two real ranks (processes
# talking over gloo) train a small MLP with your schedule, and the check compares the losses and
# gradients with single-process training on the whole batch.

# %%
timeline = simulate(gpipe(4, 8), t_f=1.0, t_b=2.0)
print(timeline.title())
plot_timeline(timeline);

# %%
result = checks.check_schedule_on_ranks(gpipe(2, 4))
print(result.summary())

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 2: GPipe generator",
    {"simulated bubble p=4 m=8": timeline.bubble_fraction,
     "peak in-flight p=4 m=8": timeline.peak_inflight,
     "real run: losses": result.losses},
    result=result, data="minipipe.models.mlp(layers=2, width=16), 16 samples, 2 steps",
    notes=["the real run checks correctness; its timings on a laptop mostly show process overhead"])
