# Source of exercises/06_partition.ipynb and solutions/06_partition.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 6 — a balanced partitioner
#
# *Goes with [notebook 06 (partitioning and load balance)](../notebooks/06_partitioning.ipynb). About 30 minutes.*
#
# A pipeline moves at the pace of its slowest stage. Given the measured cost of each layer, in
# order, split the layers into `stages` **contiguous**, non-empty stages so that the most
# expensive stage (the *bottleneck*) is as cheap as possible. Splitting by layer count, or
# filling stages up to the average one by one, is a heuristic; you are asked for the exact
# optimum.
#
# Return the split as **boundaries**, the format `minipipe.runtime.train(..., bounds=...)` takes:
# `stages + 1` increasing layer indices from `0` to `len(costs)`; stage `s` holds layers
# `bounds[s]:bounds[s + 1]`. For example, costs `[4, 1, 1, 2]` in 2 stages: `[0, 1, 4]` puts
# layer 0 alone (cost 4) and layers 1–3 together (cost 4).
#
# Approaches that are exact: trying every split (fine for a dozen layers, hopeless for a
# hundred), dynamic programming over "the first `j` layers in `k` stages", or a binary search on
# the bottleneck with a greedy feasibility test. The check compares your bottleneck with a brute
# force over every split on two dozen cases.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
from minipipe.course import checks
from minipipe import compare_timelines, one_f_one_b, simulate
from minipipe.course.report import verification_checkpoint
from minipipe.partition import split_evenly

# %% [markdown]
# ## 6a. Write `partition(costs, stages)`

# %%
def partition(costs: list[float], stages: int) -> list[int]:
    """Boundaries of the contiguous split of `costs` into `stages` with the cheapest bottleneck."""
    ### BEGIN SOLUTION Exercise 6: write the balanced partitioner
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int) -> float:  # layers a:b
        return prefix[b] - prefix[a]

    # best[k][j]: smallest bottleneck of layers 0:j in k stages; cut[k][j]: where stage k starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):  # stage k holds layers i:j
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    bounds = [n]
    for k in range(stages, 0, -1):  # walk the cuts back from the end
        bounds.append(cut[k][bounds[-1]])
    return bounds[::-1]
    ### END SOLUTION


# %%
checks.check_partition(partition)

# %% [markdown]
# ## 6b. What balance is worth
#
# A made-up but typical profile: a cheap embedding, twelve blocks, and an expensive output layer
# (a large vocabulary). Split it over 4 stages by layer count and with your partitioner, then
# simulate 1F1B with each stage's forward time equal to the sum of its layers' costs (backward
# twice that).

# %%
costs = [0.5] + [1.0] * 12 + [3.0]


def stage_costs(bounds: list[int]) -> list[float]:
    return [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]


splits = {"equal layer counts": split_evenly(len(costs), 4), "balanced": partition(costs, 4)}
timelines = {}
for name, bounds in splits.items():
    t_f = stage_costs(bounds)
    timelines[name] = simulate(one_f_one_b(4, 8), t_f=t_f, t_b=[2 * c for c in t_f])
    print(f"{name:>18}: bounds {bounds}, stage costs {t_f}, "
          f"step time {timelines[name].step_time:g}")
even, balanced = timelines["equal layer counts"], timelines["balanced"]
print(f"the balanced split is {even.step_time / balanced.step_time:.2f}× faster")
compare_timelines(even, balanced, titles=("equal layer counts", "balanced"));

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 6: balanced partitioner",
    {"bounds (balanced)": splits["balanced"],
     "simulated step, equal counts / balanced": f"{even.step_time:g} / {balanced.step_time:g}"},
    data="a synthetic per-layer cost profile; 1F1B p=4, m=8 simulated, t_b = 2 t_f",
    notes=["with measured layer times (minipipe.partition.profile_layers) the split depends on "
           "the machine: profile where you train"])
