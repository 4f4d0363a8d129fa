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

from .specs import LayerSpec, SpecModel, TiedLayerSpec

__all__ = ["ResidualMLP", "mlp", "mlp_specs", "mlp_batch", "Embed", "Block", "Head", "gpt",
           "gpt_specs", "gpt_loss", "vlm_specs", "vlm_batch", "Patches", "EncoderBlock",
           "Projector", "TextHead", "FixedTimeBlock", "stand_in", "stand_in_gpt",
           "backward_phase"]


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


def mlp_specs(layers: int = 8, width: int = 32, d_in: int = 16, d_out: int = 16,
              seed: int = 0) -> SpecModel:
    """:func:`mlp` as layer specs: each rank builds only its layers (seeded per layer)."""
    return SpecModel([LayerSpec(nn.Linear, d_in, width),
                      *[LayerSpec(ResidualMLP, width) for _ in range(layers)],
                      LayerSpec(nn.Linear, width, d_out)], seed)


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


def _gpt_init(layer: nn.Module, layers: int) -> nn.Module:
    for name, p in layer.named_parameters():  # GPT-2 style, as in gpt()
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith("proj.weight") else 1))
    return layer


def _gpt_layer(cls: type, layers: int, *args: int) -> nn.Module:
    return _gpt_init(cls(*args), layers)


def gpt_specs(vocab: int = 32, context: int = 16, width: int = 32, layers: int = 4,
              heads: int = 2, tie: bool = False, seed: int = 0) -> SpecModel:
    """:func:`gpt` as layer specs; ``tie=True`` ties the LM head to the token embedding
    with a :class:`~minipipe.specs.TiedLayerSpec` (the first and last stage share it)."""
    ends = [(Embed, "tok.weight", (vocab, context, width)), (Head, "out.weight", (width, vocab))]
    embed, head = (TiedLayerSpec("embedding", _gpt_layer, cls, layers, *args, tied_weight_attr=attr)
                   if tie else LayerSpec(_gpt_layer, cls, layers, *args)
                   for cls, attr, args in ends)
    blocks = [LayerSpec(_gpt_layer, Block, layers, width, heads) for _ in range(layers)]
    return SpecModel([embed, *blocks, head], seed)


def gpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits ``(B, T, V)``, targets ``(B, T)``."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---------------------------------------------------------------- a small vision-language model


class Patches(nn.Module):
    """``(images (B, 3, H, W), tokens (B, T))`` -> ``(patch embeddings (B, N, C), tokens)``."""

    def __init__(self, patch: int, width: int, image: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3 * patch * patch, width)
        self.pos = nn.Parameter(torch.zeros((image // patch) ** 2, width))

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = batch
        p = F.unfold(images, self.patch, stride=self.patch).transpose(1, 2)  # (B, N, 3·p·p)
        return self.proj(p) + self.pos, tokens


class EncoderBlock(Block):
    """A bidirectional transformer block over the patches; the tokens pass through."""

    def forward(self, value: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, tokens = value
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x)), tokens


class Projector(nn.Module):
    """Image features pooled ``pool`` patches to one and projected to the text width, then the
    token embeddings after them: ``(B, N, C_img), (B, T)`` -> ``(B, N/pool + T, C_text)``
    (image tokens first, LLaVA-style)."""

    def __init__(self, img_width: int, width: int, vocab: int, context: int, pool: int) -> None:
        super().__init__()
        self.pool = pool
        self.proj = nn.Sequential(nn.Linear(img_width, width), nn.GELU(), nn.Linear(width, width))
        self.embed = Embed(vocab, context, width)

    def forward(self, value: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        image, tokens = value
        B, N, C = image.shape
        pooled = image.view(B, N // self.pool, self.pool, C).mean(2)
        return torch.cat([self.proj(pooled), self.embed(tokens)], dim=1)


class TextHead(Head):
    """Logits for the text positions only (the last ``T``, after ``skip`` image tokens)."""

    def __init__(self, width: int, vocab: int, skip: int) -> None:
        super().__init__(width, vocab)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, self.skip:])


def vlm_specs(image: int = 32, patch: int = 4, img_width: int = 64, img_layers: int = 4,
              pool: int = 4, vocab: int = 32, context: int = 8, width: int = 32, layers: int = 4,
              heads: int = 2, seed: int = 0) -> SpecModel:
    """A small vision-language model as layer specs: ``[Patches, EncoderBlock × img_layers,
    Projector, Block × layers, TextHead]``. Its layers differ in cost (a wide encoder over
    every patch, a narrow decoder over pooled image tokens and text) *and* in boundary: a tuple
    (patch features, token ids) through the encoder, one tensor after the projector.
    Batches: ``((images, tokens), targets)``, see :func:`vlm_batch`."""
    patches = (image // patch) ** 2
    return SpecModel([LayerSpec(Patches, patch, img_width, image),
                      *[LayerSpec(EncoderBlock, img_width, heads) for _ in range(img_layers)],
                      LayerSpec(Projector, img_width, width, vocab, context, pool),
                      *[LayerSpec(_gpt_layer, Block, layers, width, heads) for _ in range(layers)],
                      LayerSpec(TextHead, width, vocab, patches // pool)], seed)


def vlm_batch(batch: int = 8, image: int = 32, vocab: int = 32, context: int = 8,
              seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Synthetic ``((images, tokens), targets)``: the caption is a function of the image (its
    brightest channel per row band), so the model has something to learn."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, image, image, generator=g)
    bands = images.view(batch, 3, context, -1).mean(-1).argmax(1)  # (B, context) in 0..2
    text = (bands * 7 + torch.arange(context)) % vocab
    return (images, text[:, :-1].contiguous()), text[:, 1:].contiguous()


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
