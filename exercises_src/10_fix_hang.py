# Source of exercises/10_fix_hang.ipynb and solutions/10_fix_hang.ipynb.
# Edit this file, then run `python tools/build_exercises.py` (see its docstring for the format).

# %% [markdown]
# # Exercise 10 — fix the hang
#
# *Goes with [notebook 10 (debugging a hung pipeline)](../notebooks/10_hang_clinic.ipynb).
# About 25 minutes.*
#
# Three hand-written schedules are broken. Two would **hang** on real ranks (a rank waits in a
# receive for a message nobody sends yet); one would **not hang but train on the wrong data**:
# messages over one link (one stage boundary, one direction) are received in the order they are
# sent, so a rank that sends two gradients in the wrong order makes its neighbour apply
# micro-batch 1's gradient to micro-batch 0, silently.
#
# For each one, make the **smallest change** that makes it valid: keep every action on every
# rank, and move as few as you can (one is enough for each). Read the validator's message
# first: it names the rank that waits, the action it waits at, and the message it waits for.
# The checks run the validator and its dry run, count the actions you moved, and then train a
# small MLP with your fixed schedule on real ranks against single-process training.
#
# **How the exercises work.** Replace each `raise NotImplementedError(...)` line (under
# `# YOUR CODE HERE`) with your code and run the cell, then run the check cell below it. A check
# prints `passed: ...`, or stops with a `CheckFailed` error that says what is wrong and where to
# look. Grade with `python -m minipipe grade exercises/`.

# %%
from torch.nn.functional import mse_loss

from minipipe.course import checks
from minipipe import Schedule, ScheduleError, dry_run, validate
from minipipe.models import mlp, mlp_batch
from minipipe.runtime import reference, train
from minipipe.course.report import verification_checkpoint

broken = checks.ex10_fix_hang.BROKEN
for name, schedule in broken.items():
    print(schedule)
    try:
        validate(schedule)
    except ScheduleError as err:
        print(f"  → {err}\n")

# %% [markdown]
# ## 10a. A two-rank deadlock
#
# `dry_run(schedule)` plays the message protocol tick by tick; on a valid schedule it returns
# each rank's `(tick, action)` list, which is handy to look at your fix.

# %%
def fix_a() -> Schedule:
    """Schedule 'a' with the smallest change that makes it valid."""
    ### BEGIN SOLUTION Exercise 10: fix schedule a
    # Rank 0 runs B0 right after F0 and waits for its gradient; rank 1 first wants F1, which
    # rank 0 sends only after B0. Rank 1 is the last stage: it can run B0 right after F0.
    return Schedule(["F0 B0 F1 B1 F2 B2", "F0 B0 F1 B1 F2 B2"], name="fixed a")
    ### END SOLUTION


# %%
checks.check_fix(fix_a, "a")

# %% [markdown]
# ## 10b. Wrong data, no hang
#
# First watch it happen: train with schedule `b` on two real ranks *without* the validator
# (`check_schedule=False`). Nothing hangs and nothing raises; compare the gradients with
# single-process training.

# %%
model, batch = mlp(layers=2, width=16, d_in=8, d_out=8, seed=0), mlp_batch(16, d_in=8, d_out=8)
unchecked = train(model, mse_loss, broken["b"], batch, steps=1, return_grads=True,
                  check_schedule=False, timeout=60)
ref = reference(model, mse_loss, batch, steps=1)
wrong = max((unchecked.grads[n] - g).abs().max().item() for n, g in ref["grads"].items())
print(f"schedule b ran to the end; its largest gradient error vs one process: {wrong:.3g}")
assert wrong > 1e-4  # observed: the gradients are wrong, and nothing said so

# %%
def fix_b() -> Schedule:
    """Schedule 'b' with the smallest change that makes it valid."""
    ### BEGIN SOLUTION Exercise 10: fix schedule b
    # Rank 1 sends the gradients of micro-batches 1 and 0 in that order; rank 0 must receive
    # them in that order too. Moving one backward on either rank fixes it; on rank 1 the
    # backwards then go oldest first, like the forwards.
    return Schedule(["F0 F1 F2 F3 B0 B1 B2 B3", "F0 F1 F2 F3 B0 B1 B2 B3"], name="fixed b")
    ### END SOLUTION


# %%
fixed_b = checks.check_fix(fix_b, "b")

# %% [markdown]
# ## 10c. Three ranks

# %%
def fix_c() -> Schedule:
    """Schedule 'c' with the smallest change that makes it valid."""
    ### BEGIN SOLUTION Exercise 10: fix schedule c
    # Rank 0 waits for the gradient of micro-batch 0 right after F0, but rank 1 (1F1B's
    # warm-up for 3 ranks) wants F1 first: rank 0 needs a warm-up of p − 1 = 2 forwards.
    return Schedule(["F0 F1 B0 F2 F3 B1 B2 B3", "F0 F1 B0 F2 B1 F3 B2 B3",
                     "F0 B0 F1 B1 F2 B2 F3 B3"], name="fixed c")
    ### END SOLUTION


# %%
checks.check_fix(fix_c, "c")

# %% [markdown]
# Questions to answer for yourself: which of the three would a timeout have caught, and after
# how long? Which one only the comparison with `reference()` catches? Notebook 10 shows how to
# find each in a real job (the validator, a short `pg_timeout`, the per-rank message trace).

# %% [markdown]
# ## Local verification checkpoint

# %%
checkpoint = verification_checkpoint(
    "Exercise 10: fix the hang",
    {"schedule b without the validator: largest gradient error": wrong,
     "schedule b fixed: losses": fixed_b.losses},
    result=fixed_b, data="minipipe.models.mlp(layers=2, width=16), 16 samples, 1 step",
    notes=["messages between two ranks are matched in the order they are sent: an order bug "
           "that keeps the shapes equal trains silently on the wrong data"])
