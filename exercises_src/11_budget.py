# Source of exercises/11_budget.ipynb and solutions/11_budget.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 11 — a schedule on a budget
#
# *Goes with [notebook 11 (the frontier)](../notebooks/11_frontier.ipynb). About 30 minutes.*
#
# A puzzle in the style of Sasha Rush's *LLM Training Puzzles*: you get the machine, the costs
# and two budgets, and write a schedule that fits both.
#
# | | |
# |---|---|
# | ranks | `p = 3` |
# | micro-batches | `m = 6` |
# | costs per micro-batch and stage | forward `t_f = 1`, input gradient `B`: `t_b = 2`, weight gradient `W`: `t_w = 1` |
# | **memory budget** | at most **4** micro-batches of activations per rank at any time (a micro-batch is held from its `F` until its `W`; until its `B` if you do not split the backward) |
# | **time budget** | a simulated step within **2 %** of the fastest schedule that fits the memory budget |
#
# The fastest schedule is not in a textbook: the check asks `minipipe.search` (a constraint
# solver, which *proves* its answer optimal) for it. Two schedules from the lesson come close:
# ZB-H1 fits the memory but misses the time budget, ZB-H2 makes the time but holds 5
# micro-batches. Yours must do both.
#
# The check validates your schedule, simulates it with these costs, then trains a small MLP with
# it on 3 real ranks and compares losses and gradients with single-process training, and the
# measured activation bytes with the budget.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
from minipipe import Schedule, make_schedule, plot_timeline, simulate, validate
from minipipe.course import checks
from minipipe.course.report import verification_checkpoint

T_F, T_B, T_W = 1.0, 2.0, 1.0

# %% [markdown]
# The two near misses, simulated with the puzzle's costs. `peak_pending_w` counts, per rank, the
# most micro-batches whose `F` has run and whose `W` has not.

# %%
for name in ("zb-h1", "zb-h2"):
    tl = simulate(validate(make_schedule(name, p=3, m=6)), T_F, T_B, T_W)
    print(f"{name}: step {tl.step_time:g}, peak micro-batches held per rank {tl.peak_pending_w}")
print(make_schedule("zb-h2", p=3, m=6))

# %% [markdown]
# ## 11a. Write `budget_schedule()`
#
# One string per rank, e.g. `"F0 F1 B0 W0 ..."`: each rank runs `F`, `B` and `W` of every
# micro-batch 0–5 once, `B` after its `F`, `W` after its `B`. Hints: the bubble of a pipeline
# is at its start and end; a `W` can wait, a `B` cannot (the rank before waits for it); look at
# where ZB-H1 idles and how ZB-H2 fills that, then spend exactly the memory you have. Try
# candidates with `validate` and `simulate` before the check.

# %%
def budget_schedule() -> Schedule:
    """p=3, m=6: at most 4 micro-batches held per rank, step within 2% of the optimum."""
    ### BEGIN SOLUTION Exercise 11: write a schedule within both budgets
    return Schedule([
        # rank 0: four forwards (the budget), then B W F until the forwards run out
        "F0 F1 F2 F3 B0 W0 F4 B1 W1 F5 B2 W2 B3 W3 B4 W4 B5 W5",
        # rank 1: three forwards; each W waits one step, filling the wait for the next B
        "F0 F1 F2 B0 F3 B1 W0 F4 B2 W1 F5 B3 W2 B4 W3 B5 W4 W5",
        # rank 2 (the loss): F B at once; W deferred while forwards keep coming
        "F0 B0 F1 B1 F2 B2 F3 B3 W0 F4 B4 W1 F5 B5 W2 W3 W4 W5",
    ], name="on budget")
    ### END SOLUTION


# %%
result = checks.check_budget_schedule(budget_schedule)

# %% [markdown]
# ## 11b. Look at it
#
# Your schedule simulated with the puzzle's costs, and the measured timeline of the real run
# (seconds; the tiny model makes messages and Python overhead dominate on a laptop, so the
# measured shape differs from the simulated one — the simulated step is what the budget grades).

# %%
mine = simulate(budget_schedule(), T_F, T_B, T_W)
print(f"simulated step {mine.step_time:g}, peak held per rank {mine.peak_pending_w}")
print(f"measured peak activation bytes per rank {result.peak_activation_bytes}")
plot_timeline(mine, title="your schedule, simulated (t_f=1, t_b=2, t_w=1)");
plot_timeline(result.timeline, title="measured on 3 real ranks");

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 11: a schedule on a budget",
    {"simulated step": mine.step_time,
     "peak micro-batches held per rank (simulated)": mine.peak_pending_w,
     "peak activation bytes per rank (measured)": result.peak_activation_bytes,
     "losses": result.losses},
    result=result, data="minipipe.models.mlp(layers=3, width=16), 24 samples, 2 steps",
    notes=["the budgets are graded on the simulated step; real-rank timings on a laptop are noisy"])
