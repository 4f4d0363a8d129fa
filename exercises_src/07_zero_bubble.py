# Source of exercises/07_zero_bubble.ipynb and solutions/07_zero_bubble.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 7 (stretch) — place the weight gradients: zero-bubble ZB-H1
#
# *Goes with [notebook 08 (zero-bubble)](../notebooks/08_zero_bubble_and_dp.ipynb). About 45 minutes.*
#
# A backward does two jobs: the gradient with respect to the stage's **input** (the previous
# stage is waiting for it) and the gradient with respect to the stage's **weights** (nobody waits
# for it until the optimizer step). Zero-bubble schedules (Qi et al. 2024) split them: `B3` now
# computes only micro-batch 3's input gradient, `W3` its weight gradient, any time after `B3`.
# Deferred `W`s can fill the idle time of the cool-down, but the activations a `W` needs stay in
# memory until it runs.
#
# Your task: start from 1F1B's order of `F` and `B` on every rank (take it from
# `minipipe.one_f_one_b(p, m)`, or from your exercise 3) and insert one `W(i)` for every `B(i)`.
# The check asks for three things:
#
# 1. the F/B order on every rank is exactly 1F1B's (you only add `W`s);
# 2. no rank holds more micro-batches of activations than 1F1B's busiest rank, `min(p, m)` (a
#    micro-batch is held from its `F` until its `W`);
# 3. with `t_f = t_b = t_w = 1`, the simulated step is as short as ZB-H1's: for `m ≥ p`,
#    `3m + (p − 1)` instead of 1F1B's `3(m + p − 1)`.
#
# Hint: simulate your attempt and plot it; look at which ranks idle, and for how long.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
from minipipe import Kind, Schedule, W, compare_timelines, one_f_one_b, simulate, zb_h1
from minipipe.course import checks
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# The simplest placement, `W` right after its `B`, as a starting point. It validates, but it
# leaves most of the bubble in place:

# %%
def w_right_after_b(p: int, m: int) -> Schedule:
    ranks = []
    for order in one_f_one_b(p, m).ranks:
        out = []
        for a in order:
            out += [a, W(a.mb)] if a.kind is Kind.B else [a]
        ranks.append(out)
    return Schedule(ranks, m=m, name="W after B")


first_try = simulate(w_right_after_b(4, 8), t_f=1.0, t_b=1.0, t_w=1.0)
print(first_try)

# %% [markdown]
# ## 7a. Write `zero_bubble(p, m)`

# %%
def zero_bubble(p: int, m: int) -> Schedule:
    """1F1B's F/B order with a W for every B, placed to fill the bubbles (ZB-H1)."""
    ### BEGIN SOLUTION Exercise 7: place the W actions
    # The further a rank is from the last stage, the longer it waits for gradients in the
    # cool-down: rank r keeps up to r weight gradients deferred (the oldest runs when one more
    # arrives) and spends them on those waits. Memory: at most p − r micro-batches between F
    # and B (1F1B's order), plus r between B and W: p in all, 1F1B's rank-0 peak.
    ranks = []
    for r, order in enumerate(one_f_one_b(p, m).ranks):
        out, deferred = [], []
        for a in order:
            out.append(a)
            if a.kind is Kind.B:
                deferred.append(a.mb)
                if len(deferred) > r:
                    out.append(W(deferred.pop(0)))
        out += [W(i) for i in deferred]  # the rest fill the end of the cool-down
        ranks.append(out)
    return Schedule(ranks, m=m, name="my zb-h1")
    ### END SOLUTION


# %%
checks.check_zero_bubble(zero_bubble)

# %% [markdown]
# ## 7b. Compare with 1F1B
#
# The same 4 ranks and 8 micro-batches: 1F1B with a whole backward (`t_b = 2`) against your
# placement with the backward split (`t_b = t_w = 1`), and the package's ZB-H1 for reference.

# %%
plain = simulate(one_f_one_b(4, 8), t_f=1.0, t_b=2.0)
mine = simulate(zero_bubble(4, 8), t_f=1.0, t_b=1.0, t_w=1.0)
reference = simulate(zb_h1(4, 8), t_f=1.0, t_b=1.0, t_w=1.0)
print(f"step time: 1F1B {plain.step_time:g}, yours {mine.step_time:g}, "
      f"ZB-H1 {reference.step_time:g}")
print(f"activations held (until W): 1F1B {plain.peak_inflight}, yours {mine.peak_pending_w}")
compare_timelines(plain, mine, titles=("1F1B", "your zero-bubble placement"));

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 7: zero-bubble W placement",
    {"step time 1F1B / yours / ZB-H1 (p=4, m=8)":
         f"{plain.step_time:g} / {mine.step_time:g} / {reference.step_time:g}",
     "bubble fraction 1F1B / yours": f"{plain.bubble_fraction:.3f} / {mine.bubble_fraction:.3f}"},
    data="simulated, t_f = t_b = t_w = 1 (1F1B: whole backward 2)",
    notes=["the gain assumes the weight gradient can be computed separately at no extra cost"])
