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


def _tied_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(_TIE["seed"])
    emb = torch.randn(_TIE["vocab"], _TIE["width"], generator=g) * 0.5
    mix = torch.randn(_TIE["width"], _TIE["width"], generator=g) * 0.5
    tokens = torch.randint(0, _TIE["vocab"], (_TIE["batch"],), generator=g)
    targets = torch.randint(0, _TIE["vocab"], (_TIE["batch"],), generator=g)
    return emb, mix, tokens, targets


def _tied_reference() -> dict[str, list[torch.Tensor]]:
    """One process, one embedding used twice: ``loss(tanh(E[x] A) Eᵀ, y)``, plain SGD."""
    emb, mix, x, y = _tied_setup()
    emb, mix = emb.clone().requires_grad_(), mix.clone().requires_grad_()
    grads, weights = [], []
    for _ in range(_TIE["steps"]):
        loss = torch.nn.functional.cross_entropy(torch.tanh(emb[x] @ mix) @ emb.T, y)
        loss.backward()
        grads.append(emb.grad.clone())
        with torch.no_grad():
            emb -= _TIE["lr"] * emb.grad
            mix -= _TIE["lr"] * mix.grad
        emb.grad = mix.grad = None
        weights.append(emb.detach().clone())
    return {"grads": grads, "weights": weights}


def _tied_rank(ctx: Any, sync: Callable) -> dict[str, list[torch.Tensor]]:
    """Two stages share one weight: rank 0 embeds the tokens, rank 1 projects back onto it."""
    import torch.distributed as dist

    emb0, mix0, x, y = _tied_setup()
    emb = torch.nn.Parameter(emb0.clone())  # this rank's copy of the tied weight
    mix = torch.nn.Parameter(mix0.clone())  # rank 0 only
    group = dist.new_group([0, 1])  # the ranks that hold the tied weight
    own, synced, weights, changed = [], [], [], []
    for step in range(_TIE["steps"]):
        ctx.status(f"step {step}: forward and backward")
        if ctx.rank == 0:
            h = torch.tanh(emb[x] @ mix)  # (batch, width): first use of the tied weight
            dist.send(h.detach(), 1)
            grad_h = torch.empty_like(h)
            dist.recv(grad_h, 1)
            h.backward(grad_h)
        else:
            h = torch.empty(_TIE["batch"], _TIE["width"])
            dist.recv(h, 0)
            h.requires_grad_()
            logits = h @ emb.T  # (batch, vocab): second use of the tied weight
            torch.nn.functional.cross_entropy(logits, y).backward()
            dist.send(h.grad, 0)
        own.append(emb.grad.clone())
        before = emb.detach().clone()
        ctx.status(f"step {step}: your sync function")
        sync(emb, group)
        changed.append(not torch.equal(before, emb.detach()))
        synced.append(emb.grad.clone() if emb.grad is not None else None)
        with torch.no_grad():
            for prm in ((emb, mix) if ctx.rank == 0 else (emb,)):
                if prm.grad is not None:
                    prm -= _TIE["lr"] * prm.grad
                prm.grad = None
        weights.append(emb.detach().clone())
    return {"own": own, "synced": synced, "weights": weights, "changed": changed}


def check_tied_grad_sync(fn: Callable[[torch.nn.Parameter, Any], None]) -> dict[str, float]:
    """``fn(param, group)``: sum ``param.grad`` over the ranks of ``group``, in place, on each rank.

    Runs a two-stage pipeline on 2 real ranks (gloo) whose first and last stage share one
    embedding matrix, for 3 SGD steps, calling ``fn`` after each backward; then checks that both
    copies got the single-process gradient and stayed identical.

    Returns:
        ``{"max_grad_error", "max_copy_difference"}`` over the steps.
    """
    __tracebackhide__ = True
    from ...runtime.launch import WorkerError, launch

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
        out = launch(_tied_rank, 2, fn, backend="gloo", timeout=120)
    except WorkerError as err:
        raise CheckFailed(f"your sync function raised on rank {err.rank} of a real run:\n"
                          f"{err.worker_traceback.rstrip()}") from None
    ref = _tied_reference()
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
            "own use of the weight (rank 0: the embedding lookup; rank 1: the output "
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
        src = 0 if eq(g0, own[0][0]) else 1
        raise CheckFailed(
            f"both ranks now hold rank {src}'s own gradient: that copies one contribution (a "
            "broadcast) and loses the other rank's. The single-process gradient of a weight used "
            "twice has a term from each use.")
    if not eq(g0, want):
        err = (g0 - want).abs().max().item()
        raise CheckFailed(f"the copies agree, but their gradient differs from the single-process "
                          f"one by up to {err:.3g}: the tied gradient is the sum of the ranks' "
                          "gradients, once")
    grad_err = max((s - w).abs().max().item() for s, w in zip(synced[0], ref["grads"]))
    copy_diff = max((a - b).abs().max().item()
                    for a, b in zip(out[0]["weights"], out[1]["weights"]))
    weight_err = max((a - w).abs().max().item() for a, w in zip(out[0]["weights"], ref["weights"]))
    if copy_diff > 1e-6 or weight_err > 1e-5 or grad_err > 1e-5:
        raise CheckFailed(f"the first step is right, but over {_TIE['steps']} steps the copies "
                          f"differ by {copy_diff:.3g} and the weights from single-process "
                          f"training by {weight_err:.3g}: does your function work on every call?")
    _passed(f"tied gradients summed on 2 real ranks: {_TIE['steps']} steps, copies identical "
            f"(max difference {copy_diff:.1g}), gradient = single-process "
            f"(max error {grad_err:.1g})")
    return {"max_grad_error": grad_err, "max_copy_difference": copy_diff}


