# Source of exercises/05_tied.ipynb and solutions/05_tied.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 5 — synchronise a tied weight
#
# *Goes with [notebook 05 (tied weights)](../notebooks/05_tied_weights.ipynb). About 20 minutes.*
#
# Language models often use one matrix twice: as the token embedding (first stage) and as the
# output projection (last stage). In a pipeline those two stages live on different ranks, so
# each keeps its own **copy** of the weight. The copies start identical (broadcast). After the
# backward, each rank's gradient holds only the contribution of *its* use of the weight.
#
# Your job: the function every holding rank calls after the backward, before the optimizer step,
# so that each copy gets the gradient single-process training would compute, and the copies
# stay identical.
#
# ```python
# sync_tied_grad(param, group)
# ```
#
# - `param`: this rank's copy (a `torch.nn.Parameter`, its gradient in `param.grad`);
# - `group`: a process group holding exactly the ranks that hold the weight (pass it to the
#   collective as `group=group`).
#
# Change `param.grad` in place. The collectives are in `torch.distributed` (imported below as
# `dist`).
#
# **How the check works.** It starts 2 real ranks (processes talking over gloo). Rank 0 embeds a
# batch of tokens with its copy `E` and sends the result to rank 1, which projects it back onto
# the vocabulary with its copy (`logits = h @ E.T`) and computes the loss; gradients flow back.
# Each rank calls your function, then takes an SGD step; three steps. The check compares each
# copy's gradient with single-process training of the same model, and the two copies with each
# other.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look.

# %%
import torch
import torch.distributed as dist

from minipipe.course import checks
from minipipe.course.report import verification_checkpoint

# %% [markdown]
# ## 5a. Write `sync_tied_grad(param, group)`
#
# Before you write it: single-process, one weight used twice in one loss. What is its gradient,
# in terms of the gradients of the two uses? Then: what should each rank hold afterwards, and
# which collective gives every member of a group that?

# %%
def sync_tied_grad(param: torch.nn.Parameter, group) -> None:
    """Give every rank of `group` the full gradient of the tied weight `param`, in place."""
    ### BEGIN SOLUTION Exercise 5: write the tied-gradient sync
    # One weight, two uses, one loss: the gradient is the sum of the two uses' gradients.
    # all_reduce(SUM) leaves that sum on every member of the group (not the average: the two
    # uses are two terms of the same loss, not two replicas of one model).
    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)
    ### END SOLUTION


# %%
figures = checks.check_tied_grad_sync(sync_tied_grad)

# %% [markdown]
# ## 5b. Where this lives in minipipe
#
# `minipipe.runtime.train` finds tied weights by itself (one `Parameter` used by layers on two
# ranks), broadcasts them at the start and makes the same call after every backward;
# `train(..., tie_sync=False)` turns it off so you can watch the copies drift apart (notebook 05
# does). Questions to answer for yourself:
#
# - With data parallelism *and* a tied weight, which gradients are averaged, which summed?
# - Summing keeps the two copies' *updates* equal. What happens over many steps if the copies
#   did not *start* equal? (That is why the runtime broadcasts them once, first.)

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 5: tied-gradient sync",
    {"max gradient error vs single process": figures["max_grad_error"],
     "max difference between the copies": figures["max_copy_difference"]},
    ranks=2, data="a tied 11 × 6 embedding, 8 tokens, 3 SGD steps",
    notes=["gloo on CPU; the same all-reduce runs over NCCL on GPUs"])
