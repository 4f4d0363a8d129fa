# Source of exercises/09_interleaved.ipynb and solutions/09_interleaved.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 9 — an interleaved 1F1B generator
#
# *Goes with [notebook 04 (interleaved 1F1B)](../notebooks/04_interleaved.ipynb). About 40
# minutes.*
#
# Interleaved 1F1B (Megatron-LM's *virtual stages*) cuts the model into `p·v` stages and gives
# rank `r` the `v` chunks `r, r + p, r + 2p, …`. It is the schedule most hand-written versions
# get wrong. Each rank still runs a warm-up, a steady phase (one forward, one backward) and a
# cool-down, but now every action also names a **chunk**: `F(mb, chunk)`, `B(mb, chunk)`.
#
# The order, per rank (`m` a multiple of `p`, as Megatron-LM requires):
#
# - **forwards** go through the chunks in **groups of `p` micro-batches**: micro-batches
#   `0 … p−1` on chunk 0, the same ones on chunk 1, …, on chunk `v−1`; then micro-batches
#   `p … 2p−1` on chunk 0, and so on. (Why groups of `p`? When rank 0 finishes micro-batch `p−1`
#   on chunk 0, micro-batch 0 has just gone round the other `p − 1` ranks and is back.)
# - **backwards** go in the same groups, oldest group first, but a backward starts where the
#   forward ended: the chunks are visited from the **last** (`v−1`) to the first.
# - **warm-up** on rank `r`: `(p − r − 1)·2 + (v − 1)·p` forwards, but never more than all
#   `v·m` of them. (Megatron-LM runs every forward first when `m = p`; the check accepts both.)
# - then one forward (the next in line), one backward (the oldest waiting), until the forwards
#   run out; then the remaining backwards.
#
# The check names the usual mistakes: chunks switched after every micro-batch (or after all
# `m`), backwards in the forwards' chunk order, a warm-up taken from plain 1F1B, no cap at
# `v·m`. Work it through on paper for `p = 2, m = 4, v = 2` first.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look. Grade with `python -m minipipe grade exercises/`.

# %%
from minipipe.course import checks
from minipipe import B, F, Schedule, one_f_one_b, simulate
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# ## 9a. Write `interleaved(p, m, v)`
#
# A helper that says which `(chunk, micro-batch)` is a rank's `k`-th forward (and its `k`-th
# backward) keeps the three phases as short as in your 1F1B. `print(schedule)` shows each
# rank's order, chunks as prefixes (`1F3`: micro-batch 3 on chunk 1).

# %%
def interleaved(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B: p ranks, m micro-batches (a multiple of p), v chunks per rank."""
    ### BEGIN SOLUTION Exercise 9: write the interleaved 1F1B generator
    total = m * v  # (chunk, micro-batch) pairs on each rank

    def kth(k: int) -> tuple[int, int]:
        group, within = divmod(k, p * v)  # which group of p micro-batches, and where in it
        return within // p, group * p + within % p  # (chunk in forward order, micro-batch)

    ranks = []
    for r in range(p):
        forwards = [F(mb, chunk) for chunk, mb in map(kth, range(total))]
        backwards = [B(mb, v - 1 - chunk) for chunk, mb in map(kth, range(total))]
        warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        order = forwards[:warmup]
        for k in range(total - warmup):  # steady: the next forward, the oldest backward
            order += [forwards[warmup + k], backwards[k]]
        order += backwards[total - warmup:]  # cool-down
        ranks.append(order)
    return Schedule(ranks, m=m, v=v, name="my interleaved")
    ### END SOLUTION


# %%
checks.check_interleaved(interleaved)

# %% [markdown]
# ## 9b. What the chunks buy
#
# Simulate 1F1B and your schedule for `p = 4, m = 8` (a rank's whole share of the model costs
# `t_f = 1`, `t_b = 2`; one chunk costs `1/v` and `2/v`). The bubble relative to the useful
# work shrinks from `(p − 1)/m` to `(p − 1)/(v·m)`; as a fraction of the step the gain is the
# factor `(v·m + p − 1)/(m + p − 1)`, a bit less than `v`.

# %%
p, m = 4, 8
plain = simulate(one_f_one_b(p, m), t_f=1.0, t_b=2.0)
for v in (2, 4):
    mine = simulate(interleaved(p, m, v), t_f=1.0 / v, t_b=2.0 / v)
    print(f"v={v}: step {plain.step_time:g} → {mine.step_time:g}; bubble {plain.bubble_fraction:.3f}"
          f" → {mine.bubble_fraction:.3f} of the step, {plain.bubble_fraction / mine.bubble_fraction:.2f}× "
          f"smaller (formula {(v * m + p - 1) / (m + p - 1):.2f}×)")
    assert abs(mine.bubble_overhead - (p - 1) / (v * m)) < 1e-9
    assert abs(plain.bubble_fraction / mine.bubble_fraction - (v * m + p - 1) / (m + p - 1)) < 1e-9

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 9: interleaved 1F1B generator",
    {"simulated step 1F1B / interleaved v=2 (p=4, m=8)":
         f"{plain.step_time:g} / {simulate(interleaved(4, 8, 2), 0.5, 1.0).step_time:g}"},
    data="simulated, equal stages, t_f = 1, t_b = 2 per rank's share of the model",
    notes=["interleaving sends v times more activation messages per micro-batch; notebook 04 "
           "measures it on real ranks"])
