"""Exercise 5: summing a tied weight's gradients over the ranks that hold it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .common import (
    CheckFailed,
    _not_implemented,
    _passed,
)

_TIE = {"vocab": 11, "width": 6, "batch": 8, "steps": 3, "lr": 0.5, "seed": 3}
# 4 ranks: rank 0 loads the tokens, rank 1 embeds them with its copy of E, rank 2 is a middle
# stage, rank 3 projects back onto its copy of E. The tie group is ranks 1 and 3: not the world,
# not "the other rank" 1 − r nor world − 1 − r, and its first member is not rank 0.
_WORLD, _HOLDERS = 4, (1, 3)
_PG_TIMEOUT = 10.0  # seconds a receive or collective may block before the rank gives up


def _tied_setup() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(_TIE["seed"])
    emb = torch.randn(_TIE["vocab"], _TIE["width"], generator=g) * 0.5
    mix = torch.randn(_TIE["width"], _TIE["width"], generator=g) * 0.5
    mid = torch.randn(_TIE["width"], _TIE["width"], generator=g) * 0.5
    tokens = torch.randint(0, _TIE["vocab"], (_TIE["batch"],), generator=g)
    targets = torch.randint(0, _TIE["vocab"], (_TIE["batch"],), generator=g)
    return emb, mix, mid, tokens, targets


def _tied_reference() -> dict[str, list[torch.Tensor]]:
    """One process, one embedding used twice: ``loss(tanh(tanh(E[x] A) M) Eᵀ, y)``, plain SGD."""
    emb, mix, mid, x, y = _tied_setup()
    params = [t.clone().requires_grad_() for t in (emb, mix, mid)]
    emb, mix, mid = params
    grads, weights = [], []
    for _ in range(_TIE["steps"]):
        h = torch.tanh(torch.tanh(emb[x] @ mix) @ mid)
        torch.nn.functional.cross_entropy(h @ emb.T, y).backward()
        grads.append(emb.grad.clone())
        with torch.no_grad():
            for q in params:
                q -= _TIE["lr"] * q.grad
                q.grad = None
        weights.append(emb.detach().clone())
    return {"grads": grads, "weights": weights}


def _stage(ctx: Any, emb: torch.nn.Parameter, mix: torch.nn.Parameter,
           mid: torch.nn.Parameter, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward and backward of this rank's stage (messages to and from its neighbours)."""
    import torch.distributed as dist

    shape = (_TIE["batch"], _TIE["width"])
    if ctx.rank == 0:  # the loader
        dist.send(x, 1)
    elif ctx.rank == 1:  # first use of the tied weight
        tokens = torch.empty_like(x)
        dist.recv(tokens, 0)
        h = torch.tanh(emb[tokens] @ mix)
        dist.send(h.detach(), 2)
        grad = torch.empty(shape)
        dist.recv(grad, 2)
        h.backward(grad)
    elif ctx.rank == 2:  # a middle stage
        h = torch.empty(shape)
        dist.recv(h, 1)
        h.requires_grad_()
        out = torch.tanh(h @ mid)
        dist.send(out.detach(), 3)
        grad = torch.empty(shape)
        dist.recv(grad, 3)
        out.backward(grad)
        dist.send(h.grad, 1)
    else:  # second use of the tied weight: the output projection and the loss
        h = torch.empty(shape)
        dist.recv(h, 2)
        h.requires_grad_()
        torch.nn.functional.cross_entropy(h @ emb.T, y).backward()
        dist.send(h.grad, 2)


def _tied_rank(ctx: Any, sync: Callable) -> dict[str, list[Any]]:
    import torch.distributed as dist

    emb0, mix0, mid0, x, y = _tied_setup()
    emb = torch.nn.Parameter(emb0.clone())  # this rank's copy of the tied weight (ranks 1, 3)
    mix, mid = torch.nn.Parameter(mix0.clone()), torch.nn.Parameter(mid0.clone())
    group = dist.new_group(list(_HOLDERS))  # every rank takes part in creating it
    holds = ctx.rank in _HOLDERS
    own, synced, weights, changed = [], [], [], []
    for step in range(_TIE["steps"]):
        ctx.status(f"step {step}: forward and backward of its stage")
        _stage(ctx, emb, mix, mid, x, y)
        if holds:
            own.append(emb.grad.clone())
            before = emb.detach().clone()
            ctx.status(f"step {step}: inside your sync function (it holds the tied weight)")
            sync(emb, group)
            ctx.status(f"step {step}: your sync function returned; SGD step")
            changed.append(not torch.equal(before, emb.detach()))
            synced.append(emb.grad.clone() if emb.grad is not None else None)
        else:
            ctx.status(f"step {step}: done (it holds no copy of the tied weight, so it never "
                       "calls your function)")
        with torch.no_grad():
            for prm in {1: (emb, mix), 2: (mid,), 3: (emb,)}.get(ctx.rank, ()):
                if prm.grad is not None:
                    prm -= _TIE["lr"] * prm.grad
                prm.grad = None
        weights.append(emb.detach().clone())
    return {"own": own, "synced": synced, "weights": weights, "changed": changed}


def _ranks_failed(err: Exception) -> CheckFailed:
    """A hang or a crash on the ranks, as the check's failure, with each rank's status."""
    from ...runtime.launch import PipelineTimeout

    status = "".join(f"\n  rank {r}: {s}" for r, s in enumerate(getattr(err, "status", [])))
    text = getattr(err, "worker_traceback", "") or str(err)
    blocked = isinstance(err, PipelineTimeout) or any(
        word in text.lower() for word in ("timed out", "timeout", "closed by peer",
                                          "connection reset", "broken pipe"))
    if blocked:
        why = ("your function waited for a rank that never answered (or that had already "
               "finished). Only ranks 1 and 3 hold the tied weight and call your function; ranks "
               "0 and 2 never do. A collective over the default group (the whole world: no "
               "`group=group`), or a send/recv to a hard-coded rank (such as 1 − rank), waits "
               "for a rank outside the group. Pass group=group to the collective.")
    else:
        rank = getattr(err, "rank", "?")
        why = (f"your sync function raised on rank {rank} of the real run:\n"
               + "\n".join(text.rstrip().splitlines()[-8:]))
    return CheckFailed(f"{why}\nWhat each of the {_WORLD} ranks was doing:{status}")


def _first_step(out: list[dict[str, Any]], ref: dict[str, list[torch.Tensor]]) -> None:
    """The first step's gradients on the two holders, against single-process training."""
    __tracebackhide__ = True
    own, synced = [o["own"] for o in out], [o["synced"] for o in out]
    if any(o["changed"][0] for o in out):
        raise CheckFailed("your function changed the tied weight itself: it should only change its "
                          "gradient (param.grad); the optimizer then updates the weight")
    g0, g1, want = synced[0][0], synced[1][0], ref["grads"][0]
    if g0 is None or g1 is None:
        raise CheckFailed("after your function a rank has no gradient (param.grad is None); sum "
                          "the gradients in place, into param.grad")

    def eq(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-7)

    if eq(g0, own[0][0]) and eq(g1, own[1][0]):
        raise CheckFailed(
            "nothing changed: after your function each rank still has only the gradient of its "
            "own use of the weight (rank 1: the embedding lookup; rank 3: the output "
            "projection). The two copies get different updates and drift apart. (If you "
            "all-reduced a copy of the gradient, write the result back into param.grad.)")
    if not eq(g0, g1):
        raise CheckFailed("after your function the two ranks hold different gradients for the "
                          "tied weight, so their copies will drift apart; every holder must end "
                          "with the same gradient")
    if eq(g0, want / 2):
        raise CheckFailed(
            "the copies agree, but the gradient is half the single-process one: you averaged. "
            "Averaging is for data parallelism (replicas of one model on different samples); the "
            "two uses of a tied weight are two terms of one loss, and their gradients add up.")
    if eq(g0, own[0][0]) or eq(g0, own[1][0]):
        src = _HOLDERS[0] if eq(g0, own[0][0]) else _HOLDERS[1]
        raise CheckFailed(
            f"both ranks now hold rank {src}'s own gradient: that copies one contribution (a "
            "broadcast) and loses the other rank's. The single-process gradient of a weight used "
            "twice has a term from each use.")
    if not eq(g0, want):
        err = (g0 - want).abs().max().item()
        raise CheckFailed(f"the copies agree, but their gradient differs from the single-process "
                          f"one by up to {err:.3g}: the tied gradient is the sum of the ranks' "
                          "gradients, once")


def check_tied_grad_sync(fn: Callable[[torch.nn.Parameter, Any], None]) -> dict[str, float]:
    """``fn(param, group)``: sum ``param.grad`` over the ranks of ``group``, in place, on each rank.

    Runs a four-stage pipeline on 4 real ranks (gloo) whose stages on ranks 1 and 3 share one
    embedding matrix (ranks 0 and 2 hold no copy), for 3 SGD steps, calling ``fn`` on ranks 1
    and 3 after each backward; then checks that both copies got the single-process gradient and
    stayed identical. A function that blocks fails within about 10 seconds, with each rank's
    status.

    Returns:
        ``{"max_grad_error", "max_copy_difference"}`` over the steps.
    """
    __tracebackhide__ = True
    from ...runtime.launch import PipelineTimeout, WorkerError, launch

    probe = torch.nn.Parameter(torch.zeros(2))
    probe.grad = torch.ones(2)
    try:  # a stub fails here, before any process starts
        fn(probe, None)
    except NotImplementedError as err:
        raise _not_implemented(f"{getattr(fn, '__name__', 'your function')}(param, group)",
                               err) from None
    except Exception:  # expected: this process has no process group
        pass
    try:
        out = launch(_tied_rank, _WORLD, fn, backend="gloo", timeout=60 + 2 * _PG_TIMEOUT,
                     pg_timeout=_PG_TIMEOUT)
    except (WorkerError, PipelineTimeout) as err:
        raise _ranks_failed(err) from None
    out = [out[r] for r in _HOLDERS]
    ref = _tied_reference()
    _first_step(out, ref)
    grad_err = max((s - w).abs().max().item() for s, w in zip(out[0]["synced"], ref["grads"]))
    copy_diff = max((a - b).abs().max().item()
                    for a, b in zip(out[0]["weights"], out[1]["weights"]))
    weight_err = max((a - w).abs().max().item() for a, w in zip(out[0]["weights"], ref["weights"]))
    if copy_diff > 1e-6 or weight_err > 1e-5 or grad_err > 1e-5:
        raise CheckFailed(f"the first step is right, but over {_TIE['steps']} steps the copies "
                          f"differ by {copy_diff:.3g} and the weights from single-process "
                          f"training by {weight_err:.3g}: does your function work on every call?")
    _passed(f"tied gradients summed on ranks 1 and 3 of {_WORLD} real ranks: {_TIE['steps']} "
            "steps, copies identical "
            f"(max difference {copy_diff:.1g}), gradient = single-process "
            f"(max error {grad_err:.1g})")
    return {"max_grad_error": grad_err, "max_copy_difference": copy_diff}


