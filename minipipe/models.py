"""Models for the lessons: a residual MLP stack, a tiny GPT, and a fixed-time stand-in block.

Every model is an ``nn.Sequential`` whose layers are the units a pipeline splits. All weights
are drawn from one seed for the whole model, so any split of it starts from the same numbers
as the single-process reference.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResidualMLP", "mlp", "mlp_batch", "Embed", "Block", "Head", "gpt", "gpt_loss",
           "FixedTimeBlock", "stand_in", "stand_in_gpt", "backward_phase"]


class ResidualMLP(nn.Module):
    """``x + W2 · gelu(W1 · layernorm(x))``: one layer of the MLP stack."""

    def __init__(self, width: int, hidden: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden or 4 * width)
        self.down = nn.Linear(hidden or 4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, width) -> (N, width)
        return x + self.down(F.gelu(self.up(self.norm(x))))


def mlp(layers: int = 8, width: int = 32, d_in: int = 16, d_out: int = 16, seed: int = 0) -> nn.Sequential:
    """Input projection, ``layers`` residual blocks, output projection (``layers + 2`` units)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), *[ResidualMLP(width) for _ in range(layers)],
                         nn.Linear(width, d_out))


def mlp_batch(batch: int = 32, d_in: int = 16, d_out: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression batch ``(x, y)`` for :func:`mlp` with ``nn.functional.mse_loss``."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, d_in, generator=g)
    y = torch.randn(batch, d_out, generator=g)
    return x, y


class Embed(nn.Module):
    """Token + position embedding: ``(B, T)`` ids -> ``(B, T, C)``."""

    def __init__(self, vocab: int, context: int, width: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        # start: position of idx[:, 0] (generation with a KV cache feeds one token at a time)
        t = torch.arange(start, start + idx.shape[1], device=idx.device)
        return self.tok(idx) + self.pos(t)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP, both residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``cache``: this block's keys and values of earlier positions (generation); the new
        ones are appended to it, and the queries attend to all of them."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v  # (B, h, past + T, C/h)
        past = k.shape[2] - T
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, C/h)
        else:  # query i sits at position past + i and sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final layer norm and the LM head: ``(B, T, C)`` -> ``(B, T, vocab)`` logits."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def gpt(vocab: int = 32, context: int = 16, width: int = 32, layers: int = 4, heads: int = 2,
        tie: bool = False, seed: int = 0) -> nn.Sequential:
    """A tiny GPT as ``[Embed, Block × layers, Head]`` (``layers + 2`` units).

    With ``tie=True`` the LM head reuses the token embedding (Press & Wolf 2017), so the
    first and the last stage of a pipeline share one weight.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(Embed(vocab, context, width), *[Block(width, heads) for _ in range(layers)],
                          Head(width, vocab))
    for name, p in model.named_parameters():  # GPT-2 style init, the same for any split
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith("proj.weight") else 1))
    if tie:
        model[-1].out.weight = model[0].tok.weight  # weight tying: one tensor, two uses
    return model


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``(B, T, V)``, targets ``(B, T)``."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---------------------------------------------------------------- the fixed-time stand-in

_phase = threading.local()


@contextlib.contextmanager
def backward_phase(name: str):
    """Tell stand-in blocks which part of backward runs: ``full``, ``input`` or ``weight``."""
    old = getattr(_phase, "name", "full")
    _phase.name = name
    try:
        yield
    finally:
        _phase.name = old


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, t_f, t_b, t_w):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.times = (t_b, t_w)
        time.sleep(t_f)
        return x * weight

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        t_b, t_w = ctx.times
        phase = getattr(_phase, "name", "full")
        time.sleep({"input": t_b, "weight": t_w}.get(phase, t_b + t_w))
        grad_w = (grad * x).reshape(-1, x.shape[-1]).sum(0)
        return grad * weight, grad_w, None, None, None


class FixedTimeBlock(nn.Module):
    """A teaching device: forward takes ``t_f`` seconds and backward ``t_b`` (+ ``t_w``).

    It sleeps instead of computing (``y = x · w``, elementwise), so timelines show the
    schedule itself even with more ranks than cores: sleeping ranks do not compete for CPU.
    With a split backward, the input-gradient part sleeps ``t_b`` and the weight part ``t_w``.
    """

    def __init__(self, width: int, t_f: float = 0.01, t_b: float = 0.02, t_w: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.t_f, self.t_b, self.t_w = t_f, t_b, t_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.weight, self.t_f, self.t_b, self.t_w)


def stand_in(stages: int, width: int = 8, t_f: float = 0.01, t_b: float = 0.02, t_w: float = 0.0,
             slow: dict[int, float] | None = None) -> nn.Sequential:
    """One :class:`FixedTimeBlock` per stage; ``slow={stage: factor}`` makes a stage slower."""
    slow = slow or {}
    return nn.Sequential(*[FixedTimeBlock(width, t_f * slow.get(s, 1), t_b * slow.get(s, 1),
                                          t_w * slow.get(s, 1)) for s in range(stages)])


def stand_in_gpt(layers: int, vocab: int = 32, context: int = 64, width: int = 8,
                 t_f: float = 0.01, seed: int = 0) -> nn.Sequential:
    """``[Embed, FixedTimeBlock × layers, Head]``: a token model whose blocks take ``t_f`` per
    forward whatever the sequence length, for generation timelines (tokens meaningless)."""
    torch.manual_seed(seed)
    return nn.Sequential(Embed(vocab, context, width), *stand_in(layers, width, t_f=t_f),
                         Head(width, vocab))
