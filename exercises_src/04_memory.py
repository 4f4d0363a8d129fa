# Source of exercises/04_memory.ipynb and solutions/04_memory.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 4 — predict peak activation memory per rank
#
# *Goes with [notebook 03 (1F1B)](../notebooks/03_1f1b.ipynb). About 20 minutes.*
#
# Between a micro-batch's forward and its backward, a stage keeps the activations autograd
# saved for the backward. If one micro-batch saves `bytes_per_mb` bytes on a rank, the rank's
# peak is `bytes_per_mb` times the most micro-batches it holds at once (forward run, backward
# not yet). That number depends only on the schedule's order on that rank.
#
# You will write the prediction for GPipe and for 1F1B, check it on paper cases, then check it
# against the bytes measured on two real ranks: the runtime counts every tensor autograd saves
# (exact on CPU), and `RunResult.peak_activation_bytes` is each rank's peak.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
import matplotlib.pyplot as plt

from minipipe.course import checks
from minipipe import gpipe, one_f_one_b
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# Print the two schedules for `p = 4, m = 6` and count, rank by rank, how many micro-batches are
# held at the worst moment. Then try `m = 2`.

# %%
print(gpipe(4, 6))
print(one_f_one_b(4, 6))
print(one_f_one_b(4, 2))

# %% [markdown]
# ## 4a. Write `peak_activation(schedule_name, p, m, bytes_per_mb)`
#
# `schedule_name` is `"gpipe"` or `"1f1b"`. Return a list with one number per rank: the peak
# bytes of saved activations on that rank, without recomputation (no activation checkpointing).

# %%
def peak_activation(schedule_name: str, p: int, m: int, bytes_per_mb: int) -> list[int]:
    """Peak bytes of saved activations on each of the p ranks."""
    ### BEGIN SOLUTION Exercise 4: write the memory predictor
    if schedule_name == "gpipe":
        return [m * bytes_per_mb] * p  # all m forwards run before the first backward frees one
    if schedule_name == "1f1b":
        # warm-up (p − r − 1) plus the steady forward in flight; never more than m exist
        return [min(p - r, m) * bytes_per_mb for r in range(p)]
    raise ValueError(f"unknown schedule {schedule_name!r}")
    ### END SOLUTION


# %%
checks.check_peak_activation(peak_activation)

# %% [markdown]
# ## 4b. Check it on real ranks
#
# Two ranks train a small MLP with GPipe and then with 1F1B (`p = 2, m = 4`). The stages are not
# identical (the first holds the input layer, the last the loss), so the check measures each
# rank's bytes per micro-batch and compares `peak_activation(name, 2, 4, that_rank's_bytes)[rank]`
# with the measured peak.

# %%
table = checks.check_peak_activation_on_ranks(peak_activation)

# %% [markdown]
# ## 4c. What 1F1B buys
#
# With your function: activation memory per rank for 8 stages and 32 micro-batches, in units of
# one micro-batch of one stage. GPipe's grows with `m`; 1F1B's first stage holds `p`
# micro-batches of `1/p` of the layers, about one micro-batch through the whole model, whatever
# `p` is.

# %%
p, m = 8, 32
fig, ax = plt.subplots(figsize=(7, 3))
ax.bar([r - 0.2 for r in range(p)], peak_activation("gpipe", p, m, 1), width=0.4, label="GPipe")
ax.bar([r + 0.2 for r in range(p)], peak_activation("1f1b", p, m, 1), width=0.4, label="1F1B")
ax.set(xlabel="rank", ylabel="micro-batches held at peak", title=f"p={p}, m={m}")
ax.legend()
plt.show()

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 4: memory predictor",
    {f"{name} rank {row['rank']} measured / predicted": f"{row['measured']} / {row['predicted']} B"
     for name, rows in table.items() for row in rows},
    ranks=2, data="minipipe.models.mlp(layers=2, width=16), 16 samples, p=2, m=4",
    notes=["activation bytes are exact on CPU; on a GPU allocator caching adds to what "
           "torch.cuda.max_memory_allocated reports"])
