# Source of exercises/01_bubble.ipynb and solutions/01_bubble.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 1 — the bubble calculator
#
# *Goes with [notebook 02 (micro-batches and GPipe)](../notebooks/02_gpipe.ipynb). About 20 minutes.*
#
# A GPipe step on `p` equal stages with `m` micro-batches leaves every stage idle for part of
# the step: the **bubble**. Where the idle time falls depends on the rank. Rank `r` (0-based)
# waits `r·t_f` at the start (for micro-batch 0 to reach it), `(p − 1 − r)·(t_f + t_b)` in the
# middle (between its last forward and its first backward, while the later stages finish their
# forwards and send the gradients back) and `r·t_b` at the end (while the earlier stages finish
# their backwards). Rank 0's idle time is all in the middle, the last rank's at the two ends;
# every rank idles `(p − 1)·(t_f + t_b)` in all. Two different numbers go by the name bubble,
# and write-ups mix them up:
#
# - the **fraction of the step** a stage waits: idle time ÷ step time. This is what a stopwatch
#   measures, and it is always below 1;
# - the **overhead relative to useful work**: idle time ÷ busy time (Megatron-LM calls it the
#   "bubble time fraction"). It can exceed 1.
#
# You will write both, use them on the classic case (4 stages, 16 micro-batches), find how many
# micro-batches a target bubble needs, and plot how the bubble falls as `m/p` grows.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look. Grade all exercises with `pytest --nbmake exercises/` or `python -m minipipe grade
# exercises/`.
#
# Assume equal stages, a forward of `t_f` and a backward of `t_b` per micro-batch per stage, and
# no communication time. Drawing the GPipe timeline for `p = 3, m = 2` on paper helps.

# %%
import matplotlib.pyplot as plt

from minipipe.course import checks
from minipipe import gpipe, simulate
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# ## 1a. The bubble as a fraction of the step
#
# Write `bubble_fraction(p, m)`: the share of a GPipe step during which a stage is idle. Return a
# fraction (`0.25`), not a percentage.

# %%
def bubble_fraction(p: int, m: int) -> float:
    """Idle time ÷ step time of a GPipe step: p equal stages, m micro-batches."""
    ### BEGIN SOLUTION Exercise 1: write bubble_fraction
    # The step lasts m + p − 1 slots of (t_f + t_b); each stage is busy in m of them.
    return (p - 1) / (m + p - 1)
    ### END SOLUTION


# %%
checks.check_bubble_fraction(bubble_fraction)

# %% [markdown]
# ## 1b. The bubble relative to useful work
#
# Write `bubble_overhead(p, m)`: the idle time of a stage divided by its busy time.

# %%
def bubble_overhead(p: int, m: int) -> float:
    """Idle time ÷ busy time of a GPipe step: p equal stages, m micro-batches."""
    ### BEGIN SOLUTION Exercise 1: write bubble_overhead
    # Idle: p − 1 slots; busy: m slots (same slot length for both, so it cancels).
    return (p - 1) / m
    ### END SOLUTION


# %%
checks.check_bubble_overhead(bubble_overhead)

# %% [markdown]
# ## 1c. The classic case, and a stopwatch
#
# Four stages, sixteen micro-batches. Some popular texts write "(4 − 1)/4 = 18.75%": the 18.75%
# is right for one of the two definitions, but not for that formula. Print both figures, then
# compare them with a simulated GPipe timeline, whose figures are read off the timed events
# (idle ÷ step time, idle ÷ busy), not computed from a formula.

# %%
print(f"p=4, m=16: bubble {bubble_fraction(4, 16):.2%} of the step, "
      f"{bubble_overhead(4, 16):.2%} of the useful work")

timeline = simulate(gpipe(4, 16), t_f=1.0, t_b=2.0)
print(f"simulated timeline: {timeline.bubble_fraction:.2%} of the step, "
      f"{timeline.bubble_overhead:.2%} of the useful work")

# %% [markdown]
# ## 1d. How many micro-batches for a target bubble?
#
# Write `micro_batches_for(p, target)`: the **smallest** `m` for which the bubble fraction of the
# step is at most `target` (a fraction, e.g. `0.05`). Return an `int` (a Python or numpy int; a
# float is refused, even a whole one such as `40.0`: `numpy.ceil` returns floats).

# %%
def micro_batches_for(p: int, target: float) -> int:
    """Smallest m with bubble_fraction(p, m) <= target."""
    ### BEGIN SOLUTION Exercise 1: write micro_batches_for
    # A loop is exact; solving (p − 1)/(m + p − 1) <= target for m needs a ceiling and care.
    m = 1
    while bubble_fraction(p, m) > target:
        m += 1
    return m
    ### END SOLUTION


# %%
checks.check_micro_batches_for(micro_batches_for)

# %% [markdown]
# ## 1e. Vary the ratio `m / p`
#
# The plot shows both figures against the number of micro-batches per stage, for 4 and 8
# stages, with simulated timelines as dots. Questions to answer for yourself:
#
# - Plotted against `m / p`, why do the curves for different `p` nearly coincide?
# - Which of the two figures can exceed 100%, and when?
# - How many micro-batches keep the bubble of an 8-stage pipeline at or under 10% of the step?

# %%
ratios = [0.25, 0.5, 1, 2, 4, 8, 16]
fig, ax = plt.subplots(figsize=(7, 4))
for p, colour in ((4, "tab:blue"), (8, "tab:orange")):
    ms = [max(1, round(r * p)) for r in ratios]
    ax.plot([m / p for m in ms], [bubble_fraction(p, m) for m in ms], "-", color=colour,
            label=f"p={p}: fraction of the step")
    ax.plot([m / p for m in ms], [bubble_overhead(p, m) for m in ms], "--", color=colour,
            label=f"p={p}: overhead relative to useful work")
    sim = [simulate(gpipe(p, m), t_f=1.0, t_b=2.0) for m in ms]
    ax.plot([m / p for m in ms], [t.bubble_fraction for t in sim], "o", color=colour, ms=4)
    ax.plot([m / p for m in ms], [t.bubble_overhead for t in sim], "s", color=colour, ms=4,
            fillstyle="none")
ax.annotate("p=4, m=16", (4, bubble_fraction(4, 16)), textcoords="offset points", xytext=(8, 10))
ax.set(xscale="log", yscale="log", xlabel="micro-batches per stage, m / p", ylabel="bubble",
       title="GPipe bubble, equal stages (lines: your formulas; markers: simulated)")
ax.legend(fontsize=8)
plt.show()

print("8 stages, bubble at most 10% of the step:", micro_batches_for(8, 0.10), "micro-batches")

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 1: bubble calculator",
    {"bubble fraction p=4 m=16": bubble_fraction(4, 16),
     "bubble overhead p=4 m=16": bubble_overhead(4, 16),
     "simulated fraction p=4 m=16": timeline.bubble_fraction,
     "m for p=8, bubble <= 10%": micro_batches_for(8, 0.10)},
    data="formulas and simulated timelines (t_f=1, t_b=2); no processes",
    notes=["equal stages, no communication time: real stages and links add to both figures"])
