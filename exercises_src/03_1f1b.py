# Source of exercises/03_1f1b.ipynb and solutions/03_1f1b.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 3 — a 1F1B schedule generator
#
# *Goes with [notebook 03 (1F1B)](../notebooks/03_1f1b.ipynb). About 30 minutes.*
#
# GPipe keeps the activations of all `m` micro-batches on every rank until the backwards start.
# **1F1B** (PipeDream-Flush, Narayanan et al. 2021) starts the backwards as early as it can, so a
# rank holds far fewer. Each rank `r` (0-based, `p` ranks) runs three phases:
#
# 1. **warm-up**: a few forwards, micro-batches 0, 1, ...;
# 2. **steady state**: one forward of the next micro-batch, then one backward of the oldest
#    micro-batch still waiting for its backward, again and again until the forwards run out;
# 3. **cool-down**: the backwards that are left, oldest first.
#
# The whole exercise is the warm-up. What is it for? Rank `r`'s first backward (of micro-batch
# 0) can only start once micro-batch 0 has gone through the `p − 1 − r` later stages and its
# gradient has come back; even rank 0 waits for it. The warm-up forwards fill that wait: rank
# `r` keeps `p − r` micro-batches in flight (the warm-up plus the steady phase's first forward),
# just enough that (with equal stages) a gradient is ready each time the steady phase needs one: it
# never starves, and no more, which bounds the activations it holds. How many warm-up forwards
# does that take on rank `r`? The last rank computes the loss and needs none. Careful with
# `m < p`: a rank cannot run more forwards than there are micro-batches.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
from minipipe.course import checks
from minipipe import B, F, Schedule, compare_timelines, gpipe, simulate
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# ## 3a. Write `one_f_one_b(p, m)`
#
# Build each rank's order with `F(i)` and `B(i)` and return `Schedule(orders, m=m, name=...)`.
# `print(schedule)` shows each rank's order as text: add a cell to look at yours while you work.

# %%
def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-Flush) for p ranks and m micro-batches."""
    ### BEGIN SOLUTION Exercise 3: write the 1F1B generator
    ranks = []
    for r in range(p):
        # micro-batch 0 needs p − r − 1 more forwards downstream, then its gradient comes back
        warmup = min(p - r - 1, m)
        order = [F(i) for i in range(warmup)]  # warm-up
        for i in range(m - warmup):  # steady state: the newest forward, the oldest backward
            order += [F(warmup + i), B(i)]
        order += [B(i) for i in range(m - warmup, m)]  # cool-down
        ranks.append(order)
    return Schedule(ranks, m=m, name="my 1f1b")
    ### END SOLUTION


# %%
checks.check_one_f_one_b(one_f_one_b)

# %%
print(one_f_one_b(4, 6))

# %% [markdown]
# ## 3b. Same bubble, less memory
#
# Simulate GPipe and your 1F1B on 4 ranks with 8 micro-batches. Compare the step times and the
# peak number of micro-batches each rank holds (forward run, backward not yet). Is the idle time
# in the same place on every rank?

# %%
g = simulate(gpipe(4, 8), t_f=1.0, t_b=2.0)
o = simulate(one_f_one_b(4, 8), t_f=1.0, t_b=2.0)
print(f"step time: GPipe {g.step_time:g}, 1F1B {o.step_time:g}")
print(f"peak micro-batches held per rank: GPipe {g.peak_inflight}, 1F1B {o.peak_inflight}")
compare_timelines(g, o, titles=("GPipe", "your 1F1B"));

# %% [markdown]
# ## 3c. On real ranks
#
# Two processes train a small MLP with your schedule; losses and gradients must equal
# single-process training on the whole batch.

# %%
result = checks.check_schedule_on_ranks(one_f_one_b(2, 4))
print(result.summary())

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 3: 1F1B generator",
    {"step time GPipe / 1F1B (p=4, m=8)": f"{g.step_time:g} / {o.step_time:g}",
     "peak in-flight 1F1B p=4 m=8": o.peak_inflight,
     "real run: peak activation bytes": result.peak_activation_bytes},
    result=result, data="minipipe.models.mlp(layers=2, width=16), 16 samples, 2 steps",
    notes=["simulated with t_f=1, t_b=2 on equal stages; activation bytes are exact on CPU"])
